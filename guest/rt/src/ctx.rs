//! What a payload's `main` gets: its vCPU, the boot block, and shared helpers.
use guest_abi::{BootInfo, DeviceInfo, DeviceKind};

use crate::sync::Barrier;

/// The barrier of all vCPUs (its size is set from the boot block at start-up).
pub(crate) static ALL_VCPUS: Barrier = Barrier::new(1);

/// The context of one vCPU running the payload.
pub struct Ctx {
    boot: &'static BootInfo,
    vcpu: u32,
}

impl Ctx {
    pub(crate) fn new(boot: &'static BootInfo, vcpu: u32) -> Self {
        Ctx { boot, vcpu }
    }

    /// This vCPU's id (0 is the boot vCPU).
    pub fn vcpu_id(&self) -> u32 {
        self.vcpu
    }

    /// Whether this is vCPU 0.
    pub fn is_boot_vcpu(&self) -> bool {
        self.vcpu == 0
    }

    /// The number of vCPUs in the VM.
    pub fn vcpu_count(&self) -> u32 {
        self.boot.vcpu_count.max(1)
    }

    /// The raw boot block.
    pub fn boot_info(&self) -> &'static BootInfo {
        self.boot
    }

    /// The payload's arguments (invalid UTF-8 arguments are given as "").
    pub fn args(&self) -> impl Iterator<Item = &'static str> {
        self.boot
            .args()
            .map(|a| core::str::from_utf8(a).unwrap_or(""))
    }

    /// The devices ftvmm attached.
    pub fn devices(&self) -> &'static [DeviceInfo] {
        self.boot.devices()
    }

    /// The `index`-th device of `kind` (0 = the first).
    pub fn device(&self, kind: DeviceKind, index: usize) -> Option<DeviceInfo> {
        self.devices()
            .iter()
            .filter(|d| d.kind == kind as u32)
            .nth(index)
            .copied()
    }

    /// Microseconds since start-up (TSC based).
    pub fn now_us(&self) -> u64 {
        crate::clock::now_us()
    }

    /// Milliseconds since start-up (TSC based).
    pub fn now_ms(&self) -> u64 {
        crate::clock::now_ms()
    }

    /// Waits until every vCPU has reached this call (a spin barrier over all vCPUs; every
    /// vCPU must call it the same number of times). Returns `true` on exactly one vCPU.
    pub fn barrier(&self) -> bool {
        ALL_VCPUS.wait()
    }
}
