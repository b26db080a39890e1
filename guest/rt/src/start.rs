//! Start-up: `_start`, boot-block checks, one-time initialisation, and the end of a vCPU.
use core::sync::atomic::{AtomicBool, Ordering};

use guest_abi::{BootInfo, BOOT_INFO_MAGIC, PORT_EXIT, PORT_NAP, PORT_PARK};

use crate::ctx::{Ctx, ALL_VCPUS};
use crate::io::outl;

/// Exit code when the boot block is missing or malformed.
pub const BAD_BOOT_EXIT_CODE: u32 = 3;

// Every vCPU enters here (rdi = &BootInfo, rsi = vCPU id, rsp = its stack top). The stack is
// re-aligned defensively so that the Rust entry sees the ABI's alignment after the `call`,
// and rbp is zeroed to end frame-pointer walks.
#[cfg(not(test))]
core::arch::global_asm!(
    ".globl _start",
    ".type _start,@function",
    "_start:",
    "and rsp, -16",
    "xor ebp, ebp",
    "call {entry}",
    "ud2",
    entry = sym rt_entry,
);

/// Set by vCPU 0 once the clock and heap are ready; the other vCPUs wait for it.
static READY: AtomicBool = AtomicBool::new(false);

#[cfg(not(test))]
extern "Rust" {
    /// Defined by the payload through [`crate::entry!`].
    fn __guest_rt_main(ctx: &Ctx);
}

#[cfg(not(test))]
extern "C" fn rt_entry(boot: *const BootInfo, vcpu: u64) -> ! {
    let aligned =
        !boot.is_null() && (boot as usize).is_multiple_of(core::mem::align_of::<BootInfo>());
    // SAFETY: the ABI says rdi points to the boot block, identity-mapped and never written
    // again by anyone; we only read the magic after checking the pointer is plausible.
    if !aligned || unsafe { (*boot).magic } != BOOT_INFO_MAGIC {
        crate::console::emergency(format_args!("guest-rt: bad boot info at {:p}\n", boot));
        exit(BAD_BOOT_EXIT_CODE);
    }
    // SAFETY: checked above; the block lives for the whole run and is read-only for us.
    let boot: &'static BootInfo = unsafe { &*boot };
    let vcpu = vcpu as u32;
    if vcpu == 0 {
        crate::clock::init(boot.tsc_khz);
        crate::console::init();
        // SAFETY: only vCPU 0 gets here, once, before anything allocates (the others wait
        // for READY below).
        unsafe { crate::heap::init(boot) };
        ALL_VCPUS.set_parties(boot.vcpu_count);
        READY.store(true, Ordering::Release);
    } else {
        while !READY.load(Ordering::Acquire) {
            core::hint::spin_loop();
        }
    }
    let ctx = Ctx::new(boot, vcpu);
    // SAFETY: the payload defines this function with the signature above via `entry!`.
    unsafe { __guest_rt_main(&ctx) };
    if vcpu == 0 {
        exit(0)
    } else {
        park()
    }
}

/// Flushes the console and ends the VM with `code`.
pub fn exit(code: u32) -> ! {
    crate::console::try_flush();
    outl(PORT_EXIT, code);
    // The VMM stops all vCPUs; do nothing until it does.
    loop {
        core::hint::spin_loop();
    }
}

/// Flushes the console and parks this vCPU for good (the VM ends when every vCPU has parked).
pub fn park() -> ! {
    crate::console::try_flush();
    outl(PORT_PARK, 0);
    loop {
        core::hint::spin_loop();
    }
}

/// Naps this vCPU off the host CPU for up to `us` microseconds (see [`PORT_NAP`]); it may
/// return sooner. For guests that poll, when a round found nothing to do.
pub fn nap(us: u32) {
    outl(PORT_NAP, us);
}
