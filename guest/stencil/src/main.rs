//! `stencil`: 2-D heat diffusion (Jacobi, 5-point) on an N x N grid of f64, the scientific
//! workload. Two grid buffers, so the footprint is `2 * N * N * 8` bytes, and every step
//! rewrites one whole buffer (`N * N * 8` bytes dirtied per step). Rows are split over every
//! vCPU, with a spin barrier between steps. The kernel is `stencil-core`, which the host runs
//! natively for the reference checksum (`stencil_core::reference_checksum(n, steps)`).
//!
//! Arguments (any order, all optional):
//! - `n=N`        grid side, N >= 3 (default 512)
//! - `steps=S`    number of Jacobi steps (default 1000)
//! - `report=R`   print `step {s} center {value}` every R steps (default 100; 0: never)
//! - `time`       print `time_us {t}`: TSC microseconds for the S steps, and add `t_us {t}`
//!   (microseconds since the first step) to each progress line (benchmarks; not
//!   deterministic, hence opt-in)
//! - `disk=off`   do not write the result even if a virtio-blk disk is attached
//!
//! Output, in order: the progress lines, `time_us {t}` (with `time`), `disk written {bytes}`
//! (with a disk; with `time` also `disk_time_us {t}`: device init, writes and flush), and last `checksum {16 hex digits}` (`stencil_core::checksum` of the final
//! grid: bit-identical for any vCPU count). Exit 0; bad arguments: one error line, exit 2;
//! disk error: `disk error: ...` (the checksum line still follows), exit 1.
//!
//! Disk layout (when a disk is attached): sector 0 is a header of little-endian u64s:
//! magic `b"FTVSTNC1"`, n, steps, checksum, rows stored, bytes per cell (8); zero-padded. From
//! byte 512: the first `rows` rows of the final grid (f64 little endian, row-major), as many
//! whole rows as the disk holds, zero-padded to a sector. Then a flush.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::alloc::{alloc, Layout};
use core::sync::atomic::{AtomicPtr, Ordering};

use guest_rt::abi::DeviceKind;
use guest_rt::args::{key_value, parse_u64};
use guest_rt::clock::{rdtsc, ticks_to_us};
use guest_rt::virtio::blk::{VirtioBlk, SECTOR_SIZE};
use guest_rt::{println, Ctx};

guest_rt::entry!(main);

/// Magic at the start of the result header on disk.
const DISK_MAGIC: &[u8; 8] = b"FTVSTNC1";

struct Params {
    n: usize,
    steps: u64,
    report: u64,
    time: bool,
    disk: bool,
}

fn usage(msg: &str) -> ! {
    println!("stencil: {msg}; usage: stencil [n=N] [steps=S] [report=R] [time] [disk=on|off]");
    guest_rt::exit(2)
}

fn parse(ctx: &Ctx) -> Params {
    let mut p = Params {
        n: 512,
        steps: 1000,
        report: 100,
        time: false,
        disk: true,
    };
    for arg in ctx.args() {
        let number = |v: Option<&str>| {
            v.and_then(parse_u64)
                .unwrap_or_else(|| usage("expected key=NUMBER"))
        };
        match key_value(arg) {
            ("n", v) => p.n = number(v).try_into().unwrap_or(usize::MAX),
            ("steps", v) => p.steps = number(v),
            ("report", v) => p.report = number(v),
            ("time", None) => p.time = true,
            ("disk", Some("on")) => p.disk = true,
            ("disk", Some("off")) => p.disk = false,
            _ => usage("unknown argument"),
        }
    }
    if p.n < stencil_core::MIN_N || p.n > 1 << 20 {
        usage("n must be in 3..=1048576");
    }
    p
}

/// The two grid buffers, allocated by vCPU 0 and published to the others.
static GRID_A: AtomicPtr<f64> = AtomicPtr::new(core::ptr::null_mut());
static GRID_B: AtomicPtr<f64> = AtomicPtr::new(core::ptr::null_mut());

fn allocate_grid(n: usize) -> *mut f64 {
    let layout = Layout::array::<f64>(n * n)
        .and_then(|l| l.align_to(4096))
        .unwrap_or_else(|_| usage("grid too large"));
    // SAFETY: non-zero size (n >= 3). Never freed: the grid lives until the VM exits.
    let ptr = unsafe { alloc(layout) } as *mut f64;
    if ptr.is_null() {
        println!(
            "stencil: not enough memory for two {n}x{n} grids ({} MiB)",
            (2 * layout.size()) >> 20
        );
        guest_rt::exit(2);
    }
    ptr
}

