//! `ftvmm bench`: measures, in one run, what the payload VMM costs: time from process start to
//! the first payload byte, guest stencil speed against the same kernel run natively, and
//! virtio-blk / virtio-net throughput with VM exits per MiB moved; what replication costs
//! (`replication`); and what output commit and the disk barrier cost clients (`guest_io`).
//! Prints a Markdown table; `--json` also writes every figure under its stable id.

mod guest_io;
mod page_streams;
mod pair;
mod peers;
mod replication;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use vmm::builder::HostIo;
use vmm::devices::virtio::blk::RawFileBackend;
use vmm::devices::virtio::tap::Tap;
use vmm::devices::{BlockBackend, ConsoleSink};
use vmm::{GuestKind, VmConfig, VmOutcome, Vmm};

use crate::run::{Capture, Error};
use crate::testbed::{kv_pipelined, Topology, BRIDGE, GUEST_IP, KV_PORT};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Also write the report as Markdown to this file (e.g. docs/benchmarks.md).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also write every figure to this file as a JSON list of {"id", "value", "unit"}; the
    /// ids are stable (a contract), and `--quick` measures every one of them.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Fewer repetitions, for a quick look.
    #[arg(long)]
    pub quick: bool,
    /// Only this part (the checked-in report is a full run).
    #[arg(long, value_enum)]
    pub only: Option<Section>,
}

/// The parts of the report.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    /// The payload VMM: start-up, guest speed, virtio throughput.
    Vmm,
    /// Checkpointing: pauses, guest speed replicated, failover times.
    Replication,
    /// Output commit and the disk barrier as clients see them.
    GuestIo,
    /// The self-healing pair: resync, re-protection, idle VMs' cost, swap, drills.
    Pair,
    /// QEMU's COLO checkpoints (pause, guest speed) next to ftvmm's on the same stencil
    /// sizes and periods, in one run; needs qemu-system-x86_64 (scripts/install-peers.sh):
    /// without it the bench stops and says so.
    Peers,
}

/// One row of the report: what was measured, its figures and the target.
struct Row {
    what: String,
    /// One figure, or several that the row shows side by side (p50 / p99).
    figures: Vec<Figure>,
    target: &'static str,
}

/// One measured figure under its stable id.
#[derive(serde::Serialize)]
struct Figure {
    id: String,
    value: f64,
    unit: &'static str,
    /// Decimals shown in the Markdown table.
    #[serde(skip)]
    decimals: usize,
}

impl Figure {
    fn new(id: impl Into<String>, value: f64, unit: &'static str, decimals: usize) -> Self {
        Self {
            id: id.into(),
            value,
            unit,
            decimals,
        }
    }

    /// A ratio of two measurements, shown with three decimals.
    fn ratio(id: impl Into<String>, value: f64) -> Self {
        Self::new(id, value, "ratio", 3)
    }
}

impl Row {
    fn new(what: impl Into<String>, figure: Figure, target: &'static str) -> Self {
        Self {
            what: what.into(),
            figures: vec![figure],
            target,
        }
    }

    /// The value cell: the figures joined by " / ", with their unit once if they share it.
    fn value(&self) -> String {
        let number = |f: &Figure| format!("{:.*}", f.decimals, f.value);
        let unit = |u: &str| match u {
            "ratio" => String::new(),
            u => format!(" {u}"),
        };
        let first = self.figures.first().map_or("", |f| f.unit);
        if self.figures.iter().all(|f| f.unit == first) {
            let values: Vec<String> = self.figures.iter().map(number).collect();
            format!("{}{}", values.join(" / "), unit(first))
        } else {
            let values: Vec<String> = self
                .figures
                .iter()
                .map(|f| format!("{}{}", number(f), unit(f.unit)))
                .collect();
            values.join(" / ")
        }
    }
}

/// Builds (does not start) a builtin payload's VM in this process.
fn build(
    payload: &str,
    config: &VmConfig,
    console: Box<dyn ConsoleSink>,
    disk: Option<Box<dyn BlockBackend>>,
    net: Option<(Tap, [u8; 6])>,
) -> Result<Vmm, Error> {
    let io = HostIo {
        kvm_path: "/dev/kvm".into(),
        console,
        disk,
        net,
    };
    let elf = crate::payloads::builtin(payload).ok_or("payload missing")?;
    Ok(Vmm::boot_payload(config, elf, io)?)
}

