//! What replication costs and how fast it fails over, measured in one run: the guest's pause
//! per epoch next to the memcpy of the same dirty pages (the part of the pause no checkpointer
//! can avoid), stencil throughput replicated / unreplicated / tracking-only, bytes on the wire
//! per dirty byte, and time from the primary's death to the guest running on the standby.
//!
//! The dirty set per 40 ms epoch is set by the stencil grid: every step rewrites one of its two
//! `n * n` f64 grids and an epoch spans several steps, so an epoch dirties both grids,
//! `2 * n * n * 8` bytes (the figure printed is the measured median).

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use checkpoint::hot::HotPages;
use checkpoint::link::{self, Listener, PeerConfig};
use checkpoint::outputs::Outputs;
use checkpoint::primary::{self, PrimaryEnd, PrimaryReport};
use checkpoint::standby::{self, Local, StandbyEnd};
use netbuf::{ConsoleGateSink, Gate, Mode, FRAME_HOLD_LIMIT};
use nix::sys::signal::{kill, Signal};
use vmm::cast::usize_to_u64;
use vmm::devices::ConsoleSink;
use vmm::{GuestKind, VmConfig, VmOutcome};

use super::{build, median, Capture, Row};
use crate::pair::{quantile_us, unix_us};
use crate::run::Error;
use crate::run::Node;

const EPOCH_MS: u64 = 40;
const PAGE: f64 = 4096.0;
const MIB: f64 = (1 << 20) as f64;

/// How the stencil runs: alone, with dirty logging harvested every epoch as replication does it
/// but nothing else (PVM's write-fault cost on its own), or protected by an in-process standby
/// over loopback.
#[derive(Clone, Copy, PartialEq)]
enum Setup {
    Unreplicated,
    TrackingOnly,
    Replicated { epoch_ms: u64 },
}

/// One stencil run: its steady speed and, when replicated, the primary's report.
struct Run {
    /// Steps per second from a quarter of the run to its end, timed by the guest: what a long
    /// run sees, without the start (a replicated run pre-copies memory then).
    steps_per_s: f64,
    report: Option<PrimaryReport>,
}

/// Steps per second between the first progress line at or past a quarter of the run and the
/// last one (`step S center V t_us T` lines).
fn steady_speed(text: &str, steps: u64) -> Option<f64> {
    let points: Vec<(u64, u64)> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            match f.as_slice() {
                ["step", s, "center", _, "t_us", t] => Some((s.parse().ok()?, t.parse().ok()?)),
                _ => None,
            }
        })
        .collect();
    let &(s0, t0) = points.iter().find(|(s, _)| *s >= steps / 4)?;
    let &(s1, t1) = points.last()?;
    (t1 > t0).then(|| (s1 - s0) as f64 / ((t1 - t0) as f64 / 1e6))
}

/// Steps of an `n * n` stencil that take about `seconds` unreplicated on one vCPU here
/// (0.4 ns per cell and step).
// A rough estimate: `as` saturates a float (NaN to 0), which is all it needs.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn steps_for(n: usize, seconds: f64) -> u64 {
    ((seconds / (n * n) as f64 / 0.4e-9) as u64).max(50)
}

fn stencil_config(n: usize, steps: u64) -> VmConfig {
    // Both grids plus room for the runtime, in whole 64 MiB.
    let need = 2 * n * n * 8 + (16 << 20);
    VmConfig {
        mem_size: usize_to_u64(need.div_ceil(64 << 20)) * (64 << 20),
        vcpus: 1,
        args: vec![
            format!("n={n}"),
            format!("steps={steps}"),
            "time".into(),
            format!("report={}", (steps / 20).max(1)),
        ],
        kind: GuestKind::Payload,
    }
}