fn main(ctx: &Ctx) {
    let p = parse(ctx);
    let n = p.n;
    let (vcpus, me) = (ctx.vcpu_count() as usize, ctx.vcpu_id() as usize);
    if ctx.is_boot_vcpu() {
        GRID_A.store(allocate_grid(n), Ordering::Relaxed);
        GRID_B.store(allocate_grid(n), Ordering::Relaxed);
    }
    ctx.barrier(); // publishes the pointers
    let (a, b) = (
        GRID_A.load(Ordering::Relaxed),
        GRID_B.load(Ordering::Relaxed),
    );
    let rows = stencil_core::row_range(n, vcpus, me);

    // Each vCPU initialises its own rows of both buffers (vCPU 0 also the border rows), so
    // the pages are first touched by the vCPU that will write them.
    for grid in [a, b] {
        // SAFETY: each vCPU writes a disjoint set of rows; nobody reads before the barrier.
        let all = unsafe { core::slice::from_raw_parts_mut(grid, n * n) };
        stencil_core::init_rows(all, n, rows.clone());
        if me == 0 {
            stencil_core::init_rows(all, n, 0..1);
            stencil_core::init_rows(all, n, n - 1..n);
        }
    }
    ctx.barrier();

    let start = rdtsc();
    for s in 0..p.steps {
        let (src, dst) = if s % 2 == 0 { (a, b) } else { (b, a) };
        // SAFETY: during a step every vCPU only reads `src` and writes its own rows of
        // `dst`, a different buffer; the barrier orders steps.
        unsafe {
            let src = core::slice::from_raw_parts(src, n * n);
            let mine = core::slice::from_raw_parts_mut(dst.add(rows.start * n), rows.len() * n);
            stencil_core::step_rows(src, mine, n, rows.start);
        }
        ctx.barrier();
        let done = s + 1;
        if me == 0 && p.report != 0 && done % p.report == 0 {
            // SAFETY: `dst` is only read until the next step's barrier (the next step reads it
            // and writes the other buffer).
            let center = unsafe { *dst.add((n / 2) * n + n / 2) };
            if p.time {
                let t = ticks_to_us(rdtsc().wrapping_sub(start));
                println!("step {done} center {center:.9} t_us {t}");
            } else {
                println!("step {done} center {center:.9}");
            }
        }
    }
    let elapsed = rdtsc().wrapping_sub(start);
    if me != 0 {
        return;
    }
    let result = if p.steps % 2 == 1 { b } else { a };
    // SAFETY: all steps are done (last barrier); the other vCPUs no longer touch the grid.
    let grid = unsafe { core::slice::from_raw_parts(result, n * n) };
    let sum = stencil_core::checksum(grid);
    if p.time {
        println!("time_us {}", ticks_to_us(elapsed));
    }
    let mut code = 0;
    if p.disk {
        if let Some(dev) = ctx.device(DeviceKind::VirtioBlk, 0) {
            let disk_start = rdtsc();
            match write_disk(dev.mmio_base, grid, n, p.steps, sum) {
                Ok(bytes) => {
                    println!("disk written {bytes}");
                    if p.time {
                        let t = ticks_to_us(rdtsc().wrapping_sub(disk_start));
                        println!("disk_time_us {t}");
                    }
                }
                Err(e) => {
                    println!("disk error: {e}");
                    code = 1;
                }
            }
        }
    }
    println!("checksum {sum:016x}");
    if code != 0 {
        guest_rt::exit(code);
    }
}

/// Writes the header and as many grid rows as fit, then flushes. Returns the bytes written.
fn write_disk(
    mmio_base: u64,
    grid: &[f64],
    n: usize,
    steps: u64,
    sum: u64,
) -> Result<u64, &'static str> {
    // SAFETY: the window comes from the boot block and only vCPU 0 drives it, once.
    let mut blk =
        unsafe { VirtioBlk::new(mmio_base) }.map_err(|_| "cannot initialise virtio-blk")?;
    let capacity = blk.capacity_bytes();
    if capacity < SECTOR_SIZE as u64 {
        return Err("disk smaller than one sector");
    }
    let row_bytes = (n * 8) as u64;
    let rows = ((capacity - SECTOR_SIZE as u64) / row_bytes).min(n as u64) as usize;

    let mut header = [0u8; SECTOR_SIZE];
    let fields = [
        u64::from_le_bytes(*DISK_MAGIC),
        n as u64,
        steps,
        sum,
        rows as u64,
        8,
    ];
    for (i, v) in fields.iter().enumerate() {
        header[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    blk.write(0, &header).map_err(|_| "header write failed")?;

    // SAFETY: f64 has no padding or invalid bit patterns; the bytes of the first `rows` rows
    // (x86 is little endian, the on-disk order).
    let body = unsafe { core::slice::from_raw_parts(grid.as_ptr() as *const u8, rows * n * 8) };
    let whole = body.len() / SECTOR_SIZE * SECTOR_SIZE;
    if whole > 0 {
        blk.write(1, &body[..whole])
            .map_err(|_| "grid write failed")?;
    }
    let mut written = (SECTOR_SIZE + whole) as u64;
    if whole < body.len() {
        let mut tail = [0u8; SECTOR_SIZE];
        tail[..body.len() - whole].copy_from_slice(&body[whole..]);
        blk.write(1 + (whole / SECTOR_SIZE) as u64, &tail)
            .map_err(|_| "grid write failed")?;
        written += SECTOR_SIZE as u64;
    }
    blk.flush().map_err(|_| "flush failed")?;
    Ok(written)
}
