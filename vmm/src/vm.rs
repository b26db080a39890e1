//! The KVM VM: /dev/kvm, the VM fd, its memory slots and its in-kernel platform devices.

use std::path::Path;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::devices::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open {path}: {source} (is KVM available and are you allowed to use it?)")]
    OpenKvm {
        path: String,
        source: kvm_ioctls::Error,
    },
    #[error("{path} is not a usable KVM device: {what} failed: {source}")]
    Kvm {
        path: String,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

/// A KVM VM with guest RAM registered as memory slots, an in-kernel irqchip and a PIT.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    memory: GuestMemory,
}

impl Vm {
    /// Opens `kvm_path`, creates a VM and registers every region of `memory` as a slot.
    pub fn new(kvm_path: &Path, memory: GuestMemory) -> Result<Self, VmError> {
        let path = kvm_path.display().to_string();
        let open_err = |source| VmError::OpenKvm {
            path: path.clone(),
            source,
        };
        let c_path = std::ffi::CString::new(kvm_path.as_os_str().as_encoded_bytes())
            .map_err(|_| open_err(kvm_ioctls::Error::new(libc::EINVAL)))?;
        let kvm = Kvm::new_with_path(c_path).map_err(open_err)?;
        let fail = |what: &'static str| {
            let path = path.clone();
            move |source| VmError::Kvm { path, what, source }
        };
        let fd = kvm.create_vm().map_err(fail("KVM_CREATE_VM"))?;
        // The in-kernel irqchip makes MSR writes such as async-PF succeed under PVM and gives
        // Linux guests their LAPIC/IOAPIC; payloads ignore it.
        fd.create_irq_chip().map_err(fail("KVM_CREATE_IRQCHIP"))?;
        fd.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(fail("KVM_CREATE_PIT2"))?;
        let vm = Self { kvm, fd, memory };
        vm.set_memory_slots(0)
            .map_err(fail("KVM_SET_USER_MEMORY_REGION"))?;
        Ok(vm)
    }

    fn set_memory_slots(&self, flags: u32) -> Result<(), kvm_ioctls::Error> {
        for (slot, region) in self.memory.iter().enumerate() {
            let desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the mapping is owned by `self.memory`; fields drop in declaration order,
            // so the VM fd closes before the memory is unmapped. KVM reaches the memory only
            // through this user mapping, so a stale slot could fault, never corrupt the host.
            unsafe { self.fd.set_user_memory_region(desc) }?;
        }
        Ok(())
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }
}