/// Boots and starts a builtin payload in this process with 512 MiB of memory.
fn boot(
    payload: &str,
    vcpus: u32,
    args: &[String],
    disk: Option<Box<dyn BlockBackend>>,
    net: Option<(Tap, [u8; 6])>,
) -> Result<(Vmm, Capture), Error> {
    let capture = Capture::default();
    let config = VmConfig {
        mem_size: 512 << 20,
        vcpus,
        args: args.to_vec(),
        kind: GuestKind::Payload,
    };
    let mut vmm = build(payload, &config, Box::new(capture.clone()), disk, net)?;
    vmm.start()?;
    Ok((vmm, capture))
}

fn run_to_end(vmm: &mut Vmm) -> Result<(), Error> {
    match vmm.wait() {
        VmOutcome::Exited(0) => Ok(()),
        other => Err(format!("bench guest ended with {other:?}").into()),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Process start (spawn) to the first console byte of `builtin:seq`.
fn startup(reps: usize) -> Result<Vec<Row>, Error> {
    let exe = std::env::current_exe()?;
    let mut times = Vec::new();
    for _ in 0..reps {
        let start = Instant::now();
        let mut child = Command::new(&exe)
            .args(["run", "--payload", "builtin:seq", "--", "1"])
            .stdout(Stdio::piped())
            .spawn()?;
        let mut byte = [0u8; 1];
        child
            .stdout
            .take()
            .ok_or("no stdout")?
            .read_exact(&mut byte)?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
        child.wait()?;
    }
    let min = times.iter().copied().fold(f64::INFINITY, f64::min);
    Ok(vec![Row::new(
        format!("process start to first payload byte (median of {reps}; min {min:.1} ms)"),
        Figure::new("startup_ms", median(times), "ms", 1),
        "<= 50 ms",
    )])
}

/// The stencil kernel on `threads` host threads, as the payload splits it; returns microseconds.
fn native_stencil_us(n: usize, steps: u64, threads: usize) -> f64 {
    let mut a = vec![0.0f64; n * n];
    let mut b = vec![0.0f64; n * n];
    stencil_core::init(&mut a, n);
    stencil_core::init(&mut b, n);
    let (pa, pb) = (a.as_mut_ptr() as usize, b.as_mut_ptr() as usize);
    let barrier = Barrier::new(threads);
    let start = Instant::now();
    std::thread::scope(|s| {
        for part in 0..threads {
            let barrier = &barrier;
            s.spawn(move || {
                let rows = stencil_core::row_range(n, threads, part);
                for step in 0..steps {
                    let (src, dst) = if step % 2 == 0 { (pa, pb) } else { (pb, pa) };
                    // SAFETY: each thread writes only its own rows of `dst` and reads `src`,
                    // which nobody writes during this step (barrier between steps), exactly as
                    // the guest payload does; both buffers outlive the scope.
                    unsafe {
                        let src = std::slice::from_raw_parts(src as *const f64, n * n);
                        let dst = std::slice::from_raw_parts_mut(
                            (dst as *mut f64).add(rows.start * n),
                            rows.len() * n,
                        );
                        stencil_core::step_rows(src, dst, n, rows.start);
                    }
                    barrier.wait();
                }
            });
        }
    });
    start.elapsed().as_secs_f64() * 1e6
}

/// Guest stencil speed divided by native speed, on 1 and 2 vCPUs (best of `reps` each).
fn stencil(reps: usize) -> Result<Vec<Row>, Error> {
    // Long enough that first-touch faults on the 16 MiB grid (paid once) stay a small share.
    let (n, steps) = (1024usize, 1000u64);
    let args = vec![
        format!("n={n}"),
        format!("steps={steps}"),
        "time".into(),
        "report=0".into(),
    ];
    let mut rows = Vec::new();
    for vcpus in [1u32, 2] {
        let mut guest = f64::INFINITY;
        let mut native = f64::INFINITY;
        for _ in 0..reps {
            let (mut vmm, out) = boot("stencil", vcpus, &args, None, None)?;
            run_to_end(&mut vmm)?;
            let us = out.value("time_us").ok_or("stencil printed no time_us")?;
            guest = guest.min(us as f64);
            native = native.min(native_stencil_us(n, steps, vcpus as usize));
        }
        rows.push(Row::new(
            format!(
                "stencil {n}x{n}, {steps} steps, {vcpus} vCPU: guest {:.0} ms / native {:.0} ms",
                guest / 1e3,
                native / 1e3
            ),
            Figure::ratio(
                format!("guest_over_native_stencil{n}_{vcpus}vcpu"),
                native / guest,
            ),
            ">= 0.95 (guest speed / native speed)",
        ));
    }
    Ok(rows)
}

/// virtio-blk: the stencil payload writes an 8 MiB grid and flushes.
fn blk() -> Result<Vec<Row>, Error> {
    let path = std::env::temp_dir().join(format!("ftvmm-bench-{}.img", std::process::id()));
    std::fs::write(&path, vec![0u8; 16 << 20])?;
    let disk = RawFileBackend::open(&path);
    let result = (|| -> Result<Vec<Row>, Error> {
        let args: Vec<String> = ["n=1024", "steps=2", "time", "report=0"]
            .map(String::from)
            .into();
        let (mut vmm, out) = boot("stencil", 1, &args, Some(Box::new(disk?)), None)?;
        run_to_end(&mut vmm)?;
        let bytes = out.value("disk written").ok_or("no 'disk written' line")? as f64;
        let us = out.value("disk_time_us").ok_or("no disk_time_us")? as f64;
        let mib = bytes / (1 << 20) as f64;
        Ok(vec![
            Row::new(
                format!("virtio-blk write+flush of {mib:.1} MiB (guest-timed)"),
                Figure::new("blk_write_mib_s", mib / (us / 1e6), "MiB/s", 0),
                "-",
            ),
            Row::new(
                "virtio-blk VM exits per MiB written",
                Figure::new(
                    "blk_exits_per_mib",
                    vmm.exit_counts().mmio as f64 / mib,
                    "exits/MiB",
                    1,
                ),
                "few (one kick per batch)",
            ),
        ])
    })();
    let _ = std::fs::remove_file(&path);
    result
}

/// virtio-net: a client in another namespace streams pipelined requests to builtin:kv.
fn net(lines: u64) -> Result<Vec<Row>, Error> {
    let topo = Topology::new("bench")?;
    // The tap must be created inside the host namespace; its fd keeps working from any thread.
    let tap = topo.in_host(|| -> Result<Tap, String> {
        let tap = Tap::open("ftbench0").map_err(|e| e.to_string())?;
        tap.enslave(BRIDGE).map_err(|e| e.to_string())?;
        Ok(tap)
    })?;
    let args = vec![format!("ip={GUEST_IP}/24"), format!("port={KV_PORT}")];
    let mac = [0x02, 0, 0, 0, 0, 0x42];
    let (vmm, out) = boot("kv", 1, &args, None, Some((tap, mac)))?;
    out.wait_for("kv listening", Duration::from_secs(20))?;
    let before = vmm.exit_counts().mmio;
    let result = topo.in_client(move || kv_pipelined(lines));
    let exits = vmm.exit_counts().mmio - before;
    vmm.stop(VmOutcome::Exited(0));
    let (elapsed, bytes) = result?;
    let mib = bytes as f64 / (1 << 20) as f64;
    Ok(vec![
        Row::new(
            format!("virtio-net TCP, {lines} pipelined kv requests (bytes both ways)"),
            Figure::new("net_mib_s", mib / elapsed, "MiB/s", 1),
            "-",
        ),
        Row::new(
            "virtio-net VM exits per MiB moved",
            Figure::new("net_exits_per_mib", exits as f64 / mib, "exits/MiB", 0),
            "few (one kick per batch)",
        ),
    ])
}

pub fn bench(args: &BenchArgs) -> Result<ExitCode, Error> {
    let wanted = |s: Section| args.only.is_none_or(|only| only == s);
    let mut rows = Vec::new();
    if wanted(Section::Vmm) {
        rows.extend(startup(if args.quick { 3 } else { 15 })?);
        rows.extend(stencil(if args.quick { 1 } else { 3 })?);
        rows.extend(blk()?);
        rows.extend(net(if args.quick { 20_000 } else { 200_000 })?);
    }
    if wanted(Section::Replication) {
        rows.extend(replication::rows(args.quick)?);
    }
    if wanted(Section::Pair) {
        rows.extend(pair::rows(args.quick)?);
    }
    if wanted(Section::GuestIo) {
        rows.extend(guest_io::rows(args.quick)?);
    }
    if wanted(Section::Peers) {
        rows.extend(peers::rows(args.quick)?);
    }
    let mut md = String::from("| measure | value | target |\n|---|---|---|\n");
    for r in &rows {
        md.push_str(&format!("| {} | {} | {} |\n", r.what, r.value(), r.target));
    }
    print!("{md}");
    if let Some(path) = &args.json {
        let figures: Vec<&Figure> = rows.iter().flat_map(|r| &r.figures).collect();
        std::fs::write(path, serde_json::to_vec_pretty(&figures)?)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    if let Some(path) = &args.out {
        let doc = format!(
            "# ftvmm benchmarks\n\nMade by `ftvmm bench --out {}` (all figures from one run, on \
             this project's 2-core PVM machine).\n\n{md}",
            path.display()
        );
        std::fs::write(path, doc).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}
