//! vCPUs: CPU setup, the run loop on a thread of its own, and stopping a running vCPU with a
//! signal whose handler sets `kvm_run.immediate_exit` (a CPL3 guest may spin forever).

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex};

use guest_abi::{MAX_NAP_US, PORT_EXIT, PORT_NAP, PORT_PARK};
use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_run,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_MP_STATE_RUNNABLE,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};

use crate::boot::EntryState;
use crate::bus::Bus;
use crate::devices::power::{power_event, PowerEvent};
use crate::linux::LinuxEntry;
use crate::vm::Vm;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {id}: {what} failed: {source}")]
    Kvm {
        id: u32,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    #[error("vCPU {id}: KVM accepted {set} of {total} MSRs; MSR {index:#x} was refused")]
    MsrRefused {
        id: u32,
        set: usize,
        total: usize,
        index: u32,
    },
    #[error("vCPU {id}: too many MSRs for one KVM call")]
    MsrCount { id: u32 },
}

/// A vCPU's complete architectural state as KVM holds it: enough to continue the vCPU exactly
/// in a fresh VM on the same guest memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u32,
    /// Whether the guest parked this vCPU for good (a payload convention, not KVM state).
    pub parked: bool,
    pub tsc_khz: u32,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM lists that this vCPU can read, the TSC among them.
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
}

/// How a VM run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmOutcome {
    /// The guest wrote its exit code to the exit port, or every vCPU parked (code 0), or a
    /// Linux guest powered off (code 0).
    Exited(i32),
    /// A Linux guest asked for a reset (`reboot`).
    Reset,
    /// A vCPU stopped in a way the guest cannot recover from; the text names the cause and
    /// the vCPU's registers.
    Fault(String),
}

/// One vCPU and whether its guest has parked it for good.
pub struct Vcpu {
    pub id: u32,
    fd: VcpuFd,
    parked: bool,
}

