//! `--only peers`: QEMU's COLO checkpoints (Debian's qemu-system-x86, 7.2) next to ftvmm's,
//! on this machine, in one run, with the same guest: the stencil payload at the replication
//! section's sizes (1 / 4 / 16 / 64 MiB working sets), booted under QEMU `-machine microvm
//! -accel kvm` through a PVH trampoline (`shim`) on ftvmm's own boot structures.
//!
//! For each size and checkpoint period (100 ms, what issue 20 quotes, and the replication
//! section's fixed 40 ms): COLO's pause per checkpoint, p50 / p99 (QEMU's own trace events:
//! the time its primary holds the VM stopped, from `vm_stop` done to `vm_start` done, which
//! covers saving the devices, sending the dirty RAM and the secondary loading it, but not the
//! stop itself),
//! COLO's guest speed over the same guest under plain QEMU + KVM (guest-timed progress
//! lines, as ftvmm's are), and beside them ftvmm's pause (from its pause request to resume)
//! and replicated / unreplicated speed at the same size and fixed epoch length.
//!
//! COLO's primary and secondary talk over a unix socket (see [`Link`] for why not TCP; one
//! row shows TCP). COLO here is timer-driven checkpoints (`x-checkpoint-delay`) with neither a
//! disk nor a NIC, so neither block replication nor colo-compare is set up (QEMU 7.2 needs
//! neither for that), and unlike ftvmm's standby the secondary runs the guest between
//! checkpoints, as COLO does: a 1-vCPU guest keeps both of this host's cores busy.

mod qemu;
mod shim;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use checkpoint::policy::EpochBounds;
use serde_json::json;

use super::replication::{
    adjacent_runs, median_ratio, median_speed, steady, steady_epochs, steady_speed, stencil_config,
    steps_for, working_set_mib, Run, Setup, MIB, PAGE,
};
use super::{median, Figure, Row};
use crate::pair::quantile_us;
use crate::run::Error;
use qemu::{Qemu, Spec};

/// Progress lines that a measured stretch holds at least (speed from the first to the last).
const MIN_LINES: usize = 3;
/// The longest a measured stretch may take.
const MEASURE_LIMIT: Duration = Duration::from_secs(40);

/// Checkpoint periods measured, in ms: issue 20's 100 ms and the replication section's 40 ms.
const PERIODS: [u64; 2] = [40, 100];
/// A COLO period long enough for its slowed guest to dirty a 16 or 64 MiB working set.
const FULL_PERIOD_MS: u64 = 1000;

/// A directory for one section run's files, removed with everything in it when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self, Error> {
        let dir = std::env::temp_dir().join(format!("ftvmm-bench-peers-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The guest TSC rate KVM gives a new vCPU here (KVM_GET_TSC_KHZ, as ftvmm reads it for its
/// own guests): QEMU sets no `tsc-frequency`, so its vCPUs run at this rate too (checked
/// against QEMU's own figure for its vCPU at each plain boot).
fn kvm_tsc_khz() -> Result<u64, Error> {
    let kvm = kvm_ioctls::Kvm::new()?;
    let vm = kvm.create_vm()?;
    let vcpu = vm.create_vcpu(0)?;
    Ok(u64::from(vcpu.get_tsc_khz()?))
}

/// The channel between COLO's primary and secondary.
#[derive(Clone, Copy, PartialEq)]
enum Link {
    /// A unix socket: what the figures use. QEMU 7.2 leaves Nagle's algorithm on for its
    /// migration sockets, and over TCP each checkpoint's small `vmstate-loaded` reply from
    /// the secondary then waits for the delayed ACK of the one before it (about 40 ms here).
    Unix,
    /// TCP over loopback, to show that wait (one row).
    Tcp,
}

/// What one guest run under QEMU showed.
struct QemuRun {
    steps_per_s: f64,
    /// COLO only: how long the primary held the VM stopped at each checkpoint but the first.
    pauses: Vec<Duration>,
    /// COLO only: the median time from one checkpoint's stop to the next's.
    period: Duration,
    /// COLO only: the median of the pages the secondary flushed into its VM per checkpoint
    /// but the first: those the primary sent and those the secondary's own run dirtied.
    flushed_pages: f64,
}

/// One size's guest image and run parameters, shared by its QEMU runs.
struct Guest<'a> {
    qemu: &'a Path,
    dir: &'a Path,
    kernel: PathBuf,
    mem_mib: u64,
    /// How long a run is measured for at least, from its mark (see [`Guest::measure`]).
    measured: Duration,
    /// The TSC rate written into the boot block, to check against QEMU's.
    tsc_khz: u64,
}

/// The guest's `step ...` progress lines in `serial` so far.
fn progress(serial: &Path) -> Vec<String> {
    std::fs::read_to_string(serial)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("step "))
        .map(String::from)
        .collect()
}

