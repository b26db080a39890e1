//! What replication costs and how fast it fails over, measured in one run: the guest's pause
//! per epoch next to the memcpy of the same dirty pages (the part of the pause no checkpointer
//! can avoid), stencil throughput replicated / unreplicated / tracking-only at fixed 40 ms
//! epochs, bytes on the wire per dirty byte, the 16 MiB stencil under the adaptive epoch
//! policy next to fixed epochs, a guest whose working set outruns what the pair ships in an
//! epoch (how much the pair slows it), and time from the primary's death to the guest running
//! on the standby.
//!
//! The dirty set per epoch is set by the stencil grid: every step rewrites one of its two
//! `n * n` f64 grids and an epoch spans several steps, so an epoch dirties both grids,
//! `2 * n * n * 8` bytes (the figure printed is the measured median).

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use checkpoint::hot::HotPages;
use checkpoint::link::{self, Listener, PeerConfig};
use checkpoint::outputs::Outputs;
use checkpoint::policy::{EpochBounds, EpochEnd};
use checkpoint::primary::{self, PrimaryEnd, PrimaryReport};
use checkpoint::standby::{self, Local, StandbyEnd};
use netbuf::{ConsoleGateSink, Gate, Mode, FRAME_HOLD_LIMIT};
use nix::sys::signal::{kill, Signal};
use vmm::cast::usize_to_u64;
use vmm::devices::ConsoleSink;
use vmm::{GuestKind, VmConfig, VmOutcome};

use super::{build, median, page_streams, Capture, Figure, Row};
use crate::pair::{quantile_us, unix_us};
use crate::run::Error;
use crate::run::Node;

const EPOCH_MS: u64 = 40;
pub(super) const PAGE: f64 = 4096.0;
pub(super) const MIB: f64 = (1 << 20) as f64;

/// How the stencil runs: alone, with dirty logging harvested every 40 ms epoch as replication
/// does it but nothing else (PVM's write-fault cost on its own), or protected by an
/// in-process standby over loopback with epochs within `epochs`.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Setup {
    Unreplicated,
    TrackingOnly,
    Replicated { epochs: EpochBounds },
}

/// Fixed 40 ms epochs, the period the throughput and pause rows are measured at.
const FIXED_40: Setup = Setup::Replicated {
    epochs: EpochBounds {
        min_ms: EPOCH_MS,
        max_ms: EPOCH_MS,
    },
};

/// One stencil run: its steady speed and, when replicated, the primary's report.
pub(super) struct Run {
    /// Steps per second from a quarter of the run to its end, timed by the guest: what a long
    /// run sees, without the start (a replicated run pre-copies memory then).
    pub(super) steps_per_s: f64,
    /// The whole run, from building the VM to its end.
    took: Duration,
    pub(super) report: Option<PrimaryReport>,
}

/// Steps per second between the first progress line at or past a quarter of the run and the
/// last one (`step S center V t_us T` lines).
pub(super) fn steady_speed(text: &str, steps: u64) -> Option<f64> {
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
pub(super) fn steps_for(n: usize, seconds: f64) -> u64 {
    ((seconds / (n * n) as f64 / 0.4e-9) as u64).max(50)
}

pub(super) fn stencil_config(n: usize, steps: u64) -> VmConfig {
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
    let start = Instant::now();
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
                vmm.harvest_dirty_rearming(|log| hot.rearm(log, usize::MAX))?;
            }
            super::run_to_end(&mut vmm)?;
        }
        Setup::Replicated { epochs } => {
            report = Some(replicated(&config, Box::new(capture.clone()), epochs)?)
        }
    }
    let steps_per_s =
        steady_speed(&capture.text(), steps).ok_or("stencil printed no timed progress")?;
    Ok(Run {
        steps_per_s,
        took: start.elapsed(),
        report,
    })
}

