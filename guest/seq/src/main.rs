//! `seq`: a deterministic sequence emitter, for exactness checks across checkpoints and
//! failovers.
//!
//! Arguments (a contract checked outside the project): `COUNT [PAGES] [WORK]`
//! - `x_0 = 1`; for `i` in `1..=COUNT`: apply `x = x * 6364136223846793005 + 1442695040888963407`
//!   (wrapping) `WORK` times (default 1), store `x` at the start of page `i % PAGES` of a
//!   `PAGES`-page (4 KiB) buffer (default 256), and print `{i} {x:016x}`.
//! - After the last line print `done` and exit 0. Bad arguments: one error line, exit 2.
//!
//! Only vCPU 0 works; the others park at once.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;

use guest_rt::args::parse_u64;
use guest_rt::{println, Ctx};

guest_rt::entry!(main);

const PAGE: usize = 4096;
const MUL: u64 = 6364136223846793005;
const INC: u64 = 1442695040888963407;
/// Lines are flushed once about this many bytes are buffered (one VM exit per batch).
const CONSOLE_BATCH: usize = 1024;

fn usage(msg: &str) -> ! {
    println!("seq: {msg}; usage: seq COUNT [PAGES] [WORK]");
    guest_rt::exit(2)
}

fn main(ctx: &Ctx) {
    if !ctx.is_boot_vcpu() {
        return;
    }
    let mut args = ctx.args();
    let count = match args.next() {
        Some(a) => parse_u64(a).unwrap_or_else(|| usage("COUNT must be a number")),
        None => usage("missing COUNT"),
    };
    let pages = match args.next() {
        Some(a) => match parse_u64(a) {
            Some(p) if (1..=(1 << 22)).contains(&p) => p as usize,
            _ => usage("PAGES must be a number in 1..=4194304"),
        },
        None => 256,
    };
    let work = match args.next() {
        Some(a) => match parse_u64(a) {
            Some(w) if w >= 1 => w,
            _ => usage("WORK must be a number >= 1"),
        },
        None => 1,
    };
    if args.next().is_some() {
        usage("too many arguments");
    }
    // u64 cells so that every page start is naturally aligned.
    let cells = pages * PAGE / 8;
    let mut buffer: Vec<u64> = Vec::new();
    if buffer.try_reserve_exact(cells).is_err() {
        println!("seq: not enough memory for {pages} pages");
        guest_rt::exit(2);
    }
    buffer.resize(cells, 0);
    guest_rt::console::set_batch(CONSOLE_BATCH);
    let mut x: u64 = 1;
    for i in 1..=count {
        for _ in 0..work {
            x = x.wrapping_mul(MUL).wrapping_add(INC);
        }
        let page = (i % pages as u64) as usize;
        let slot: *mut u64 = &mut buffer[page * PAGE / 8];
        // SAFETY: an in-bounds, aligned element of the buffer. Volatile so that the store,
        // which exists only to dirty guest memory, is not optimised away.
        unsafe { slot.write_volatile(x) };
        println!("{i} {x:016x}");
    }
    println!("done");
    guest_rt::console::flush();
    drop(buffer);
}
