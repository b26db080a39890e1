//! `journal`: a database-style write-ahead log on the virtio-blk disk (the record format is
//! documented in the `journal` library crate, `src/lib.rs`: record `n` in sector `n`, magic
//! `FTJR`, seq, payload, CRC32C).
//!
//! Arguments (a contract checked outside the project):
//! - `COUNT [batch=N]`: appends records `0..COUNT` from the start of the disk, N per batch
//!   (default 16). Each batch is one multi-sector write (one queue notification) then one
//!   flush; after each flush prints `committed {n}` (records durable so far). At the end
//!   prints `done {COUNT} records in {us} us` (guest TSC time of the writes and flushes) and
//!   exits 0.
//! - `verify`: reads the disk from sector 0 and prints `ok {n}` (n valid consecutive records,
//!   ended by a blank all-zero sector or the end of the disk), exit 0, or `corrupt at {n}`
//!   when sector n is neither a valid record nor blank, exit 1.
//!
//! Errors, each one line: bad arguments (no disk, COUNT unparsable or larger than the disk,
//! bad batch) `journal: ...; usage: ...`, exit 2; a device error `journal: write failed at
//! record {n}: ...` (n: the first record of the failed batch) or `journal: read failed at
//! record {n}: ...`, exit 3.
//!
//! Only vCPU 0 works; the others park at once.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;

use guest_rt::abi::DeviceKind;
use guest_rt::args::{key_value, parse_u64};
use guest_rt::virtio::blk::VirtioBlk;
use guest_rt::{println, Ctx};
use journal::{check, encode, Check, RECORD_SIZE};

guest_rt::entry!(main);

const DEFAULT_BATCH: u64 = 16;
/// Largest batch (records; 32 MiB of buffer).
const MAX_BATCH: u64 = 65536;
/// Sectors read per request batch by `verify` (128 KiB).
const VERIFY_CHUNK: u64 = 256;
/// Console lines are flushed once about this many bytes are buffered (one VM exit per batch
/// of lines instead of one per line; a `committed` line is still only printed after its flush).
const CONSOLE_BATCH: usize = 1024;

const EXIT_CORRUPT: u32 = 1;
const EXIT_USAGE: u32 = 2;
const EXIT_IO: u32 = 3;

enum Mode {
    Append { count: u64, batch: u64 },
    Verify,
}

fn usage(msg: &str) -> ! {
    println!("journal: {msg}; usage: journal COUNT [batch=N] | journal verify");
    guest_rt::exit(EXIT_USAGE)
}

fn parse(ctx: &Ctx) -> Mode {
    let mut args = ctx.args();
    let mode = match args.next() {
        None => usage("missing COUNT or verify"),
        Some("verify") => Mode::Verify,
        Some(a) => {
            let count = parse_u64(a).unwrap_or_else(|| usage("COUNT must be a number"));
            Mode::Append {
                count,
                batch: DEFAULT_BATCH,
            }
        }
    };
    match mode {
        Mode::Verify => {
            if args.next().is_some() {
                usage("verify takes no arguments");
            }
            Mode::Verify
        }
        Mode::Append { count, mut batch } => {
            for arg in args {
                match key_value(arg) {
                    ("batch", Some(v)) => match parse_u64(v) {
                        Some(b) if (1..=MAX_BATCH).contains(&b) => batch = b,
                        _ => usage("batch must be a number in 1..=65536"),
                    },
                    _ => usage("unknown argument"),
                }
            }
            Mode::Append { count, batch }
        }
    }
}

fn main(ctx: &Ctx) {
    if !ctx.is_boot_vcpu() {
        return;
    }
    let mode = parse(ctx);
    let Some(dev) = ctx.device(DeviceKind::VirtioBlk, 0) else {
        usage("no disk attached (ftvmm run --disk IMG)");
    };
    // SAFETY: the first virtio-blk window ftvmm listed, and nothing else drives it.
    let mut blk = match unsafe { VirtioBlk::new(dev.mmio_base) } {
        Ok(blk) => blk,
        Err(e) => {
            println!("journal: cannot initialise virtio-blk: {e}");
            guest_rt::exit(EXIT_IO);
        }
    };
    guest_rt::console::set_batch(CONSOLE_BATCH);
    match mode {
        Mode::Append { count, batch } => append(ctx, &mut blk, count, batch),
        Mode::Verify => verify(&mut blk),
    }
    guest_rt::console::flush();
}

fn append(ctx: &Ctx, blk: &mut VirtioBlk, count: u64, batch: u64) {
    let sectors = blk.capacity_sectors();
    if count > sectors {
        usage("COUNT is larger than the disk (one 512-byte sector per record)");
    }
    if blk.read_only() {
        usage("the disk is read-only");
    }
    let batch = batch.min(count.max(1));
    let mut buf: Vec<u8> = Vec::new();
    let bytes = batch as usize * RECORD_SIZE;
    if buf.try_reserve_exact(bytes).is_err() {
        usage("not enough memory for the batch");
    }
    buf.resize(bytes, 0);
    let start = ctx.now_us();
    let mut n = 0u64;
    while n < count {
        let k = batch.min(count - n);
        let data = &mut buf[..k as usize * RECORD_SIZE];
        for (i, record) in data.chunks_exact_mut(RECORD_SIZE).enumerate() {
            encode(n + i as u64, record);
        }
        // One request batch (one notification) for the records, then one for the flush: the
        // flush must be a later batch to be ordered after the writes.
        let written = blk
            .write(n, data)
            .map_err(|e| (e, ""))
            .and_then(|()| blk.flush().map_err(|e| (e, "flush: ")));
        if let Err((e, what)) = written {
            println!("journal: write failed at record {n}: {what}{e}");
            guest_rt::exit(EXIT_IO);
        }
        n += k;
        println!("committed {n}");
    }
    let us = ctx.now_us() - start;
    println!("done {count} records in {us} us");
}

fn verify(blk: &mut VirtioBlk) {
    let sectors = blk.capacity_sectors();
    let mut buf: Vec<u8> = alloc::vec![0u8; VERIFY_CHUNK as usize * RECORD_SIZE];
    let mut n = 0u64;
    while n < sectors {
        let k = VERIFY_CHUNK.min(sectors - n);
        let data = &mut buf[..k as usize * RECORD_SIZE];
        if let Err(e) = blk.read(n, data) {
            println!("journal: read failed at record {n}: {e}");
            guest_rt::exit(EXIT_IO);
        }
        for sector in data.chunks_exact(RECORD_SIZE) {
            match check(n, sector) {
                Check::Valid => n += 1,
                Check::Blank => {
                    println!("ok {n}");
                    return;
                }
                Check::Corrupt => {
                    println!("corrupt at {n}");
                    guest_rt::exit(EXIT_CORRUPT);
                }
            }
        }
    }
    println!("ok {n}");
}