impl Vcpu {
    /// Creates vCPU `id` of `count` with the host's supported CPUID and a reset FPU; for a
    /// Linux guest the CPUID also says "hypervisor", counts the logical CPUs and hides the
    /// PMU (whose MSRs a VM does not virtualise here).
    pub fn new(vm: &Vm, id: u32, count: u32, linux: bool) -> Result<Self, VcpuError> {
        let err = |what| move |source| VcpuError::Kvm { id, what, source };
        let fd = vm
            .fd()
            .create_vcpu(u64::from(id))
            .map_err(err("KVM_CREATE_VCPU"))?;
        let mut cpuid = vm
            .kvm()
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(err("KVM_GET_SUPPORTED_CPUID"))?;
        for entry in cpuid.as_mut_slice() {
            match entry.function {
                // Initial APIC id, so that guests can tell their vCPUs apart.
                1 => {
                    entry.ebx = (entry.ebx & 0x00ff_ffff) | (id << 24);
                    if linux {
                        entry.ebx = (entry.ebx & 0xff00_ffff) | ((count & 0xff) << 16);
                        entry.ecx |= CPUID_1_ECX_HYPERVISOR;
                        if count > 1 {
                            entry.edx |= CPUID_1_EDX_HTT;
                        }
                    }
                }
                0xa if linux => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = 0;
                    entry.edx = 0;
                }
                0xb | 0x1f => entry.edx = id,
                _ => {}
            }
        }
        fd.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;
        fd.set_fpu(&kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        })
        .map_err(err("KVM_SET_FPU"))?;
        Ok(Self {
            id,
            fd,
            parked: false,
        })
    }

    /// Prepares the vCPU for a Linux guest as firmware would: LAPIC LINT0 as ExtINT and LINT1
    /// as NMI, and the boot MSRs (fast strings, write-back MTRR default, syscall MSRs clear).
    /// The boot vCPU then enters the kernel ([`Vcpu::enter_linux`]); the others stay in
    /// wait-for-SIPI, as KVM creates them, until the kernel starts them through its LAPIC.
    pub fn setup_linux(&self) -> Result<(), VcpuError> {
        let mut lapic = self.fd.get_lapic().map_err(self.kvm_err("KVM_GET_LAPIC"))?;
        let set_lvt = |lapic: &mut kvm_lapic_state, reg: usize, mode: u32| {
            let mut raw = [0u8; 4];
            for (d, s) in raw.iter_mut().zip(&lapic.regs[reg..reg + 4]) {
                *d = s.cast_unsigned();
            }
            let v = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
            for (d, s) in lapic.regs[reg..reg + 4].iter_mut().zip(v.to_le_bytes()) {
                *d = s.cast_signed();
            }
        };
        set_lvt(&mut lapic, APIC_LVT0, APIC_MODE_EXTINT);
        set_lvt(&mut lapic, APIC_LVT1, APIC_MODE_NMI);
        self.fd
            .set_lapic(&lapic)
            .map_err(self.kvm_err("KVM_SET_LAPIC"))?;
        for (index, data) in LINUX_BOOT_MSRS {
            let msrs = Msrs::from_entries(&[kvm_msr_entry {
                index,
                data,
                ..Default::default()
            }])
            .map_err(|_| VcpuError::MsrCount { id: self.id })?;
            // One at a time: a host that refuses one (PVM refuses some) must not stop the rest.
            match self.fd.set_msrs(&msrs) {
                Ok(1) => {}
                other => tracing::debug!(vcpu = self.id, index, "boot MSR not set: {other:?}"),
            }
        }
        Ok(())
    }

    /// Puts the boot vCPU at the kernel's entry point.
    pub fn enter_linux(&self, entry: &LinuxEntry) -> Result<(), VcpuError> {
        let sregs = self.fd.get_sregs().map_err(self.kvm_err("KVM_GET_SREGS"))?;
        self.fd
            .set_sregs(&entry.sregs(sregs))
            .map_err(self.kvm_err("KVM_SET_SREGS"))?;
        self.fd
            .set_regs(&entry.regs())
            .map_err(self.kvm_err("KVM_SET_REGS"))?;
        self.fd
            .set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(self.kvm_err("KVM_SET_MP_STATE"))
    }

    /// Puts the vCPU at the payload's entry point; every vCPU, the boot one included, starts
    /// runnable (there is no INIT/SIPI for payloads).
    pub fn enter_payload(&self, entry: &EntryState) -> Result<(), VcpuError> {
        let id = self.id;
        let err = |what| move |source| VcpuError::Kvm { id, what, source };
        let sregs = self.fd.get_sregs().map_err(err("KVM_GET_SREGS"))?;
        self.fd
            .set_sregs(&entry.sregs(sregs))
            .map_err(err("KVM_SET_SREGS"))?;
        self.fd
            .set_regs(&entry.regs())
            .map_err(err("KVM_SET_REGS"))?;
        self.fd
            .set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(err("KVM_SET_MP_STATE"))
    }

    fn kvm_err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let id = self.id;
        move |source| VcpuError::Kvm { id, what, source }
    }

    /// Those of `indices` (KVM's MSR list) that KVM lets this vCPU read; some listed MSRs
    /// are refused on some hosts, and KVM_GET_MSRS stops at the first refusal.
    pub fn readable_msrs(&self, indices: &[u32]) -> Result<Vec<u32>, VcpuError> {
        let mut readable = Vec::with_capacity(indices.len());
        let mut rest = indices;
        while !rest.is_empty() {
            let mut msrs = msr_request(self.id, rest)?;
            let n = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(self.kvm_err("KVM_GET_MSRS"))?;
            readable.extend_from_slice(&rest[..n]);
            // Skip the refused MSR and go on after it.
            rest = rest.get(n + 1..).unwrap_or_default();
        }
        Ok(readable)
    }

    /// Saves the vCPU's state; the vCPU must be out of KVM_RUN.
    pub fn save_state(&self, msr_indices: &[u32]) -> Result<VcpuState, VcpuError> {
        let mut msrs = msr_request(self.id, msr_indices)?;
        let n = self
            .fd
            .get_msrs(&mut msrs)
            .map_err(self.kvm_err("KVM_GET_MSRS"))?;
        if n != msr_indices.len() {
            return Err(VcpuError::MsrRefused {
                id: self.id,
                set: n,
                total: msr_indices.len(),
                index: msr_indices[n],
            });
        }
        Ok(VcpuState {
            id: self.id,
            parked: self.parked,
            tsc_khz: self.tsc_khz()?,
            mp_state: self
                .fd
                .get_mp_state()
                .map_err(self.kvm_err("KVM_GET_MP_STATE"))?,
            regs: self.fd.get_regs().map_err(self.kvm_err("KVM_GET_REGS"))?,
            sregs: self.fd.get_sregs().map_err(self.kvm_err("KVM_GET_SREGS"))?,
            xsave: self.fd.get_xsave().map_err(self.kvm_err("KVM_GET_XSAVE"))?,
            xcrs: self.fd.get_xcrs().map_err(self.kvm_err("KVM_GET_XCRS"))?,
            debugregs: self
                .fd
                .get_debug_regs()
                .map_err(self.kvm_err("KVM_GET_DEBUGREGS"))?,
            lapic: self.fd.get_lapic().map_err(self.kvm_err("KVM_GET_LAPIC"))?,
            msrs: msrs.as_slice().to_vec(),
            events: self
                .fd
                .get_vcpu_events()
                .map_err(self.kvm_err("KVM_GET_VCPU_EVENTS"))?,
        })
    }

    /// Loads a saved state into this (freshly created) vCPU. The order follows what KVM needs:
    /// TSC rate first; sregs (EFER, CR4) before the xsave and MSRs that depend on them; LAPIC
    /// before MSRs (the APIC base); pending events last.
    pub fn restore_state(&mut self, state: &VcpuState) -> Result<(), VcpuError> {
        if state.tsc_khz != self.tsc_khz()? {
            self.fd
                .set_tsc_khz(state.tsc_khz)
                .map_err(self.kvm_err("KVM_SET_TSC_KHZ"))?;
        }
        self.fd
            .set_mp_state(state.mp_state)
            .map_err(self.kvm_err("KVM_SET_MP_STATE"))?;
        self.fd
            .set_regs(&state.regs)
            .map_err(self.kvm_err("KVM_SET_REGS"))?;
        self.fd
            .set_sregs(&state.sregs)
            .map_err(self.kvm_err("KVM_SET_SREGS"))?;
        // SAFETY: the buffer came from KVM_GET_XSAVE on a vCPU with the same CPUID, so it has
        // the layout KVM expects; KVM validates it again.
        unsafe { self.fd.set_xsave(&state.xsave) }.map_err(self.kvm_err("KVM_SET_XSAVE"))?;
        self.fd
            .set_xcrs(&state.xcrs)
            .map_err(self.kvm_err("KVM_SET_XCRS"))?;
        self.fd
            .set_debug_regs(&state.debugregs)
            .map_err(self.kvm_err("KVM_SET_DEBUGREGS"))?;
        self.fd
            .set_lapic(&state.lapic)
            .map_err(self.kvm_err("KVM_SET_LAPIC"))?;
        let msrs =
            Msrs::from_entries(&state.msrs).map_err(|_| VcpuError::MsrCount { id: self.id })?;
        let n = self
            .fd
            .set_msrs(&msrs)
            .map_err(self.kvm_err("KVM_SET_MSRS"))?;
        if n != state.msrs.len() {
            return Err(VcpuError::MsrRefused {
                id: self.id,
                set: n,
                total: state.msrs.len(),
                index: state.msrs[n].index,
            });
        }
        self.fd
            .set_vcpu_events(&state.events)
            .map_err(self.kvm_err("KVM_SET_VCPU_EVENTS"))?;
        self.parked = state.parked;
        Ok(())
    }

    /// The guest TSC frequency in kHz.
    pub fn tsc_khz(&self) -> Result<u32, VcpuError> {
        self.fd.get_tsc_khz().map_err(|source| VcpuError::Kvm {
            id: self.id,
            what: "KVM_GET_TSC_KHZ",
            source,
        })
    }

    /// Runs the guest until the next exit that needs the VMM and handles it.
    fn run_once(&mut self, bus: &Bus) -> Step {
        let step = match self.fd.run() {
            Ok(VcpuExit::IoOut(PORT_EXIT, data)) => Step::Exit(exit_code(data)),
            Ok(VcpuExit::IoOut(PORT_PARK, _)) => Step::Park,
            Ok(VcpuExit::IoOut(PORT_NAP, data)) => {
                let us = data
                    .first_chunk::<4>()
                    .map_or(0, |b| u32::from_le_bytes(*b))
                    .min(MAX_NAP_US);
                Step::Nap(std::time::Duration::from_micros(u64::from(us)))
            }
            Ok(VcpuExit::IoOut(port, data)) => match power_event(port, data) {
                Some(event) => Step::Power(event),
                None => {
                    bus.pio_write(port, data);
                    Step::Handled
                }
            },
            Ok(VcpuExit::IoIn(port, data)) => {
                bus.pio_read(port, data);
                Step::Handled
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                bus.mmio_write(addr, data);
                Step::Handled
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                bus.mmio_read(addr, data);
                Step::Handled
            }
            Ok(VcpuExit::Shutdown) => Step::Fault("triple fault (KVM_EXIT_SHUTDOWN)".into()),
            Ok(VcpuExit::Hlt) => Step::Fault("hlt with interrupts off".into()),
            Ok(other) => Step::Fault(format!("unhandled VM exit {other:?}")),
            // Kicked: the run loop looks at the pause and outcome flags next.
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Step::Continue,
            Err(e) => Step::Fault(format!("KVM_RUN failed: {e}")),
        };
        match step {
            Step::Fault(reason) => {
                Step::Fault(format!("vCPU {}: {reason}; {}", self.id, self.dump()))
            }
            step => step,
        }
    }

    /// Lets KVM finish the instruction of the last I/O exit without running the guest further
    /// (KVM_RUN with `immediate_exit` set): until then the saved registers would point at an
    /// instruction that a restored VM would execute twice.
    fn complete_pending_io(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => {}
            other => tracing::warn!(vcpu = self.id, "completing an I/O exit gave {other:?}"),
        }
        self.fd.set_kvm_immediate_exit(0);
    }

    /// A one-line register dump for fault reports.
    fn dump(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} \
                 rsi={:#x} rdi={:#x} rbp={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} \
                 efer={:#x} cs={:#x}",
                r.rip,
                r.rsp,
                r.rflags,
                r.rax,
                r.rbx,
                r.rcx,
                r.rdx,
                r.rsi,
                r.rdi,
                r.rbp,
                s.cr0,
                s.cr2,
                s.cr3,
                s.cr4,
                s.efer,
                s.cs.selector
            ),
            (Err(e), _) | (_, Err(e)) => format!("registers unavailable: {e}"),
        }
    }
}

