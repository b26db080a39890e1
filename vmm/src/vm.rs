//! The KVM VM: /dev/kvm, the VM fd, its memory slots and its in-kernel platform devices.

use std::path::Path;

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clock_data, kvm_enable_cap, kvm_irqchip, kvm_pit_config,
    kvm_pit_state2, kvm_userspace_memory_region, KVMIO, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MmapRegion};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iowr_nr;

use crate::cast::u64_to_usize;
use crate::devices::GuestMemory;
use crate::memory::{DirtyLog, PAGE_SIZE};

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

/// The VM-wide platform state KVM holds: interrupt controllers, PIT and clock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// KVM's real-mode helper pages (one identity-map page, then three TSS pages), in the MMIO
/// hole where no device lives.
const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
const TSS_ADDR: u64 = 0xfffb_d000;

// kvm-ioctls does not wrap KVM_CLEAR_DIRTY_LOG.
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// A KVM VM with guest RAM registered as memory slots, an in-kernel irqchip and a PIT.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    memory: GuestMemory,
    /// KVM_GET_DIRTY_LOG leaves pages writable and their bits set until KVM_CLEAR_DIRTY_LOG
    /// (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2), so a harvest can choose which pages to re-arm.
    manual_protect: bool,
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
        let manual_protect = kvm.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into())
            & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE.cast_signed()
            != 0
            && {
                let mut cap = kvm_enable_cap {
                    cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                    ..Default::default()
                };
                cap.args[0] = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE.into();
                fd.enable_cap(&cap).is_ok()
            };
        let vm = Self {
            kvm,
            fd,
            memory,
            manual_protect,
        };
        vm.set_memory_slots(0)
            .map_err(fail("KVM_SET_USER_MEMORY_REGION"))?;
        Ok(vm)
    }

    /// Gives KVM the TSS and identity-map pages it needs to run real-mode code on VMX hosts
    /// without unrestricted guest (a Linux guest's AP trampoline), in the MMIO hole below
    /// the IOAPIC. Hosts that do not need them may refuse; that is not an error.
    pub fn setup_real_mode(&self) {
        if let Err(e) = self.fd.set_identity_map_address(IDENTITY_MAP_ADDR) {
            tracing::debug!("KVM_SET_IDENTITY_MAP_ADDR: {e}");
        }
        if let Err(e) = self.fd.set_tss_address(u64_to_usize(TSS_ADDR)) {
            tracing::debug!("KVM_SET_TSS_ADDR: {e}");
        }
    }

    fn set_memory_slots(&self, flags: u32) -> Result<(), kvm_ioctls::Error> {
        for (slot, region) in (0..).zip(self.memory.iter()) {
            let desc = kvm_userspace_memory_region {
                slot,
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

    fn kvm_err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
        let path = String::from("the VM");
        move |source| VmError::Kvm { path, what, source }
    }

    /// Turns KVM's dirty page logging of every memory slot on or off.
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), VmError> {
        let flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        self.set_memory_slots(flags)
            .map_err(self.kvm_err("KVM_SET_USER_MEMORY_REGION (dirty logging)"))
    }

    /// Takes the pages written since the last harvest, by vCPUs (KVM's log) and by the VMM and
    /// its devices (the vm-memory bitmap), and clears both logs. Exact only while the vCPUs
    /// and device workers are paused; otherwise a page written during the harvest shows up in
    /// this harvest or the next.
    pub fn harvest_dirty(&self) -> Result<DirtyLog, VmError> {
        self.harvest_dirty_rearming(DirtyLog::clone)
    }

    /// Like `harvest_dirty`, but KVM write-protects again only the pages `rearm` picks from
    /// the harvest. The others stay writable (no fault when the guest writes them again, which
    /// costs microseconds per page under PVM) and stay in every later harvest until re-armed,
    /// so the log never misses a write. Without KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 every page
    /// is re-armed.
    pub fn harvest_dirty_rearming(
        &self,
        rearm: impl FnOnce(&DirtyLog) -> DirtyLog,
    ) -> Result<DirtyLog, VmError> {
        let log = self.read_dirty()?;
        if self.manual_protect {
            self.clear_dirty(&rearm(&log))?;
        }
        Ok(log)
    }

    /// Write-protects the pages of `log` again and clears their bits in KVM's log.
    fn clear_dirty(&self, log: &DirtyLog) -> Result<(), VmError> {
        for (slot, (region, bits)) in (0..).zip(self.memory.iter().zip(log.region_bits())) {
            // Guest RAM is at most MAX_MEM_SIZE (64 GiB): 2^24 pages.
            #[allow(clippy::cast_possible_truncation)]
            let num_pages = (region.len() / PAGE_SIZE) as u32;
            let clear = kvm_clear_dirty_log {
                slot,
                num_pages,
                first_page: 0,
                __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
                    dirty_bitmap: bits.as_ptr() as *mut libc::c_void,
                },
            };
            // SAFETY: `clear` names a slot of this VM and points at a bitmap of `num_pages`
            // bits (DirtyLog regions mirror the slots), which KVM only reads during the call.
            let ret = unsafe { ioctl_with_ref(&self.fd, KVM_CLEAR_DIRTY_LOG(), &clear) };
            if ret < 0 {
                return Err(self.kvm_err("KVM_CLEAR_DIRTY_LOG")(
                    kvm_ioctls::Error::last(),
                ));
            }
        }
        Ok(())
    }

    /// Pages KVM has logged dirty and not yet write-protected again, counted without
    /// harvesting, so that the epoch loop can look at the running epoch's dirty set while the
    /// vCPUs run: with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_GET_DIRTY_LOG only copies the
    /// bitmap out and neither clears nor write-protects anything. Writes by the VMM's devices
    /// are not counted (reading their bitmap resets it). None without manual protect, where
    /// reading the log would harvest it.
    pub fn dirty_count(&self) -> Result<Option<usize>, VmError> {
        if !self.manual_protect {
            return Ok(None);
        }
        let mut count = 0;
        for (slot, region) in (0..).zip(self.memory.iter()) {
            let bits = self
                .fd
                .get_dirty_log(slot, u64_to_usize(region.len()))
                .map_err(self.kvm_err("KVM_GET_DIRTY_LOG"))?;
            count += bits.iter().map(|w| w.count_ones() as usize).sum::<usize>();
        }
        Ok(Some(count))
    }

    /// KVM's log and the VMM's bitmap (which it resets), merged.
    fn read_dirty(&self) -> Result<DirtyLog, VmError> {
        let mut log = DirtyLog::default();
        for (slot, region) in (0..).zip(self.memory.iter()) {
            let mut bits = self
                .fd
                .get_dirty_log(slot, u64_to_usize(region.len()))
                .map_err(self.kvm_err("KVM_GET_DIRTY_LOG"))?;
            let mapping: &MmapRegion<_> = region;
            let vmm_bits = mapping.bitmap().get_and_reset();
            for (k, v) in bits.iter_mut().zip(vmm_bits) {
                *k |= v;
            }
            log.add_region(region.start_addr(), region.len(), bits);
        }
        Ok(log)
    }

    /// Saves the in-kernel platform devices and the clock.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let chip = |chip_id| {
            let mut c = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut c)
                .map(|()| c)
                .map_err(self.kvm_err("KVM_GET_IRQCHIP"))
        };
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(self.kvm_err("KVM_GET_PIT2"))?,
            clock: self.fd.get_clock().map_err(self.kvm_err("KVM_GET_CLOCK"))?,
        })
    }

    /// Loads saved platform state into this (fresh) VM.
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            self.fd
                .set_irqchip(chip)
                .map_err(self.kvm_err("KVM_SET_IRQCHIP"))?;
        }
        self.fd
            .set_pit2(&state.pit)
            .map_err(self.kvm_err("KVM_SET_PIT2"))?;
        // KVM_SET_CLOCK takes only the clock value (and optionally REALTIME); the saved flags
        // describe the source host's clock, not a request.
        let clock = kvm_clock_data {
            clock: state.clock.clock,
            ..Default::default()
        };
        self.fd
            .set_clock(&clock)
            .map_err(self.kvm_err("KVM_SET_CLOCK"))
    }

    /// KVM's list of MSRs a VMM should save and restore.
    pub fn msr_index_list(&self) -> Result<Vec<u32>, VmError> {
        self.kvm
            .get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .map_err(self.kvm_err("KVM_GET_MSR_INDEX_LIST"))
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
