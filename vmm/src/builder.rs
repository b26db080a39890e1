//! Wires a VM from its configuration: memory, KVM VM, devices on the buses, payload boot,
//! vCPUs; and runs it.

use std::os::unix::thread::JoinHandleExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use guest_abi::{
    DeviceInfo, DeviceKind, MMIO_BASE, MMIO_DEVICE_SIZE, MMIO_FIRST_IRQ, PORT_CONSOLE_BATCH,
    PORT_UART,
};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::{self, AcpiError};
use crate::boot::{self, BootError, BootParams};
use crate::bus::Bus;
use crate::devices::power::PowerPorts;
use crate::devices::serial::{ConsoleBatchPort, SerialDevice, SerialDeviceState};
use crate::devices::virtio::blk::Block;
use crate::devices::virtio::blk::BlockState;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::mmio::{MmioError, MmioState};
use crate::devices::virtio::net::NetState;
use crate::devices::virtio::net::{FrameSource, Net, NetControl, NetError};
use crate::devices::virtio::tap::Tap;
use crate::devices::virtio::VirtioDevice;
use crate::devices::{BlockBackend, ConsoleSink, FrameSink, GuestMemory};
use crate::linux::{self, LinuxBoot, LinuxError};
use crate::memory::{self, DirtyLog, MemoryError};
use crate::vcpu::{self, RunControl, Vcpu, VcpuError, VcpuState, VmOutcome};
use crate::vm::{Vm, VmError, VmState};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Linux(#[from] LinuxError),
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    #[error("cannot route a device interrupt (KVM_IRQFD for GSI {gsi}): {source}")]
    Irqfd { gsi: u32, source: kvm_ioctls::Error },
    #[error("cannot create an interrupt eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("a {0:?} VM cannot be booted this way")]
    WrongKind(GuestKind),
    #[error("vCPU count {0} is outside 1..=64")]
    BadVcpus(u32),
    #[error("cannot create the UART: {0}")]
    Serial(std::io::Error),
    #[error("cannot start a vCPU thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot create the network device: {0}")]
    Net(#[from] NetError),
    #[error("cannot restore a virtio device: {0}")]
    Mmio(#[from] MmioError),
    #[error("the saved state does not match the VM configuration: {0} differs")]
    StateMismatch(&'static str),
}

/// What a VM is made of; both nodes of a replicated pair must agree on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub mem_size: u64,
    pub vcpus: u32,
    /// Arguments handed to the payload.
    pub args: Vec<String>,
    /// The guest's kind: it decides the vCPUs' CPUID, the platform setup and whether device
    /// interrupts are routed, so a standby's shell must be built for the same kind.
    pub kind: GuestKind,
}

/// The two kinds of guests ftvmm boots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestKind {
    /// A freestanding ELF entered at CPL3 (polls its devices, no interrupts).
    #[default]
    Payload,
    /// A Linux kernel: ACPI tables, interrupts through the in-kernel irqchip.
    Linux,
}

/// Host resources a VM uses that are not part of its configuration.
pub struct HostIo {
    /// The KVM device to open (normally /dev/kvm).
    pub kvm_path: PathBuf,
    /// Where the UART's output goes.
    pub console: Box<dyn ConsoleSink>,
    /// The image behind the virtio-blk device, if the VM has a disk.
    pub disk: Option<Box<dyn BlockBackend>>,
    /// The tap and MAC of the virtio-net device, if the VM has a NIC.
    pub net: Option<(Tap, [u8; 6])>,
}

/// The virtio-mmio window (and legacy IRQ) of each device slot; fixed, so that a device keeps
/// its address whatever else is attached.
const SLOT_DISK: u32 = 0;
const SLOT_NET: u32 = 1;

fn slot_info(kind: DeviceKind, slot: u32) -> DeviceInfo {
    DeviceInfo {
        kind: kind as u32,
        irq: MMIO_FIRST_IRQ + slot,
        mmio_base: MMIO_BASE + u64::from(slot) * MMIO_DEVICE_SIZE,
    }
}

/// Puts `device` behind a virtio-mmio transport in `slot` of the bus.
fn attach<D: VirtioDevice + 'static>(
    bus: &mut Bus,
    mem: &GuestMemory,
    slot: u32,
    device: D,
) -> Arc<Mutex<MmioTransport<D>>> {
    let transport = Arc::new(Mutex::new(MmioTransport::new(device, mem.clone())));
    bus.add_mmio(
        MMIO_BASE + u64::from(slot) * MMIO_DEVICE_SIZE,
        MMIO_DEVICE_SIZE,
        transport.clone(),
    );
    transport
}