const CPUID_1_ECX_HYPERVISOR: u32 = 1 << 31;
const CPUID_1_EDX_HTT: u32 = 1 << 28;
/// LAPIC register offsets of LVT LINT0 and LINT1, and their delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;
/// The MSRs a VMM sets before entering a Linux kernel (the values firmware leaves).
const LINUX_BOOT_MSRS: [(u32, u64); 11] = [
    (0x174, 0),             // IA32_SYSENTER_CS
    (0x175, 0),             // IA32_SYSENTER_ESP
    (0x176, 0),             // IA32_SYSENTER_EIP
    (0xc000_0081, 0),       // STAR
    (0xc000_0082, 0),       // LSTAR
    (0xc000_0083, 0),       // CSTAR
    (0xc000_0084, 0),       // SYSCALL_MASK
    (0xc000_0102, 0),       // KERNEL_GS_BASE
    (0x10, 0),              // IA32_TSC
    (0x1a0, 1),             // IA32_MISC_ENABLE: fast strings
    (0x2ff, (1 << 11) | 6), // MTRRdefType: enabled, write-back
];

/// A KVM_GET/SET_MSRS buffer naming `indices`.
fn msr_request(id: u32, indices: &[u32]) -> Result<Msrs, VcpuError> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).map_err(|_| VcpuError::MsrCount { id })
}

