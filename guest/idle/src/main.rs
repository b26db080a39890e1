//! `idle`: a guest with nothing to do, as a quiet service between requests is: prints `idle`,
//! then naps (off the host CPU) in 10 ms slices, keeping a counter in memory.
//!
//! Arguments: `[SECONDS]`: after that long (guest time) prints `done {naps}` and exits 0; with
//! none it idles until the VM is stopped. Only vCPU 0 works; the others park.
#![no_std]
#![no_main]

use guest_rt::args::parse_u64;
use guest_rt::{println, Ctx};

guest_rt::entry!(main);

const NAP_US: u32 = 10_000;

fn main(ctx: &Ctx) {
    if !ctx.is_boot_vcpu() {
        return;
    }
    let seconds = match ctx.args().next() {
        None => None,
        Some(a) => match parse_u64(a) {
            Some(s) => Some(s),
            None => {
                println!("idle: SECONDS must be a number; usage: idle [SECONDS]");
                guest_rt::exit(2)
            }
        },
    };
    println!("idle");
    let start = ctx.now_us();
    let mut naps: u64 = 0;
    loop {
        if let Some(s) = seconds {
            if ctx.now_us() - start >= s * 1_000_000 {
                println!("done {naps}");
                return;
            }
        }
        guest_rt::nap(NAP_US);
        naps += 1;
    }
}