/// The saved state of every device of a VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceStates {
    pub serial: SerialDeviceState,
    pub disk: Option<MmioState<BlockState>>,
    pub net: Option<MmioState<NetState>>,
}

/// The complete state of a VM apart from its RAM: what a checkpoint carries besides pages.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmmState {
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DeviceStates,
}

fn check_vcpus(config: &VmConfig) -> Result<(), BuildError> {
    if !(1..=64).contains(&config.vcpus) {
        return Err(BuildError::BadVcpus(config.vcpus));
    }
    Ok(())
}

/// Locks a device whose lock a panicking thread may have poisoned; its registers stay valid.
fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A KVM VM on its memory with its vCPUs, no devices and no state yet (see [`Vmm::prepare`]).
pub struct VmShell {
    vm: Vm,
    vcpus: Vec<Vcpu>,
    msr_indices: Vec<u32>,
    kind: GuestKind,
}

impl VmShell {
    /// Loads `state` (saved from a VM whose RAM this shell's memory now holds) and attaches
    /// `io`'s devices: the VM continues where the saved one stopped. `io` must provide the
    /// same devices the saved VM had; its `kvm_path` is unused (the shell has its VM).
    pub fn restore(self, state: &VmmState, io: HostIo) -> Result<Vmm, BuildError> {
        if state.vcpus.len() != self.vcpus.len() {
            return Err(BuildError::StateMismatch("vCPU count"));
        }
        if io.disk.is_some() != state.devices.disk.is_some()
            || io.net.is_some() != state.devices.net.is_some()
        {
            return Err(BuildError::StateMismatch("device set"));
        }
        let serial = SerialDevice::from_state(&state.devices.serial, io.console)
            .map_err(BuildError::Serial)?;
        let (vmm, _) = self.assemble(serial, io.disk, io.net)?;
        vmm.vm.restore_state(&state.vm)?;
        for (vcpu, saved) in vmm.vcpus.iter().zip(&state.vcpus) {
            lock(vcpu).restore_state(saved)?;
        }
        if let (Some(disk), Some(saved)) = (&vmm.disk, &state.devices.disk) {
            lock(disk).restore_state(saved)?;
        }
        if let (Some(net), Some(saved)) = (&vmm.net, &state.devices.net) {
            lock(net).restore_state(saved)?;
        }
        let parked = state.vcpus.iter().filter(|v| v.parked).count();
        vmm.control.set_parked(parked);
        Ok(vmm)
    }

    /// Puts the devices on the buses: the part boot and restore share after the shell.
    /// Returns the devices' boot-info entries.
    fn assemble(
        self,
        serial: SerialDevice,
        disk: Option<Box<dyn BlockBackend>>,
        net: Option<(Tap, [u8; 6])>,
    ) -> Result<(Vmm, Vec<DeviceInfo>), BuildError> {
        let Self {
            vm,
            vcpus,
            msr_indices,
            kind,
        } = self;
        let mut bus = Bus::default();
        let linux = kind == GuestKind::Linux;
        if linux {
            route_irq(&vm, serial.irq(), acpi::UART_IRQ)?;
        }
        let serial = Arc::new(Mutex::new(serial));
        bus.add_pio(PORT_UART, 8, serial.clone());
        let power = Arc::new(Mutex::new(PowerPorts));
        for (base, len) in PowerPorts::WINDOWS {
            bus.add_pio(base, len, power.clone());
        }
        let batch = ConsoleBatchPort::new(vm.memory().clone(), serial.clone());
        bus.add_pio(PORT_CONSOLE_BATCH, 4, Arc::new(Mutex::new(batch)));
        let mut devices = Vec::new();
        let disk = disk.map(|backend| {
            devices.push(slot_info(DeviceKind::VirtioBlk, SLOT_DISK));
            let block = Block::new(backend, false, "ftvmm-disk");
            attach(&mut bus, vm.memory(), SLOT_DISK, block)
        });
        if let (true, Some(d)) = (linux, &disk) {
            lock(d).set_irq(Some(irq_for(&vm, SLOT_DISK)?));
        }
        let net = match net {
            Some((tap, mac)) => {
                devices.push(slot_info(DeviceKind::VirtioNet, SLOT_NET));
                Some(attach(
                    &mut bus,
                    vm.memory(),
                    SLOT_NET,
                    Net::with_tap(mac, tap)?,
                ))
            }
            None => None,
        };
        if let (true, Some(n)) = (linux, &net) {
            lock(n).set_irq(Some(irq_for(&vm, SLOT_NET)?));
        }
        let vmm = Vmm {
            vm,
            vcpus: vcpus.into_iter().map(|v| Arc::new(Mutex::new(v))).collect(),
            msr_indices,
            threads: Vec::new(),
            control: Arc::new(RunControl::default()),
            bus: Arc::new(bus),
            serial,
            disk,
            net,
        };
        Ok((vmm, devices))
    }
}