impl Guest<'_> {
    fn spec<'b>(&'b self, name: &'b str, serial: Option<&'b Path>) -> Spec<'b> {
        Spec {
            name,
            kernel: &self.kernel,
            mem_mib: self.mem_mib,
            serial,
            incoming: None,
            trace: None,
        }
    }

    /// Waits (bounded) for the guest's first progress line: it is past its boot and its
    /// grids' first touch, running its steps.
    fn wait_running(&self, vm: &Qemu, serial: &Path) -> Result<(), Error> {
        let start = Instant::now();
        while progress(serial).is_empty() {
            if start.elapsed() > Duration::from_secs(30) {
                return Err(vm.failed("ran no guest progress within 30 s"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Marks the progress printed so far, lets the guest run for `measured` and at least
    /// [`MIN_LINES`] more progress lines (bounded: a guest slowed down a lot prints seldom),
    /// and returns its steps per second from the first progress line after the mark to the
    /// last.
    fn measure(&self, serial: &Path, measured: Duration) -> Result<f64, Error> {
        let (mark, start) = (progress(serial).len(), Instant::now());
        let after = loop {
            std::thread::sleep(Duration::from_millis(20));
            let after = progress(serial).split_off(mark);
            let enough = after.len() >= MIN_LINES && start.elapsed() >= measured;
            if enough || start.elapsed() > MEASURE_LIMIT {
                break after;
            }
        };
        let after = after.join("\n");
        steady_speed(&after, 0).ok_or_else(|| {
            format!(
                "the guest under QEMU printed too little progress in {MEASURE_LIMIT:?}: {after:?}"
            )
            .into()
        })
    }

    /// The guest under plain QEMU + KVM.
    fn plain(&self) -> Result<QemuRun, Error> {
        let serial = self.dir.join("plain.out");
        let _ = std::fs::remove_file(&serial);
        let mut vm = Qemu::spawn(self.qemu, self.dir, &self.spec("plain", Some(&serial)))?;
        let khz = vm.tsc_khz()?;
        // A wrong rate would scale every guest-timed figure.
        if khz.abs_diff(self.tsc_khz) * 1000 > self.tsc_khz {
            return Err(format!(
                "QEMU's vCPU runs its TSC at {khz} kHz, not the {} kHz the guest was told",
                self.tsc_khz
            )
            .into());
        }
        self.wait_running(&vm, &serial)?;
        Ok(QemuRun {
            steps_per_s: self.measure(&serial, self.measured)?,
            pauses: Vec::new(),
            period: Duration::ZERO,
            flushed_pages: 0.0,
        })
    }

    /// The guest under COLO with checkpoints every `period_ms`: a secondary waiting on a
    /// unix socket (or a loopback TCP port), and a primary whose guest, once running,
    /// migrates to it and enters COLO. (Not from the guest's first instruction: a secondary that starts from the reset
    /// state fails under PVM in the trampoline's far jump to 64-bit code, "emulation failure";
    /// from a CPL3 state it runs.)
    fn colo(&self, period_ms: u64, link: Link) -> Result<QemuRun, Error> {
        // Long periods run longer: at least a fifth as many checkpoints as 40 ms would make.
        let measured = self
            .measured
            .max(self.measured * u32::try_from(period_ms)? / 200);
        let uri = match link {
            Link::Unix => {
                let path = self.dir.join("colo.sock");
                let _ = std::fs::remove_file(&path);
                format!("unix:{}", path.display())
            }
            Link::Tcp => format!("tcp:{}", TcpListener::bind("127.0.0.1:0")?.local_addr()?),
        };
        let x_colo = json!({"capabilities": [{"capability": "x-colo", "state": true}]});
        let (serial, trace) = (self.dir.join("colo.out"), self.dir.join("colo.trace"));
        let flushes = self.dir.join("secondary.trace");
        for old in [&serial, &trace, &flushes] {
            let _ = std::fs::remove_file(old);
        }
        let mut secondary = Qemu::spawn(
            self.qemu,
            self.dir,
            &Spec {
                incoming: Some(&uri),
                trace: Some(&flushes),
                ..self.spec("secondary", None)
            },
        )?;
        secondary.qmp("migrate-set-capabilities", x_colo.clone())?;
        let mut primary = Qemu::spawn(
            self.qemu,
            self.dir,
            &Spec {
                trace: Some(&trace),
                ..self.spec("primary", Some(&serial))
            },
        )?;
        primary.qmp("migrate-set-capabilities", x_colo)?;
        // QEMU's default migration bandwidth cap (32 MiB/s) would only slow the first copy.
        primary.qmp(
            "migrate-set-parameters",
            json!({"x-checkpoint-delay": period_ms, "max-bandwidth": 10u64 << 30}),
        )?;
        self.wait_running(&primary, &serial)?;
        primary.qmp("migrate", json!({"uri": uri}))?;
        wait_status(&mut primary, "colo", Duration::from_secs(60))?;
        let steps_per_s = self.measure(&serial, measured)?;
        // COLO must still be running: a secondary lost midway would leave the primary alone.
        let status = primary.qmp("query-migrate", json!({}))?;
        if status["status"] != "colo" {
            return Err(primary.failed(&format!("left COLO during the run ({})", status["status"])));
        }
        drop(primary);
        drop(secondary);
        let stops = stopped_intervals(&read(&trace)?)?;
        // The first carries the end of the initial copy; the steady state follows.
        let stops = stops.get(1..).unwrap_or(&[]);
        if stops.len() < 3 {
            return Err(format!("COLO made only {} checkpoints", stops.len() + 1).into());
        }
        let pauses = stops.iter().map(|&(_, pause)| pause).collect();
        let periods = stops
            .windows(2)
            .map(|w| (w[1].0 - w[0].0).as_secs_f64())
            .collect();
        let flushed: Vec<f64> = read(&flushes)?
            .lines()
            .filter_map(|l| {
                l.split_once(":colo_flush_ram_cache_begin dirty_pages ")?
                    .1
                    .trim()
                    .parse()
                    .ok()
            })
            .skip(1)
            .collect();
        if flushed.is_empty() {
            return Err("COLO's secondary traced no flush of its RAM cache".into());
        }
        Ok(QemuRun {
            steps_per_s,
            pauses,
            period: Duration::from_secs_f64(median(periods)),
            flushed_pages: median(flushed),
        })
    }
}

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()).into())
}

/// Polls `query-migrate` until `want` (bounded); a failed migration is an error.
fn wait_status(vm: &mut Qemu, want: &str, limit: Duration) -> Result<(), Error> {
    let start = Instant::now();
    loop {
        let status = vm.qmp("query-migrate", json!({}))?;
        match status["status"].as_str() {
            Some(s) if s == want => return Ok(()),
            Some("failed" | "cancelled") => {
                return Err(vm.failed(&format!("migration {}", status["status"])))
            }
            _ if start.elapsed() > limit => {
                return Err(vm.failed(&format!(
                    "migration still {} after {limit:?}",
                    status["status"]
                )))
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// When each `colo_vm_state_change Change 'run' => 'stop'` trace line came (since the epoch)
/// and how long until the next `'stop' => 'run'` (lines `PID@SECONDS.MICROS:event ...`, from
/// `-msg timestamp=on`).
fn stopped_intervals(trace: &str) -> Result<Vec<(Duration, Duration)>, Error> {
    let mut stopped = None;
    let mut out = Vec::new();
    for line in trace.lines() {
        let Some((head, event)) = line.split_once(":colo_vm_state_change ") else {
            continue;
        };
        let stamp = head.split_once('@').map(|(_, t)| t).unwrap_or(head);
        let (s, us) = stamp
            .split_once('.')
            .ok_or("trace line without a time stamp")?;
        let at = Duration::from_secs(s.parse()?) + Duration::from_micros(us.parse()?);
        if event.contains("'run' => 'stop'") {
            stopped = Some(at);
        } else if event.contains("'stop' => 'run'") {
            if let Some(from) = stopped.take() {
                out.push((from, at.saturating_sub(from)));
            }
        }
    }
    Ok(out)
}

fn ms(d: &[Duration], q: f64) -> f64 {
    quantile_us(d, q) as f64 / 1e3
}

/// ftvmm's steady epochs of one replicated setup, every repetition's pooled.
struct Epochs {
    pauses: Vec<Duration>,
    lengths: Vec<Duration>,
    /// The median over repetitions of the steady dirty MiB per epoch.
    dirty_mib: f64,
}

impl Epochs {
    fn pooled(runs: &[Vec<Run>], setup: usize) -> Result<Self, Error> {
        let (mut pauses, mut lengths, mut dirty) = (Vec::new(), Vec::new(), Vec::new());
        for r in runs.iter().filter_map(|r| r[setup].report.as_ref()) {
            pauses.extend_from_slice(&r.pauses[steady_epochs(r)]);
            lengths.extend_from_slice(&r.lengths[steady_epochs(r)]);
            dirty.push(steady(r, |e| r.dirty_pages[e] as f64 * PAGE / MIB));
        }
        if pauses.is_empty() {
            return Err("no replicated ftvmm epochs".into());
        }
        Ok(Self {
            pauses,
            lengths,
            dirty_mib: median(dirty),
        })
    }
}

/// How the section runs, for every size.
struct Plan<'a> {
    qemu: &'a Path,
    dir: &'a Path,
    /// ftvmm's runs last about this long unreplicated (as in the replication section).
    seconds: f64,
    /// QEMU's runs are measured for at least this long (see [`Guest::measure`]).
    measured: Duration,
    /// Repetitions of ftvmm's setups, back to back.
    reps: usize,
    /// The guest TSC rate (see [`kvm_tsc_khz`]).
    tsc_khz: u64,
}

/// One size's rows: plain QEMU, COLO at each period, and ftvmm unreplicated and replicated
/// at each period, back to back (this host's speed drifts over minutes).
fn size_rows(plan: &Plan, n: usize, rows: &mut Vec<Row>) -> Result<(), Error> {
    let (dir, reps) = (plan.dir, plan.reps);
    let steps = steps_for(n, plan.seconds);
    let config = stencil_config(n, steps);
    let payload = crate::payloads::builtin("stencil").ok_or("payload missing")?;
    let kernel = dir.join(format!("stencil-{n}.elf"));
    // Under QEMU the guest runs until stopped, printing progress as often as in ftvmm's runs
    // (every twentieth of `seconds` unreplicated).
    let args = [
        format!("n={n}"),
        format!("steps={}", steps * 1000),
        "time".into(),
        format!("report={}", (steps / 20).max(1)),
    ];
    std::fs::write(
        &kernel,
        shim::image(payload, config.mem_size, plan.tsc_khz, &args)?,
    )?;
    let guest = Guest {
        qemu: plan.qemu,
        dir,
        kernel,
        mem_mib: config.mem_size >> 20,
        measured: plan.measured,
        tsc_khz: plan.tsc_khz,
    };
    let plain = guest.plain()?;
    let colo: Vec<QemuRun> = PERIODS
        .iter()
        .map(|&ms| guest.colo(ms, Link::Unix))
        .collect::<Result<_, _>>()?;
    let mut setups = vec![Setup::Unreplicated];
    setups.extend(PERIODS.iter().map(|&ms| Setup::Replicated {
        epochs: EpochBounds::fixed(ms),
    }));
    let ftvmm = adjacent_runs(n, steps, &setups, reps)?;
    let ftvmm_plain = median_speed(&ftvmm, 0);
    let size = working_set_mib(n);
    rows.push(Row::new(
        format!(
            "stencil {n}x{n} ({size} MiB), 1 vCPU, unreplicated: QEMU microvm \
             {:.0} / ftvmm {ftvmm_plain:.0} steps/s",
            plain.steps_per_s
        ),
        Figure::ratio(
            format!("peers_qemu_over_ftvmm_unrepl_{size}mib"),
            plain.steps_per_s / ftvmm_plain,
        ),
        "~1 (the same guest, natively at CPL3)",
    ));
    let epochs: Vec<Epochs> = (1..setups.len())
        .map(|i| Epochs::pooled(&ftvmm, i))
        .collect::<Result<_, _>>()?;
    for (i, (period, c)) in PERIODS.iter().zip(&colo).enumerate() {
        let Epochs {
            pauses: ftvmm_pauses,
            lengths,
            dirty_mib,
        } = &epochs[i];
        let id = |what: &str| format!("peers_{what}_{size}mib_{period}ms");
        rows.push(Row {
            what: format!(
                "{size} MiB, {period} ms: pause p50 / p99, COLO ({} checkpoints {:.0} ms apart, \
                 {:.1} MiB flushed into the secondary per checkpoint) / ftvmm ({} epochs of \
                 {:.0} ms, {:.1} MiB dirty per epoch)",
                c.pauses.len(),
                c.period.as_secs_f64() * 1e3,
                c.flushed_pages * PAGE / MIB,
                ftvmm_pauses.len(),
                ms(lengths, 0.5),
                dirty_mib,
            ),
            figures: vec![
                Figure::new(id("colo_pause_p50_ms"), ms(&c.pauses, 0.5), "ms", 2),
                Figure::new(id("colo_pause_p99_ms"), ms(&c.pauses, 0.99), "ms", 2),
                Figure::new(id("ftvmm_pause_p50_ms"), ms(ftvmm_pauses, 0.5), "ms", 2),
                Figure::new(id("ftvmm_pause_p99_ms"), ms(ftvmm_pauses, 0.99), "ms", 2),
            ],
            target: "-",
        });
        let colo_ratio = c.steps_per_s / plain.steps_per_s;
        let ftvmm_ratio = median_ratio(&ftvmm, i + 1, 0);
        rows.push(Row {
            what: format!(
                "{size} MiB, {period} ms: guest speed replicated / unreplicated, COLO {:.0} / \
                 {:.0} steps/s, ftvmm {:.0} / {ftvmm_plain:.0} (median of {reps}); ftvmm's \
                 over COLO's",
                c.steps_per_s,
                plain.steps_per_s,
                median_speed(&ftvmm, i + 1)
            ),
            figures: vec![
                Figure::ratio(id("colo_speed_ratio"), colo_ratio),
                Figure::ratio(id("ftvmm_speed_ratio"), ftvmm_ratio),
                Figure::ratio(id("ftvmm_over_colo_speed"), ftvmm_ratio / colo_ratio),
            ],
            target: "-",
        });
        rows.push(Row::new(
            format!("{size} MiB, {period} ms: COLO's pause p99 / ftvmm's"),
            Figure::ratio(
                id("colo_over_ftvmm_pause_p99"),
                ms(&c.pauses, 0.99) / ms(ftvmm_pauses, 0.99).max(1e-3),
            ),
            "-",
        ));
    }
    // The guest slowed down under COLO dirties less than its working set per 40 or 100 ms
    // checkpoint at 16 and 64 MiB: a period it fills, for COLO's pause at the whole set.
    if n >= 1024 {
        let c = guest.colo(FULL_PERIOD_MS, Link::Unix)?;
        // ftvmm's 100 ms epochs, which hold the whole working set.
        let f = epochs.last().ok_or("no replicated ftvmm setup")?;
        let id = |what: &str| format!("peers_{what}_{size}mib_{FULL_PERIOD_MS}ms");
        rows.push(Row {
            what: format!(
                "{size} MiB, COLO every {FULL_PERIOD_MS} ms, so that its guest dirties its \
                 working set: pause p50 / p99 ({} checkpoints, {:.1} MiB flushed into the \
                 secondary per checkpoint); over ftvmm's at 100 ms ({:.1} MiB dirty per epoch)",
                c.pauses.len(),
                c.flushed_pages * PAGE / MIB,
                f.dirty_mib,
            ),
            figures: vec![
                Figure::new(id("colo_pause_p50_ms"), ms(&c.pauses, 0.5), "ms", 2),
                Figure::new(id("colo_pause_p99_ms"), ms(&c.pauses, 0.99), "ms", 2),
                Figure::ratio(
                    id("colo_over_ftvmm_pause_p50"),
                    ms(&c.pauses, 0.5) / ms(&f.pauses, 0.5).max(1e-3),
                ),
                Figure::ratio(
                    id("colo_over_ftvmm_pause_p99"),
                    ms(&c.pauses, 0.99) / ms(&f.pauses, 0.99).max(1e-3),
                ),
            ],
            target: "-",
        });
    }
    if n == 256 {
        let tcp = guest.colo(100, Link::Tcp)?;
        rows.push(Row {
            what: format!(
                "{size} MiB, 100 ms, COLO over TCP loopback instead of a unix socket: pause \
                 p50 / p99 ({} checkpoints; Nagle's algorithm on QEMU's migration socket holds \
                 the secondary's reply for the delayed ACK of the one before)",
                tcp.pauses.len()
            ),
            figures: vec![
                Figure::new(
                    "peers_colo_tcp_pause_p50_ms_1mib_100ms",
                    ms(&tcp.pauses, 0.5),
                    "ms",
                    2,
                ),
                Figure::new(
                    "peers_colo_tcp_pause_p99_ms_1mib_100ms",
                    ms(&tcp.pauses, 0.99),
                    "ms",
                    2,
                ),
            ],
            target: "-",
        });
    }
    Ok(())
}

/// All peers rows; fails at once, naming the install script, without QEMU.
pub(super) fn rows(quick: bool) -> Result<Vec<Row>, Error> {
    let qemu = qemu::find()?;
    let dir = TempDir::new()?;
    // ftvmm's runs are `seconds` long unreplicated; QEMU's are measured for `measured`.
    // (Each repetition runs ftvmm's three setups back to back.)
    let (seconds, measured, reps) = if quick { (0.4, 1.5, 1) } else { (1.0, 4.0, 3) };
    let plan = Plan {
        qemu: &qemu,
        dir: &dir.0,
        seconds,
        measured: Duration::from_secs_f64(measured),
        reps,
        tsc_khz: kvm_tsc_khz()?,
    };
    let mut rows = Vec::new();
    for n in [256, 512, 1024, 2048] {
        size_rows(&plan, n, &mut rows)?;
    }
    Ok(rows)
}