fn exit_code(data: &[u8]) -> i32 {
    let mut raw = [0u8; 4];
    let n = data.len().min(4);
    raw[..n].copy_from_slice(&data[..n]);
    i32::from_le_bytes(raw)
}

enum Step {
    /// Kicked out of the guest, nothing pending.
    Continue,
    /// An I/O exit was served; KVM completes the instruction on the next KVM_RUN.
    Handled,
    Park,
    /// The guest has nothing to do for this long.
    Nap(std::time::Duration),
    Exit(i32),
    /// A Linux guest powered off or reset.
    Power(PowerEvent),
    Fault(String),
}

/// Pause requests and the VM's outcome, shared by the controller and every vCPU thread.
#[derive(Default)]
pub struct RunControl {
    state: Mutex<RunState>,
    changed: Condvar,
}

#[derive(Default)]
struct RunState {
    pause: bool,
    /// vCPU threads waiting (paused or parked), not inside KVM_RUN.
    idle: usize,
    parked: usize,
    outcome: Option<VmOutcome>,
}

impl RunControl {
    fn lock(&self) -> std::sync::MutexGuard<'_, RunState> {
        // A poisoned lock means a vCPU thread panicked; the state itself stays consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the outcome unless one is set already; returns whether this call set it.
    pub fn finish(&self, outcome: VmOutcome) -> bool {
        let mut st = self.lock();
        let first = st.outcome.is_none();
        if first {
            st.outcome = Some(outcome);
            self.changed.notify_all();
        }
        first
    }