/// Routes `evt` to `gsi` of the in-kernel IOAPIC (KVM_IRQFD): a device's interrupt reaches
/// the guest without a VMM thread in between.
fn route_irq(vm: &Vm, evt: &EventFd, gsi: u32) -> Result<(), BuildError> {
    vm.fd()
        .register_irqfd(evt, gsi)
        .map_err(|source| BuildError::Irqfd { gsi, source })
}

/// A fresh interrupt eventfd for the virtio-mmio device in `slot`, routed to its GSI.
fn irq_for(vm: &Vm, slot: u32) -> Result<EventFd, BuildError> {
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    route_irq(vm, &evt, MMIO_FIRST_IRQ + slot)?;
    Ok(evt)
}

/// The `virtio_mmio.device=` entries that describe `devices` on the kernel command line, for
/// kernels built with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES (the DSDT describes them to others).
fn virtio_cmdline(devices: &[DeviceInfo]) -> String {
    devices
        .iter()
        .map(|d| {
            format!(
                " virtio_mmio.device={}K@{:#x}:{}",
                MMIO_DEVICE_SIZE >> 10,
                d.mmio_base,
                d.irq
            )
        })
        .collect()
}

/// A built VM with its vCPU threads.
pub struct Vmm {
    /// Owns the VM fd and guest memory for as long as the vCPUs run.
    vm: Vm,
    vcpus: Vec<Arc<Mutex<Vcpu>>>,
    /// The MSRs saved with each vCPU: KVM's list minus those this host refuses to read.
    msr_indices: Vec<u32>,
    threads: Vec<JoinHandle<()>>,
    control: Arc<RunControl>,
    bus: Arc<Bus>,
    serial: Arc<Mutex<SerialDevice>>,
    disk: Option<Arc<Mutex<MmioTransport<Block>>>>,
    net: Option<Arc<Mutex<MmioTransport<Net>>>>,
}

impl Vmm {
    /// Builds a VM and boots `payload` (an ELF image) into it; the vCPUs start with [`Vmm::start`].
    pub fn boot_payload(config: &VmConfig, payload: &[u8], io: HostIo) -> Result<Self, BuildError> {
        check_vcpus(config)?;
        if config.kind != GuestKind::Payload {
            return Err(BuildError::WrongKind(config.kind));
        }
        // Check the payload before allocating anything, so bad input fails fast.
        memory::check_mem_size(config.mem_size)?;
        boot::check_payload(payload, config.mem_size)?;
        let mem = memory::create_guest_memory(config.mem_size)?;
        let serial = SerialDevice::new(io.console).map_err(BuildError::Serial)?;
        let shell = Self::prepare(config, mem, &io.kvm_path)?;
        let (vmm, devices) = shell.assemble(serial, io.disk, io.net)?;
        let params = BootParams {
            vcpus: config.vcpus,
            tsc_khz: u64::from(lock(&vmm.vcpus[0]).tsc_khz()?),
            devices,
            args: config.args.clone(),
        };
        let entries = boot::load_payload(vmm.vm.memory(), config.mem_size, payload, &params)?;
        for (vcpu, entry) in vmm.vcpus.iter().zip(&entries) {
            lock(vcpu).enter_payload(entry)?;
        }
        Ok(vmm)
    }