fn stencil_run(n: usize, steps: u64, mode: Setup) -> Result<Run, Error> {
    let config = stencil_config(n, steps);
    let capture = Capture::default();
    let mut report = None;
    match mode {
        Setup::Unreplicated => {
            let mut vmm = build("stencil", &config, Box::new(capture.clone()), None, None)?;
            vmm.start()?;
            super::run_to_end(&mut vmm)?;
        }
        Setup::TrackingOnly => {
            let mut vmm = build("stencil", &config, Box::new(capture.clone()), None, None)?;
            vmm.set_dirty_logging(true)?;
            vmm.harvest_dirty()?;
            vmm.start()?;
            // Harvesting re-arms write protection as each replicated epoch does.
            let period = Duration::from_millis(EPOCH_MS);
            let mut next = Instant::now() + period;
            let mut hot = HotPages::default();
            while vmm.outcome().is_none() {
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
                next += period;
                vmm.harvest_dirty_rearming(|log| hot.rearm(log))?;
            }
            super::run_to_end(&mut vmm)?;
        }
        Setup::Replicated { epoch_ms } => {
            report = Some(replicated(&config, Box::new(capture.clone()), epoch_ms)?)
        }
    }
    let steps_per_s =
        steady_speed(&capture.text(), steps).ok_or("stencil printed no timed progress")?;
    Ok(Run {
        steps_per_s,
        report,
    })
}

/// Runs the stencil as a protected primary, with a standby served by a thread of this process
/// over loopback; both must end with the guest's exit.
fn replicated(
    config: &VmConfig,
    console: Box<dyn ConsoleSink>,
    epoch_ms: u64,
) -> Result<PrimaryReport, Error> {
    let listener = Listener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let local = Local {
        disk_size: None,
        net_mac: None,
        kvm_path: "/dev/kvm".into(),
    };
    let standby = std::thread::spawn(move || {
        standby::serve(&listener, &local, None, &standby::StandbyWatch::default())
    });
    let gate = Gate::new(Box::new(console), 0, Mode::Held);
    let vmm = build(
        "stencil",
        config,
        Box::new(ConsoleGateSink(gate.clone())),
        None,
        None,
    )?;
    let peer = PeerConfig {
        vm: config.clone(),
        disk_size: None,
        net_mac: None,
        epoch_ms,
        // Generous: a 64 MiB epoch takes a while to compress and apply on two cores.
        failover_timeout_ms: 2000,
        ack_timeout_ms: 10_000,
        resync_max_mib_s: 0,
    };
    let link = link::connect(&addr, &peer, Duration::from_secs(10))?;
    let outputs = Outputs::attach(gate, Mode::Held, &vmm, FRAME_HOLD_LIMIT, None);
    let guest = primary::PrimaryGuest {
        vmm,
        outputs,
        image: None,
    };
    let (end, report) = primary::protect(guest, link, &peer, &primary::Watch::default())?;
    let standby_end = standby.join().map_err(|_| "standby thread panicked")??;
    if !matches!(end, PrimaryEnd::Guest(VmOutcome::Exited(0))) {
        return Err(format!("replicated bench guest ended with {end:?}").into());
    }
    if !matches!(standby_end, StandbyEnd::Exit(0)) || report.unprotected_at.is_some() {
        return Err("the bench's standby did not follow the guest to its end".into());
    }
    Ok(report)
}

/// Median of `f(i)` over the checkpoints `i` of `r` but the first (it also carries what the
/// last pre-copy round left): the steady state.
fn steady(r: &PrimaryReport, f: impl Fn(usize) -> f64) -> f64 {
    median(steady_epochs(r).map(f).collect())
}

fn steady_epochs(r: &PrimaryReport) -> std::ops::Range<usize> {
    r.pauses.len().min(1)..r.pauses.len()
}

fn pause_rows(n: usize, epoch_ms: u64, r: &PrimaryReport, rows: &mut Vec<Row>) {
    let pauses = &r.pauses[steady_epochs(r)];
    let dirty_mib = steady(r, |i| r.dirty_pages[i] as f64 * PAGE / MIB);
    let copy_us = steady(r, |i| r.copies[i].as_secs_f64() * 1e6);
    let ratio = steady(r, |i| {
        r.pauses[i].as_secs_f64() / r.copies[i].as_secs_f64().max(1e-9)
    });
    let (p50, p99) = (quantile_us(pauses, 0.5), quantile_us(pauses, 0.99));
    rows.push(Row {
        what: format!(
            "pause per epoch, stencil {n}x{n}, {dirty_mib:.1} MiB dirty per {epoch_ms} ms epoch \
             ({} epochs): p50 {p50} us; memcpy of the same pages {copy_us:.0} us",
            pauses.len()
        ),
        value: format!("p99 {p99} us"),
        target: if n == 256 { "<= 1 ms" } else { "-" },
    });
    rows.push(Row {
        what: format!("pause / memcpy of the same dirty pages, {dirty_mib:.1} MiB (median)"),
        value: format!("{ratio:.2}"),
        target: if n == 1024 { "<= 1.5" } else { "-" },
    });
}

