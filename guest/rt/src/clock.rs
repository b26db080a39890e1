//! Time from the TSC, scaled by the frequency ftvmm reports in the boot block.
use core::sync::atomic::{AtomicU64, Ordering};

static TSC_KHZ: AtomicU64 = AtomicU64::new(0);
static TSC_START: AtomicU64 = AtomicU64::new(0);

/// Records the TSC frequency and the boot time stamp (vCPU 0, at start-up).
pub(crate) fn init(tsc_khz: u64) {
    // A missing frequency would divide by zero; assume 1 GHz rather than fail.
    TSC_KHZ.store(
        if tsc_khz == 0 { 1_000_000 } else { tsc_khz },
        Ordering::Relaxed,
    );
    TSC_START.store(rdtsc(), Ordering::Relaxed);
}

/// Reads the time-stamp counter.
#[inline]
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc only reads the TSC (CR4.TSD is clear, so it is allowed at CPL3).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The TSC frequency in kHz.
pub fn tsc_khz() -> u64 {
    TSC_KHZ.load(Ordering::Relaxed)
}

/// Converts a TSC tick count to microseconds.
pub fn ticks_to_us(ticks: u64) -> u64 {
    let khz = tsc_khz().max(1);
    (ticks as u128 * 1000 / khz as u128) as u64
}

/// Microseconds since the runtime started.
pub fn now_us() -> u64 {
    ticks_to_us(rdtsc().wrapping_sub(TSC_START.load(Ordering::Relaxed)))
}

/// Milliseconds since the runtime started.
pub fn now_ms() -> u64 {
    now_us() / 1000
}