    /// Builds a VM and boots a Linux kernel into it: ACPI tables describing the vCPUs, the
    /// UART and the virtio devices, then the kernel, initrd and command line (with
    /// `virtio_mmio.device=` entries appended); the vCPUs start with [`Vmm::start`].
    pub fn boot_linux(config: &VmConfig, boot: &LinuxBoot, io: HostIo) -> Result<Self, BuildError> {
        check_vcpus(config)?;
        if config.kind != GuestKind::Linux {
            return Err(BuildError::WrongKind(config.kind));
        }
        // Check the inputs before allocating anything, so bad input fails fast.
        memory::check_mem_size(config.mem_size)?;
        linux::check(boot)?;
        let mem = memory::create_guest_memory(config.mem_size)?;
        let serial = SerialDevice::new(io.console).map_err(BuildError::Serial)?;
        let shell = Self::prepare(config, mem, &io.kvm_path)?;
        let (vmm, devices) = shell.assemble(serial, io.disk, io.net)?;
        let described: Vec<acpi::MmioDevice> = devices
            .iter()
            .map(|d| acpi::MmioDevice {
                base: d.mmio_base,
                size: MMIO_DEVICE_SIZE,
                irq: d.irq,
            })
            .collect();
        let rsdp = acpi::write_tables(vmm.vm.memory(), config.vcpus, &described)?;
        let boot = LinuxBoot {
            cmdline: format!("{}{}", boot.cmdline, virtio_cmdline(&devices)),
            ..boot.clone()
        };
        let entry = linux::load(vmm.vm.memory(), config.mem_size, &boot, rsdp)?;
        for vcpu in &vmm.vcpus {
            lock(vcpu).setup_linux()?;
        }
        lock(&vmm.vcpus[0]).enter_linux(&entry)?;
        Ok(vmm)
    }

    /// Builds the devices-free part of a VM on `memory`: the KVM VM and its vCPUs. A standby
    /// prepares one while it waits, so that a takeover only loads state and attaches devices.
    pub fn prepare(
        config: &VmConfig,
        memory: GuestMemory,
        kvm_path: &Path,
    ) -> Result<VmShell, BuildError> {
        check_vcpus(config)?;
        let vm = Vm::new(kvm_path, memory)?;
        let linux = config.kind == GuestKind::Linux;
        if linux {
            vm.setup_real_mode();
        }
        let vcpus = (0..config.vcpus)
            .map(|id| Vcpu::new(&vm, id, config.vcpus, linux))
            .collect::<Result<Vec<_>, _>>()?;
        let msr_indices = vcpus[0].readable_msrs(&vm.msr_index_list()?)?;
        Ok(VmShell {
            vm,
            vcpus,
            msr_indices,
            kind: config.kind,
        })
    }

    /// Builds a VM on `memory`, which already holds the guest's RAM as of `state`, and loads
    /// `state` into it: the VM continues where the saved one stopped. `io` must provide the
    /// same devices the saved VM had.
    pub fn restore(
        config: &VmConfig,
        memory: GuestMemory,
        state: &VmmState,
        io: HostIo,
    ) -> Result<Self, BuildError> {
        Self::prepare(config, memory, &io.kvm_path)?.restore(state, io)
    }

    /// Starts one thread per vCPU.    /// Whether the vCPUs run (or ran): [`Vmm::start`] was called.
    pub fn started(&self) -> bool {
        !self.threads.is_empty()
    }