/// Runs the stencil as a protected primary, with a standby served by a thread of this process
/// over loopback; both must end with the guest's exit.
fn replicated(
    config: &VmConfig,
    console: Box<dyn ConsoleSink>,
    epochs: EpochBounds,
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
        epochs,
        // Generous: a 64 MiB epoch takes a while to compress and apply on two cores.
        failover_timeout_ms: 2000,
        ack_timeout_ms: 10_000,
        resync_max_mib_s: 0,
    };
    let link = link::connect(&addr, &peer, Duration::from_secs(10))?;
    let outputs = Outputs::attach(gate, Mode::Held, &vmm, FRAME_HOLD_LIMIT, None, 0);
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
pub(super) fn steady(r: &PrimaryReport, f: impl Fn(usize) -> f64) -> f64 {
    median(steady_epochs(r).map(f).collect())
}

pub(super) fn steady_epochs(r: &PrimaryReport) -> std::ops::Range<usize> {
    r.pauses.len().min(1)..r.pauses.len()
}

/// Size of an `n * n` stencil's working set, both grids, in MiB: how the ids name it.
pub(super) fn working_set_mib(n: usize) -> usize {
    (2 * n * n * 8) >> 20
}

fn pause_rows(n: usize, epoch_ms: u64, r: &PrimaryReport, rows: &mut Vec<Row>) {
    let pauses = &r.pauses[steady_epochs(r)];
    let dirty_mib = steady(r, |i| r.dirty_pages[i] as f64 * PAGE / MIB);
    let copy_us = steady(r, |i| r.copies[i].as_secs_f64() * 1e6);
    let ratio = steady(r, |i| {
        r.pauses[i].as_secs_f64() / r.copies[i].as_secs_f64().max(1e-9)
    });
    let (p50, p99) = (quantile_us(pauses, 0.5), quantile_us(pauses, 0.99));
    let size = working_set_mib(n);
    rows.push(Row {
        what: format!(
            "pause per epoch, p50 / p99, stencil {n}x{n}, {dirty_mib:.1} MiB dirty per \
             {epoch_ms} ms epoch ({} epochs); memcpy of the same pages {copy_us:.0} us",
            pauses.len()
        ),
        figures: vec![
            Figure::new(format!("pause_p50_us_{size}mib"), p50 as f64, "us", 0),
            Figure::new(format!("pause_p99_us_{size}mib"), p99 as f64, "us", 0),
        ],
        target: if n == 256 { "p99 <= 1 ms" } else { "-" },
    });
    rows.push(Row::new(
        format!("pause / memcpy of the same dirty pages, {dirty_mib:.1} MiB (median)"),
        Figure::new(format!("pause_over_memcpy_{size}mib"), ratio, "ratio", 2),
        if n == 1024 { "<= 1.5" } else { "-" },
    ));
}

/// Runs the `n * n` stencil for `steps` in each of `setups`, `reps` times. This host's speed
/// drifts over minutes, so each repetition runs the setups back to back (in alternating
/// order) and ratios are taken within a repetition. Returns each repetition's runs in the
/// order of `setups`.
pub(super) fn adjacent_runs(
    n: usize,
    steps: u64,
    setups: &[Setup],
    reps: usize,
) -> Result<Vec<Vec<Run>>, Error> {
    let mut all = Vec::new();
    for rep in 0..reps {
        let mut order: Vec<usize> = (0..setups.len()).collect();
        if rep % 2 == 1 {
            order.reverse();
        }
        let mut runs: Vec<Option<Run>> = (0..setups.len()).map(|_| None).collect();
        for i in order {
            runs[i] = Some(stencil_run(n, steps, setups[i])?);
        }
        all.push(runs.into_iter().flatten().collect());
    }
    Ok(all)
}

/// The median over repetitions of setup `a`'s speed over setup `b`'s.
pub(super) fn median_ratio(runs: &[Vec<Run>], a: usize, b: usize) -> f64 {
    median(
        runs.iter()
            .map(|r| r[a].steps_per_s / r[b].steps_per_s)
            .collect(),
    )
}

