//! The runtime of ftvmm payload guests.
//!
//! A payload is a `#![no_std] #![no_main]` binary that declares its entry with
//! [`entry!`]. ftvmm enters every vCPU at `_start` (see [`start`]) in 64-bit long mode at CPL3
//! with the state fixed by [`guest_abi`]; the runtime checks the boot block, sets up the heap
//! once, and calls the payload's `main(&Ctx)` on every vCPU. When `main` returns, vCPU 0 ends
//! the VM with exit code 0 and the other vCPUs park.
//!
//! Every VM exit is expensive here (30-50 us under PVM), so the console and the virtio drivers
//! batch: one `rep outsb` per console flush, one queue notification per batch of requests.
#![no_std]
// Host unit tests leave the start-up, allocator and panic pieces out.
#![cfg_attr(test, allow(dead_code, unused_imports))]

extern crate alloc;

pub mod args;
pub mod clock;
pub mod console;
mod ctx;
mod heap;
pub mod io;
// The pieces below replace what a hosted program gets from std and libc; host unit tests
// (`cargo test`) use std's instead.
#[cfg(not(test))]
mod mem;
#[cfg(not(test))]
mod panic;
pub mod start;
pub mod sync;
pub mod virtio;

pub use ctx::Ctx;
pub use guest_abi as abi;
pub use start::{exit, nap, park};

/// Declares the payload's entry function, `fn main(ctx: &guest_rt::Ctx)`, run on every vCPU.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        /// Called by the runtime on every vCPU once the boot block and heap are ready.
        #[no_mangle]
        pub fn __guest_rt_main(ctx: &$crate::Ctx) {
            let f: fn(&$crate::Ctx) = $main;
            f(ctx)
        }
    };
}
