//! x86 port I/O. Legal at CPL3 because ftvmm sets IOPL=3 and gives the TSS an all-clear I/O
//! permission bitmap (which PVM's emulator honours). Each access is a VM exit.
use core::arch::asm;

/// Writes a 32-bit value to `port`.
#[inline]
pub fn outl(port: u16, value: u32) {
    // SAFETY: port I/O has no memory effects and is allowed at CPL3 (see the module comment).
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Writes `bytes` to `port` with `rep outsb`. Measured here: KVM emulates it one byte per VM
/// exit (30-50 us each), so it is only the fallback; see [`guest_abi::PORT_CONSOLE_BATCH`].
#[inline]
pub fn outsb(port: u16, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    // SAFETY: `rep outsb` reads exactly `bytes.len()` bytes starting at `bytes.as_ptr()`, which
    // the slice guarantees readable. DF is clear per the ABI (and the Rust ABI).
    unsafe {
        asm!(
            "rep outsb",
            in("dx") port,
            inout("rsi") bytes.as_ptr() => _,
            inout("rcx") bytes.len() => _,
            options(readonly, nostack, preserves_flags)
        )
    }
}

/// Reads a 32-bit value from `port`.
#[inline]
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as in `outl`.
    unsafe {
        asm!("in eax, dx", out("eax") value, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    value
}