    /// Blocks until the VM has an outcome.
    pub fn wait_outcome(&self) -> VmOutcome {
        let mut st = self.lock();
        loop {
            if let Some(o) = &st.outcome {
                return o.clone();
            }
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Asks every vCPU to stop and waits until all `n` are out of KVM_RUN (or the VM ended).
    pub fn pause(&self, n: usize, kick: impl Fn()) {
        let mut st = self.lock();
        st.pause = true;
        drop(st);
        // Wakes vCPUs napping outside KVM_RUN; the kick stops those inside it.
        self.changed.notify_all();
        kick();
        let mut st = self.lock();
        while st.idle < n && st.outcome.is_none() {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The VM's outcome, if it has ended.
    pub fn outcome(&self) -> Option<VmOutcome> {
        self.lock().outcome.clone()
    }

    /// Counts vCPUs that a restored state holds parked already.
    pub fn set_parked(&self, parked: usize) {
        self.lock().parked = parked;
    }

    pub fn resume(&self) {
        self.lock().pause = false;
        self.changed.notify_all();
    }

    /// Waits off the CPU for `nap`, or less if a pause is asked for or the VM ends meanwhile
    /// (a pause must not wait for a napping guest).
    fn nap(&self, nap: std::time::Duration) {
        let deadline = std::time::Instant::now() + nap;
        let mut st = self.lock();
        while !st.pause && st.outcome.is_none() {
            let now = std::time::Instant::now();
            if now >= deadline {
                break;
            }
            st = self
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Whether a vCPU thread must not enter KVM_RUN now.
    fn must_wait(&self, parked: bool) -> bool {
        let st = self.lock();
        st.pause || parked || st.outcome.is_some()
    }

    /// Called by a vCPU thread between exits: waits while the VM is paused or the vCPU parked;
    /// returns false once the VM has ended.
    fn wait_runnable(&self, parked: bool) -> bool {
        let mut st = self.lock();
        if !(st.pause || parked) || st.outcome.is_some() {
            return st.outcome.is_none();
        }
        st.idle += 1;
        self.changed.notify_all();
        while (st.pause || parked) && st.outcome.is_none() {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.idle -= 1;
        st.outcome.is_none()
    }

    /// Records that a vCPU parked; returns whether all `n` have.
    fn park(&self, n: usize) -> bool {
        let mut st = self.lock();
        st.parked += 1;
        st.parked == n
    }
}

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set before the thread first
        // entered KVM_RUN and valid while its VcpuFd lives (the thread owns a reference to it).
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// The signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the kick handler (idempotent).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
        .map_err(VcpuError::Signal)
}

/// The body of a vCPU thread: runs until the VM has an outcome.
pub fn run_thread(vcpu: Arc<Mutex<Vcpu>>, control: Arc<RunControl>, bus: Arc<Bus>, n: usize) {
    let mut parked = {
        let mut v = vcpu.lock().unwrap_or_else(|e| e.into_inner());
        // A vCPU restored from a checkpoint may already be parked.
        let run: *mut kvm_run = v.fd.get_kvm_run();
        KVM_RUN.with(|c| c.set(run));
        v.parked
    };
    // Whether KVM still has to complete the instruction of the last I/O exit.
    let mut pending_io = false;
    loop {
        if pending_io && control.must_wait(parked) {
            // About to stop: make the registers a checkpoint would save consistent first.
            vcpu.lock()
                .unwrap_or_else(|e| e.into_inner())
                .complete_pending_io();
            pending_io = false;
        }
        if !control.wait_runnable(parked) {
            break;
        }
        let mut v = vcpu.lock().unwrap_or_else(|e| e.into_inner());
        // Clear a kick that arrived while waiting, then look at the flags again: a pause
        // requested before the clear is seen here, one after it makes KVM_RUN return at once.
        v.fd.set_kvm_immediate_exit(0);
        if control.must_wait(parked) {
            continue;
        }
        match v.run_once(&bus) {
            Step::Continue => {}
            Step::Handled => pending_io = true,
            Step::Nap(nap) => {
                pending_io = true;
                // Not holding the vCPU: a checkpoint saves its registers meanwhile.
                drop(v);
                control.nap(nap);
            }
            Step::Park => {
                v.parked = true;
                parked = true;
                pending_io = true;
                tracing::debug!(vcpu = v.id, "vCPU parked");
                if control.park(n) {
                    control.finish(VmOutcome::Exited(0));
                }
            }
            Step::Exit(code) => {
                pending_io = true;
                control.finish(VmOutcome::Exited(code));
            }
            Step::Power(event) => {
                pending_io = true;
                tracing::info!(vcpu = v.id, ?event, "guest power event");
                control.finish(match event {
                    PowerEvent::PowerOff => VmOutcome::Exited(0),
                    PowerEvent::Reset => VmOutcome::Reset,
                });
            }
            Step::Fault(reason) => {
                control.finish(VmOutcome::Fault(reason));
            }
        }
    }
    if pending_io {
        vcpu.lock()
            .unwrap_or_else(|e| e.into_inner())
            .complete_pending_io();
    }
    KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
}