fn throughput_rows(n: usize, seconds: f64, reps: usize, rows: &mut Vec<Row>) -> Result<(), Error> {
    let steps = steps_for(n, seconds);
    // This host's speed drifts over minutes, so each repetition runs the three setups back to
    // back (in alternating order) and the ratios are the medians of those adjacent runs.
    let (mut speeds, mut vs_plain, mut vs_tracking) = (Vec::new(), Vec::new(), Vec::new());
    let mut report = None;
    for rep in 0..reps {
        let mut setups = [
            Setup::Unreplicated,
            Setup::TrackingOnly,
            Setup::Replicated { epoch_ms: EPOCH_MS },
        ];
        if rep % 2 == 1 {
            setups.reverse();
        }
        let mut speed = [0.0; 3];
        for setup in setups {
            let run = stencil_run(n, steps, setup)?;
            let i = match setup {
                Setup::Unreplicated => 0,
                Setup::TrackingOnly => 1,
                Setup::Replicated { .. } => 2,
            };
            speed[i] = run.steps_per_s;
            report = run.report.or(report);
        }
        vs_plain.push(speed[2] / speed[0]);
        vs_tracking.push(speed[2] / speed[1]);
        speeds.push(speed);
    }
    let report = report.ok_or("no replicated run")?;
    let dirty_mib = steady(&report, |i| report.dirty_pages[i] as f64 * PAGE / MIB);
    let [plain, tracking, replicated] =
        [0, 1, 2].map(|i| median(speeds.iter().map(|s| s[i]).collect()));
    rows.push(Row {
        what: format!(
            "stencil {n}x{n}, {steps} steps, {dirty_mib:.1} MiB dirty/epoch, 1 vCPU: \
             replicated {replicated:.0} / unreplicated {plain:.0} steps/s after the first quarter \
             (median of {reps} adjacent pairs)"
        ),
        value: format!("{:.3}", median(vs_plain)),
        target: if n == 512 { ">= 0.90" } else { "-" },
    });
    rows.push(Row {
        what: format!(
            "same, replicated / tracking-only {tracking:.0} steps/s (dirty logging as \
             replicated, no replication)"
        ),
        value: format!("{:.3}", median(vs_tracking)),
        target: ">= 0.95",
    });
    rows.push(Row {
        what: format!("bytes on the wire per dirty byte, {dirty_mib:.1} MiB/epoch (lz4)"),
        value: format!(
            "{:.3}",
            report.wire_bytes as f64 / report.page_bytes.max(1) as f64
        ),
        target: "-",
    });
    pause_rows(n, EPOCH_MS, &report, rows);
    Ok(())
}