    /// Starts one thread per vCPU.
    pub fn start(&mut self) -> Result<(), BuildError> {
        vcpu::install_kick_handler()?;
        let n = self.vcpus.len();
        for vcpu in &self.vcpus {
            let (vcpu, control, bus) = (vcpu.clone(), self.control.clone(), self.bus.clone());
            let id = vcpu.lock().map(|v| v.id).unwrap_or_default();
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || vcpu::run_thread(vcpu, control, bus, n))
                .map_err(BuildError::Thread)?;
            self.threads.push(thread);
        }
        Ok(())
    }

    fn kick_all(&self) {
        for t in &self.threads {
            // SAFETY: the pthread id belongs to a thread we spawned and have not joined yet.
            unsafe { libc::pthread_kill(t.as_pthread_t(), vcpu::kick_signal()) };
        }
    }

    /// Stops every vCPU outside KVM_RUN and the devices' workers; returns once nothing writes
    /// guest memory any more (or the VM ended).
    pub fn pause(&self) {
        self.control.pause(self.vcpus.len(), || self.kick_all());
        if let Some(net) = &self.net {
            lock(net).pause();
        }
    }

    pub fn resume(&self) {
        if let Some(net) = &self.net {
            lock(net).resume();
        }
        self.control.resume();
    }

    /// Saves every device's state; call while paused.
    pub fn save_devices(&self) -> DeviceStates {
        DeviceStates {
            serial: lock(&self.serial).save_state(),
            disk: self.disk.as_ref().map(|d| lock(d).save_state()),
            net: self.net.as_ref().map(|n| lock(n).save_state()),
        }
    }

    /// Saves the complete VM state (platform, every vCPU, every device); call while paused.
    pub fn save_state(&self) -> Result<VmmState, BuildError> {
        let vcpus = self
            .vcpus
            .iter()
            .map(|v| lock(v).save_state(&self.msr_indices))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(VmmState {
            vm: self.vm.save_state()?,
            vcpus,
            devices: self.save_devices(),
        })
    }

    /// The guest's RAM.
    pub fn memory(&self) -> &GuestMemory {
        self.vm.memory()
    }

    /// Turns KVM's dirty page logging on or off.
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), BuildError> {
        Ok(self.vm.set_dirty_logging(on)?)
    }

    /// The pages written since the last harvest, by vCPUs and devices; exact while paused.
    pub fn harvest_dirty(&self) -> Result<DirtyLog, BuildError> {
        Ok(self.vm.harvest_dirty()?)
    }

    /// Harvests the dirty pages, write-protecting again only those `rearm` picks (see
    /// [`Vm::harvest_dirty_rearming`](crate::vm::Vm::harvest_dirty_rearming)).
    pub fn harvest_dirty_rearming(
        &self,
        rearm: impl FnOnce(&DirtyLog) -> DirtyLog,
    ) -> Result<DirtyLog, BuildError> {
        Ok(self.vm.harvest_dirty_rearming(rearm)?)
    }

    /// The pages the vCPUs dirtied so far that the next harvest takes, counted while they run
    /// (see [`Vm::dirty_count`](crate::vm::Vm::dirty_count)); None where KVM cannot count them.
    pub fn dirty_count(&self) -> Result<Option<usize>, BuildError> {
        Ok(self.vm.dirty_count()?)
    }

    /// Whether the VM has ended.
    pub fn outcome(&self) -> Option<VmOutcome> {
        self.control.outcome()
    }

    /// Ends the VM with `outcome` (if it has none yet) and stops its vCPUs.
    pub fn stop(&self, outcome: VmOutcome) {
        self.control.finish(outcome);
        self.kick_all();
    }

    /// Blocks until the VM ends, then joins its vCPU threads.
    pub fn wait(&mut self) -> VmOutcome {
        let outcome = self.control.wait_outcome();
        self.kick_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        outcome
    }

    /// VM exits served by the device buses so far.
    pub fn exit_counts(&self) -> crate::bus::ExitCounts {
        self.bus.exit_counts()
    }

    /// Puts `wrap` (an output-commit buffer) in front of where the NIC's transmitted frames
    /// go (its tap); false if the VM has no NIC.
    pub fn wrap_net_sink(
        &self,
        wrap: impl FnOnce(Box<dyn FrameSink>) -> Box<dyn FrameSink>,
    ) -> bool {
        self.with_net(|net| net.wrap_sink(wrap))
    }

    /// Puts `wrap` in front of where the NIC's received frames come from (its tap); false if
    /// the VM has no NIC. See [`Net::wrap_source`].
    pub fn wrap_net_source(
        &self,
        wrap: impl FnOnce(Box<dyn FrameSource>) -> Box<dyn FrameSource>,
    ) -> bool {
        self.with_net(|net| net.wrap_source(wrap))
    }

    /// Runs `f` on the NIC's device; false if the VM has none.
    fn with_net(&self, f: impl FnOnce(&mut Net)) -> bool {
        match &self.net {
            Some(net) => {
                f(lock(net).device_mut());
                true
            }
            None => false,
        }
    }

    /// A handle on the NIC for its sink's owner (to wake a stalled TX queue).
    pub fn net_control(&self) -> Option<NetControl> {
        self.net.as_ref().map(|net| lock(net).device().control())
    }
}

impl Drop for Vmm {
    /// Stops and joins the vCPU threads before the guest memory they run on is unmapped.
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop(VmOutcome::Fault("VM dropped while running".into()));
            self.wait();
        }
    }
}