pub(super) fn median_speed(runs: &[Vec<Run>], i: usize) -> f64 {
    median(runs.iter().map(|r| r[i].steps_per_s).collect())
}

fn throughput_rows(n: usize, seconds: f64, reps: usize, rows: &mut Vec<Row>) -> Result<(), Error> {
    let steps = steps_for(n, seconds);
    let setups = [Setup::Unreplicated, Setup::TrackingOnly, FIXED_40];
    let runs = adjacent_runs(n, steps, &setups, reps)?;
    let report = runs
        .last()
        .and_then(|r| r[2].report.as_ref())
        .ok_or("no replicated run")?;
    let dirty_mib = steady(report, |i| report.dirty_pages[i] as f64 * PAGE / MIB);
    let [plain, tracking, replicated] = [0, 1, 2].map(|i| median_speed(&runs, i));
    let size = working_set_mib(n);
    rows.push(Row::new(
        format!(
            "stencil {n}x{n}, {steps} steps, {dirty_mib:.1} MiB dirty/epoch, 1 vCPU, {EPOCH_MS} ms \
             epochs: replicated {replicated:.0} / unreplicated {plain:.0} steps/s after the first \
             quarter (median of {reps} adjacent pairs)"
        ),
        Figure::ratio(
            format!("repl_over_unrepl_{size}mib"),
            median_ratio(&runs, 2, 0),
        ),
        if n == 512 { ">= 0.90" } else { "-" },
    ));
    rows.push(Row::new(
        format!(
            "same, replicated / tracking-only {tracking:.0} steps/s (dirty logging as \
             replicated, no replication)"
        ),
        Figure::ratio(
            format!("repl_over_tracking_{size}mib"),
            median_ratio(&runs, 2, 1),
        ),
        ">= 0.95",
    ));
    rows.push(Row::new(
        format!(
            "bytes on the wire per dirty byte, {dirty_mib:.1} MiB/epoch, replicated (deltas \
             against the standby's copy, byte planes, lz4)"
        ),
        Figure::ratio(
            format!("wire_per_dirty_{size}mib"),
            report.wire_bytes as f64 / report.page_bytes.max(1) as f64,
        ),
        if n == 1024 { "<= 0.5" } else { "-" },
    ));
    pause_rows(n, EPOCH_MS, report, rows);
    let period = Duration::from_millis(EPOCH_MS);
    page_streams::rows(&stencil_config(n, steps), size, period, rows)?;
    Ok(())
}