/// Waits for `child` to exit, at most `limit`.
fn wait_exit(child: &mut Child, limit: Duration) -> Result<(), Error> {
    let start = Instant::now();
    while child.try_wait()?.is_none() {
        if start.elapsed() > limit {
            return Err(format!("a drill node did not finish within {limit:?}").into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// A failover's time from the primary's death to the guest running on the standby, in ms.
struct Failover {
    /// From the signal to the standby's decision.
    detection: f64,
    /// From the decision to the guest running on the standby.
    restore: f64,
    /// The part of `restore` spent committing what had arrived and decoding the checkpoint.
    drain: f64,
}

/// One failover drill with child processes: a primary protected by a standby, stopped with
/// `signal` once protected.
fn drill(dir: &Path, signal: Signal, timeout_ms: u64) -> Result<Failover, Error> {
    let exe = std::env::current_exe()?;
    let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?.to_string();
    let (p_out, stats) = (dir.join("p.out"), dir.join("standby.json"));
    let _ = std::fs::remove_file(&p_out);
    let mut standby = Node(
        Command::new(&exe)
            .args(["standby", "--listen", &addr, "--console"])
            .arg(format!("file:{}", dir.join("s.out").display()))
            .arg("--stats-json")
            .arg(&stats)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let primary = Node(
        Command::new(&exe)
            .args(["primary", "--peer", &addr, "--mem", "64M"])
            .args(["--failover-timeout-ms", &timeout_ms.to_string()])
            .args(["--payload", "builtin:stencil", "--console"])
            .arg(format!("file:{}", p_out.display()))
            .args(["--", "n=256", "steps=100000", "report=1000"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    // Released output means a checkpoint was acknowledged: the pair is protected.
    let start = Instant::now();
    while std::fs::metadata(&p_out).map_or(0, |m| m.len()) == 0 {
        if start.elapsed() > Duration::from_secs(60) {
            return Err("the drill's primary was never protected".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(200));
    let pid = primary.pid()?;
    let died = unix_us(SystemTime::now());
    kill(pid, signal)?;
    wait_exit(&mut standby.0, Duration::from_secs(60))?;
    drop(primary); // SIGKILL by pid: a stopped primary is killed too
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&stats)?)?;
    let at = |key: &str| {
        json[key]
            .as_u64()
            .ok_or_else(|| format!("standby stats lack {key}: the standby did not take over"))
    };
    let (decided, resumed) = (at("decided_unix_us")?, at("resumed_unix_us")?);
    Ok(Failover {
        detection: decided.saturating_sub(died) as f64 / 1e3,
        restore: resumed.saturating_sub(decided) as f64 / 1e3,
        drain: json["drain_ms"]
            .as_f64()
            .ok_or("standby stats lack drain_ms")?,
    })
}

fn failover_rows(reps: usize, rows: &mut Vec<Row>) -> Result<(), Error> {
    let dir = std::env::temp_dir().join(format!("ftvmm-bench-drill-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let timeout_ms = 200;
    let result = (|| -> Result<(), Error> {
        for (signal, how, target) in [
            (Signal::SIGKILL, "SIGKILL (connection closed)", "-"),
            (Signal::SIGSTOP, "SIGSTOP (silence)", "<= timeout + 10 ms"),
        ] {
            let (mut detect, mut restore, mut drain) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..reps {
                let f = drill(&dir, signal, timeout_ms)?;
                detect.push(f.detection);
                restore.push(f.restore);
                drain.push(f.drain);
            }
            let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
            rows.push(Row {
                what: format!(
                    "failover detection after {how} of the primary, timeout {timeout_ms} ms \
                     ({reps} drills; max {:.1} ms)",
                    max(&detect)
                ),
                value: format!("{:.1} ms", median(detect.clone())),
                target,
            });
            rows.push(Row {
                what: format!(
                    "failover restore after {how}: decision to guest running on the standby, \
                     of which drain {:.1} ms ({reps} drills; max {:.1} ms)",
                    median(drain),
                    max(&restore)
                ),
                value: format!("{:.1} ms", median(restore)),
                target: "<= 10 ms",
            });
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// All replication rows.
pub(super) fn rows(quick: bool) -> Result<Vec<Row>, Error> {
    let (seconds, reps) = if quick { (0.6, 1) } else { (2.5, 5) };
    let mut rows = Vec::new();
    for n in [256, 512, 1024] {
        throughput_rows(n, seconds, reps, &mut rows)?;
    }
    // 64 MiB per epoch: the pause only (the throughput rows stop at 16 MiB). Under PVM's
    // write-fault cost the guest dirties about 25 MiB in 40 ms, so these epochs are longer.
    let (n, epoch_ms) = (2048, 200);
    let run = stencil_run(n, steps_for(n, seconds), Setup::Replicated { epoch_ms })?;
    pause_rows(n, epoch_ms, &run.report.ok_or("no report")?, &mut rows);
    failover_rows(if quick { 2 } else { 5 }, &mut rows)?;
    Ok(rows)
}