/// The 16 MiB stencil (its working set rewritten every two steps, progress lines every
/// twentieth of the run) under the default, adaptive epoch policy next to fixed epochs.
fn policy_rows(seconds: f64, reps: usize, rows: &mut Vec<Row>) -> Result<(), Error> {
    let n = 1024;
    let steps = steps_for(n, seconds);
    let fixed = [40, 100, 200, 500];
    let mut setups = vec![
        Setup::Unreplicated,
        Setup::Replicated {
            epochs: EpochBounds::DEFAULT,
        },
    ];
    setups.extend(fixed.iter().map(|&ms| Setup::Replicated {
        epochs: EpochBounds::fixed(ms),
    }));
    let runs = adjacent_runs(n, steps, &setups, reps)?;
    // The epochs the policy chose, but each run's first (it carries the pre-copy's last
    // round) and last (the guest's exit).
    let mut lengths = Vec::new();
    let mut ends = std::collections::BTreeMap::new();
    for r in runs.iter().filter_map(|r| r[1].report.as_ref()) {
        lengths.extend_from_slice(
            r.lengths
                .get(1..r.lengths.len().saturating_sub(1))
                .unwrap_or(&[]),
        );
        for (why, count) in &r.ends {
            *ends.entry(*why).or_insert(0u64) += count;
        }
    }
    let ms = |q| quantile_us(&lengths, q) as f64 / 1e3;
    let why: Vec<String> = EpochEnd::ALL
        .iter()
        .filter_map(|e| ends.get(e).map(|n| format!("{} {n}", e.as_str())))
        .collect();
    let (default, plain) = (EpochBounds::DEFAULT, median_speed(&runs, 0));
    rows.push(Row::new(
        format!(
            "stencil {n}x{n}, {steps} steps, 16 MiB rewritten every 2 steps, 1 vCPU, adaptive \
             epochs ({}..{} ms, the default): replicated {:.0} / unreplicated {plain:.0} steps/s \
             (median of {reps} adjacent runs)",
            default.min_ms,
            default.max_ms,
            median_speed(&runs, 1)
        ),
        Figure::ratio(
            "repl_over_unrepl_stencil1024_adaptive",
            median_ratio(&runs, 1, 0),
        ),
        ">= 0.8",
    ));
    rows.push(Row {
        what: format!(
            "same, epoch lengths the policy chose, p50 / p99 ({} epochs; ended by: {})",
            lengths.len(),
            why.join(", ")
        ),
        figures: vec![
            Figure::new("epoch_ms_p50_stencil1024_adaptive", ms(0.5), "ms", 0),
            Figure::new("epoch_ms_p99_stencil1024_adaptive", ms(0.99), "ms", 0),
        ],
        target: "-",
    });
    rows.push(Row {
        what: format!(
            "same, fixed epochs of {} ms: replicated / unreplicated",
            fixed.map(|ms| ms.to_string()).join(" / ")
        ),
        figures: fixed
            .iter()
            .enumerate()
            .map(|(i, ms)| {
                Figure::ratio(
                    format!("repl_over_unrepl_stencil1024_fixed{ms}"),
                    median_ratio(&runs, i + 2, 0),
                )
            })
            .collect(),
        target: "-",
    });
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
        for (signal, how, tag, target) in [
            (
                Signal::SIGKILL,
                "SIGKILL (connection closed)",
                "sigkill",
                "-",
            ),
            (
                Signal::SIGSTOP,
                "SIGSTOP (silence)",
                "sigstop",
                "<= timeout + 10 ms",
            ),
        ] {
            let (mut detect, mut restore, mut drain) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..reps {
                let f = drill(&dir, signal, timeout_ms)?;
                detect.push(f.detection);
                restore.push(f.restore);
                drain.push(f.drain);
            }
            let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
            rows.push(Row::new(
                format!(
                    "failover detection after {how} of the primary, timeout {timeout_ms} ms \
                     ({reps} drills; max {:.1} ms)",
                    max(&detect)
                ),
                Figure::new(format!("failover_detect_ms_{tag}"), median(detect), "ms", 1),
                target,
            ));
            rows.push(Row::new(
                format!(
                    "failover restore after {how}: decision to guest running on the standby, \
                     of which drain {:.1} ms ({reps} drills; max {:.1} ms)",
                    median(drain),
                    max(&restore)
                ),
                Figure::new(
                    format!("failover_restore_ms_{tag}"),
                    median(restore),
                    "ms",
                    1,
                ),
                "<= 10 ms",
            ));
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Guest memory and grid side of the large-guest rows: an 8 GiB guest whose stencil has two
/// grids of 16384 x 16384 f64, 4 GiB in use (the memory-path issue's figure).
const LARGE_MEM: &str = "8G";
const LARGE_N: u64 = 16384;

/// A node's `--stats-json`.
fn stats_of(path: &Path) -> Result<serde_json::Value, Error> {
    Ok(serde_json::from_slice(&std::fs::read(path)?)?)
}

/// A large guest protected from its start, run to its end: how long until its first
/// checkpoint is acknowledged, what each node holds resident at most, and what protection
/// costs it.
fn large_guest_rows(steps: u64, rows: &mut Vec<Row>) -> Result<(), Error> {
    let dir = std::env::temp_dir().join(format!("ftvmm-bench-large-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = (|| -> Result<(), Error> {
        let exe = std::env::current_exe()?;
        let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?.to_string();
        let (p_stats, s_stats) = (dir.join("p.json"), dir.join("s.json"));
        let mut standby = Node(
            Command::new(&exe)
                .args(["standby", "--listen", &addr, "--stats-json"])
                .arg(&s_stats)
                .arg(format!("--console=file:{}", dir.join("s.out").display()))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
        let start = Instant::now();
        let mut primary = Node(
            Command::new(&exe)
                .args([
                    "primary",
                    "--peer",
                    &addr,
                    "--mem",
                    LARGE_MEM,
                    "--stats-json",
                ])
                .arg(&p_stats)
                .arg(format!("--console=file:{}", dir.join("p.out").display()))
                .args(["--payload", "builtin:stencil", "--"])
                .args([
                    format!("n={LARGE_N}"),
                    format!("steps={steps}"),
                    "report=0".into(),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
        // The stats are rewritten every 250 ms: the first that shows an acknowledgement.
        let protected = loop {
            let acked = stats_of(&p_stats).ok().and_then(|j| j["acked"].as_u64());
            if acked.is_some_and(|a| a >= 1) {
                break start.elapsed();
            }
            if primary.0.try_wait()?.is_some() || start.elapsed() > Duration::from_secs(300) {
                return Err("the large guest was never protected".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        wait_exit(&mut primary.0, Duration::from_secs(600))?;
        let ran = start.elapsed();
        wait_exit(&mut standby.0, Duration::from_secs(60))?;
        let (p, s) = (stats_of(&p_stats)?, stats_of(&s_stats)?);
        if p["protected"] != true {
            return Err(format!("the large guest lost its standby: {}", p["lost_reason"]).into());
        }
        let mib = |j: &serde_json::Value| j["peak_rss_mib"].as_f64().unwrap_or(f64::NAN);
        let in_use = (2 * LARGE_N * LARGE_N * 8) as f64 / MIB;
        let held_s = p["held_ms"].as_f64().unwrap_or(0.0) / 1e3;
        let what = format!(
            "{} GiB guest, {in_use:.0} MiB in use (stencil {LARGE_N}x{LARGE_N}, \
             steps={steps}), protected from its start",
            LARGE_MEM.trim_end_matches('G')
        );
        rows.push(Row::new(
            format!(
                "{what}: time to the first acknowledged checkpoint (stats polled every 250 ms)"
            ),
            Figure::new(
                "large_time_to_protection_s",
                protected.as_secs_f64(),
                "s",
                2,
            ),
            "-",
        ));
        rows.push(Row::new(
            format!(
                "same: standby peak resident memory {:.0} MiB / guest memory in use",
                mib(&s)
            ),
            Figure::ratio("large_standby_rss_over_in_use", mib(&s) / in_use),
            "<= 1.1",
        ));
        rows.push(Row::new(
            format!(
                "same: primary peak resident memory {:.0} MiB beyond the guest's in use (its \
                 staging and its own)",
                mib(&p)
            ),
            Figure::new("large_primary_extra_mib", mib(&p) - in_use, "MiB", 0),
            "bounded",
        ));
        rows.push(Row {
            what: format!(
                "same: pause per epoch p50 / p99 ({} epochs; the guest waited for its standby \
                 {held_s:.1} s of {:.1} s)",
                p["epochs"],
                ran.as_secs_f64()
            ),
            figures: ["p50", "p99"]
                .into_iter()
                .map(|q| {
                    let us = p[format!("pause_us_{q}")].as_f64().unwrap_or(f64::NAN);
                    Figure::new(format!("large_pause_{q}_us"), us, "us", 0)
                })
                .collect(),
            target: "-",
        });
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// A guest whose working set outruns what the pair ships in an epoch: the 64 MiB stencil
/// under the default, adaptive policy, next to it unreplicated. It must stay protected
/// (`replicated` fails otherwise); the rows say how much it was slowed, and how much of that
/// was the pair holding it. (Tracking-only is no baseline here: in the run that added these
/// rows it made 8 steps/s, a 27th of unreplicated and a 7th of replicated.)
fn outrun_rows(seconds: f64, rows: &mut Vec<Row>) -> Result<(), Error> {
    let n = 2048;
    let setups = [
        Setup::Unreplicated,
        Setup::Replicated {
            epochs: EpochBounds::DEFAULT,
        },
    ];
    let runs = adjacent_runs(n, steps_for(n, seconds), &setups, 1)?;
    let [plain, replicated] = [0, 1].map(|i| median_speed(&runs, i));
    let run = &runs[0][1];
    let r = run.report.as_ref().ok_or("no replicated run")?;
    let dirty_mib = steady(r, |i| r.dirty_pages[i] as f64 * PAGE / MIB);
    let lengths: Vec<Duration> = r.lengths[steady_epochs(r)].to_vec();
    rows.push(Row::new(
        format!(
            "stencil {n}x{n} (a {} MiB working set, more than the pair ships in an epoch), \
             adaptive epochs (p50 {:.0} ms, {dirty_mib:.1} MiB dirty): replicated \
             {replicated:.0} / unreplicated {plain:.0} steps/s after the first quarter",
            working_set_mib(n),
            quantile_us(&lengths, 0.5) as f64 / 1e3,
        ),
        Figure::ratio("outrun_repl_over_unrepl", replicated / plain),
        "-",
    ));
    let slowed = r.held_time + r.throttled_time;
    rows.push(Row::new(
        format!(
            "same: share of the run the pair held the guest paused (held {} times, {:.1} s, \
             the standby behind; throttled at the reply budget {} times, {:.1} s; run {:.1} s; \
             it stayed protected)",
            r.holds,
            r.held_time.as_secs_f64(),
            r.throttles,
            r.throttled_time.as_secs_f64(),
            run.took.as_secs_f64()
        ),
        Figure::new(
            "outrun_held_percent",
            100.0 * slowed.as_secs_f64() / run.took.as_secs_f64().max(1e-9),
            "%",
            1,
        ),
        "-",
    ));
    let pauses = &r.pauses[steady_epochs(r)];
    rows.push(Row {
        what: format!("same: pause per epoch, p50 / p99 ({} epochs)", pauses.len()),
        figures: vec![
            Figure::new(
                "outrun_pause_p50_us",
                quantile_us(pauses, 0.5) as f64,
                "us",
                0,
            ),
            Figure::new(
                "outrun_pause_p99_us",
                quantile_us(pauses, 0.99) as f64,
                "us",
                0,
            ),
        ],
        target: "-",
    });
    Ok(())
}

/// All replication rows.
pub(super) fn rows(quick: bool) -> Result<Vec<Row>, Error> {
    let (seconds, reps) = if quick { (0.6, 1) } else { (2.5, 5) };
    let mut rows = Vec::new();
    for n in [256, 512, 1024] {
        throughput_rows(n, seconds, reps, &mut rows)?;
    }
    // Long epochs need longer runs to cover several of them after the first quarter.
    policy_rows(if quick { 2.0 } else { 5.0 }, reps, &mut rows)?;
    // 64 MiB per epoch: the pause only (the throughput rows stop at 16 MiB). Under PVM's
    // write-fault cost the guest dirties about 25 MiB in 40 ms, so these epochs are longer.
    let (n, epoch_ms) = (2048, 200);
    let setup = Setup::Replicated {
        epochs: EpochBounds::fixed(epoch_ms),
    };
    let run = stencil_run(n, steps_for(n, seconds), setup)?;
    pause_rows(n, epoch_ms, &run.report.ok_or("no report")?, &mut rows);
    outrun_rows(if quick { 0.3 } else { 1.0 }, &mut rows)?;
    failover_rows(if quick { 2 } else { 5 }, &mut rows)?;
    large_guest_rows(if quick { 1 } else { 4 }, &mut rows)?;
    Ok(rows)
}
