//! `ftvmm primary` and `ftvmm standby`: the two roles of a replicated guest, started by hand.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use checkpoint::link::{self, LinkError, Listener, PeerConfig};
use checkpoint::policy::EpochEnd;
use checkpoint::primary::{self, PrimaryEnd, PrimaryReport};
use checkpoint::standby::{self, StandbyEnd, StandbyWatch};
use node::guest::{boot_primary, Resumed, StandbyHost};
use serde::Serialize;
use tracing::{info, warn};
use vmm::cast::saturating_u64;
use vmm::VmOutcome;

use crate::options::{OnReboot, PrimaryArgs, StandbyArgs};
use crate::run::{exit_status, guest, vm_config, Error};

/// What `--stats-json` records about a primary's run (machine-readable status), written while
/// it runs and at its end.
#[derive(Serialize)]
struct PrimaryStats {
    role: &'static str,
    /// "running" until the run ends, then how it ended.
    outcome: String,
    protected: bool,
    /// "ok", "standby slow" or "standby lost".
    standby: &'static str,
    /// Why protection was dropped, if it was.
    lost_reason: Option<String>,
    epochs: u64,
    acked: u64,
    /// Age of the oldest unacknowledged checkpoint, now.
    oldest_unacked_ms: Option<u64>,
    slow_episodes: u64,
    slow_ms: u64,
    /// Times the guest was held paused while the standby was behind, and for how long.
    holds: u64,
    held_ms: u64,
    /// Times the guest was held because its output waited for the sender while it dirtied
    /// memory faster than the pair ships it, and for how long: how much it was slowed.
    throttles: u64,
    throttled_ms: u64,
    /// Lengths of the recent epochs the epoch policy chose.
    epoch_ms_p50: f64,
    epoch_ms_p99: f64,
    /// Epochs by why they ended: output waiting, dirty budget, bytes (output and disk writes
    /// at their bound), amortized (a silent epoch long enough), max (the maximum or fixed
    /// period), exit (the guest's final checkpoint).
    epoch_ends: BTreeMap<&'static str, u64>,
    /// How long the running epoch has run.
    epoch_running_ms: Option<u64>,
    precopy_pages: usize,
    pause_us_p50: u64,
    pause_us_p99: u64,
    dirty_pages_total: u64,
    wire_bytes: u64,
    page_bytes: u64,
    unprotected_at: Option<u64>,
    /// The most memory this process has held resident so far (VmHWM), MiB.
    peak_rss_mib: Option<f64>,
}

/// How often a running primary rewrites its `--stats-json`.
const STATS_EVERY: Duration = Duration::from_millis(250);

/// What `--stats-json` records about a standby.
#[derive(Serialize)]
struct StandbyStats {
    role: &'static str,
    outcome: String,
    took_over: bool,
    epoch: Option<u64>,
    reason: Option<String>,
    detection_ms: Option<f64>,
    restore_ms: Option<f64>,
    /// Wall-clock times (µs since the Unix epoch) of the takeover decision and of the guest
    /// running again, so that a drill can measure from the moment it killed the primary.
    decided_unix_us: Option<u64>,
    resumed_unix_us: Option<u64>,
    /// From the decision to the last committed checkpoint ready to build (drain and decode).
    drain_ms: Option<f64>,
    /// Network frames the last checkpoint held, sent by this node at takeover.
    held_frames_sent: Option<usize>,
    /// Frames the guest received after its last checkpoint, delivered to it again here.
    input_frames_delivered: Option<usize>,
    /// The guest's IPv4 addresses this node announced at takeover.
    announced: Vec<String>,
    /// The most memory this process has held resident (VmHWM), MiB, when the stats were
    /// written.
    peak_rss_mib: Option<f64>,
}

/// `t` in microseconds since the Unix epoch (the stats' wall-clock times).
pub fn unix_us(t: SystemTime) -> u64 {
    saturating_u64(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_micros())
}

/// Where the `q`-quantile (`q` in 0..=1) of `len` sorted values stands, for `len` > 0.
// The rounded product lies in 0..len: the conversion neither truncates nor loses a sign.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub fn quantile_index(len: usize, q: f64) -> usize {
    ((len - 1) as f64 * q).round() as usize
}

/// The `q`-quantile of `values` in microseconds.
pub fn quantile_us(values: &[Duration], q: f64) -> u64 {
    let mut v: Vec<u64> = values
        .iter()
        .map(|d| saturating_u64(d.as_micros()))
        .collect();
    v.sort_unstable();
    match v.len() {
        0 => 0,
        n => v[quantile_index(n, q)],
    }
}

/// Writes `value` to `path` whole (through a temporary file and a rename), so that a reader
/// polling it while this node runs never sees half of it.
fn write_json(path: Option<&Path>, value: &impl Serialize) -> Result<(), Error> {
    if let Some(path) = path {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(value)?)
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

pub fn primary(args: &PrimaryArgs) -> Result<ExitCode, Error> {
    let image = guest(&args.vm)?;
    if args.vm.on_reboot == OnReboot::Restart {
        return Err("--on-reboot restart is not supported for a replicated guest (it ends)".into());
    }
    if args.ack_timeout_ms <= args.failover_timeout_ms {
        return Err(format!(
            "--ack-timeout-ms ({}) must be longer than --failover-timeout-ms ({}): a standby \
             that is alive but slow must not be dropped before a silent one",
            args.ack_timeout_ms, args.failover_timeout_ms
        )
        .into());
    }
    let config = PeerConfig {
        vm: vm_config(&args.vm),
        disk_size: match &args.vm.host.disk {
            Some(path) => Some(std::fs::metadata(path)?.len()),
            None => None,
        },
        net_mac: args.vm.host.net.as_ref().map(|n| n.mac),
        epochs: args.epochs()?,
        failover_timeout_ms: args.failover_timeout_ms,
        ack_timeout_ms: args.ack_timeout_ms,
        resync_max_mib_s: 0,
    };
    // Boot (which checks the payload) before connecting, so bad input never reaches the peer.
    // Output is held from the first byte: nothing leaves before a standby can continue from it.
    let mut guest = boot_primary(&config.vm, &image, &args.vm.host.spec(), true)?;
    let connect_timeout = Duration::from_millis(args.connect_timeout_ms);
    let link = match link::connect(&args.peer, &config, connect_timeout) {
        Ok(link) => link,
        Err(e @ LinkError::Connect { .. }) if args.allow_unprotected => {
            warn!("{e}; running unprotected (--allow-unprotected)");
            guest.outputs.open();
            guest.vmm.start()?;
            let outcome = guest.vmm.wait();
            return Ok(exit_status(outcome));
        }
        Err(e) => return Err(e.into()),
    };
    info!(peer = %args.peer, "standby connected; protecting the guest");
    let watch = primary::Watch::default();
    let stats_path = args.vm.host.stats_json.as_deref();
    let running = std::sync::atomic::AtomicBool::new(true);
    let (end, report) = std::thread::scope(|s| {
        if let Some(path) = stats_path {
            let (watch, running) = (&watch, &running);
            s.spawn(move || {
                while running.load(std::sync::atomic::Ordering::Relaxed) {
                    let stats = primary_stats("running".into(), &watch.snapshot());
                    if let Err(e) = write_json(Some(path), &stats) {
                        warn!("{e}");
                    }
                    std::thread::sleep(STATS_EVERY);
                }
            });
        }
        let result = primary::protect(guest, link, &config, &watch);
        running.store(false, std::sync::atomic::Ordering::Relaxed);
        result
    })?;
    let outcome = match end {
        PrimaryEnd::Guest(outcome) => outcome,
        PrimaryEnd::Deposed => {
            write_json(stats_path, &primary_stats("Deposed".into(), &report))?;
            return Err(
                "the standby took over; this node stopped and released nothing more".into(),
            );
        }
        // Unprotected from now on, as the log said: the guest runs to its end here.
        PrimaryEnd::Alone { mut guest, .. } => guest.vmm.wait(),
        // Only node daemons ask for swaps.
        PrimaryEnd::HandedOver(_) => return Err("the guest was handed over".into()),
    };
    write_json(
        stats_path,
        &primary_stats(format!("Guest({outcome:?})"), &report),
    )?;
    Ok(exit_status(outcome))
}

fn primary_stats(outcome: String, r: &PrimaryReport) -> PrimaryStats {
    let ms = |d: Duration| vmm::cast::saturating_u64(d.as_millis());
    PrimaryStats {
        role: "primary",
        outcome,
        protected: r.unprotected_at.is_none() && r.lost_reason.is_none(),
        standby: r.standby.as_str(),
        lost_reason: r.lost_reason.clone(),
        epochs: r.epochs,
        acked: r.acked,
        oldest_unacked_ms: r.oldest_unacked.map(ms),
        slow_episodes: r.slow_episodes,
        slow_ms: ms(r.slow_time),
        holds: r.holds,
        held_ms: ms(r.held_time),
        throttles: r.throttles,
        throttled_ms: ms(r.throttled_time),
        epoch_ms_p50: quantile_us(&r.lengths, 0.5) as f64 / 1e3,
        epoch_ms_p99: quantile_us(&r.lengths, 0.99) as f64 / 1e3,
        epoch_ends: EpochEnd::ALL
            .iter()
            .map(|&e| (e.as_str(), r.ends.get(&e).copied().unwrap_or(0)))
            .collect(),
        epoch_running_ms: r.epoch_began.map(|t| ms(t.elapsed())),
        precopy_pages: r.precopy_pages,
        pause_us_p50: quantile_us(&r.pauses, 0.5),
        pause_us_p99: quantile_us(&r.pauses, 0.99),
        dirty_pages_total: r.dirty_pages_total,
        wire_bytes: r.wire_bytes,
        page_bytes: r.page_bytes,
        unprotected_at: r.unprotected_at,
        peak_rss_mib: peak_rss_mib(),
    }
}

/// This process's peak resident memory (VmHWM in /proc/self/status), MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

pub fn standby(args: &StandbyArgs) -> Result<ExitCode, Error> {
    // Open local resources first: a bad flag fails here, before any primary relies on us.
    let sync_delay = Duration::from_millis(args.test_fsync_delay_ms);
    let mut host = StandbyHost::open(&args.host.spec(), &BTreeSet::new(), sync_delay)?;
    let listener = Listener::bind(&args.listen)?;
    info!(listen = %args.listen, "waiting for a primary");
    let mut stats = StandbyStats {
        role: "standby",
        outcome: String::new(),
        took_over: false,
        epoch: None,
        reason: None,
        detection_ms: None,
        restore_ms: None,
        decided_unix_us: None,
        resumed_unix_us: None,
        drain_ms: None,
        held_frames_sent: None,
        input_frames_delivered: None,
        announced: Vec::new(),
        peak_rss_mib: None,
    };
    let disk = host.take_disk();
    let result = match standby::serve(&listener, &host.local, disk, &StandbyWatch::default())? {
        StandbyEnd::Exit(code) => {
            stats.outcome = format!("guest exited on the primary with {code}");
            Ok(exit_status(VmOutcome::Exited(code)))
        }
        StandbyEnd::Goodbye => {
            stats.outcome = "goodbye".into();
            Err("the primary continues without this standby (it said goodbye)".into())
        }
        StandbyEnd::Takeover(t) => {
            stats.took_over = true;
            stats.epoch = Some(t.epoch);
            stats.reason = Some(t.reason.clone());
            stats.detection_ms = Some(standby::detection_time(&t).as_secs_f64() * 1e3);
            stats.decided_unix_us = Some(unix_us(SystemTime::now() - t.decided.elapsed()));
            stats.drain_ms = Some((t.drained - t.decided).as_secs_f64() * 1e3);
            let drained = t.drained;
            if host.has_net() {
                let held = &t.state.output;
                stats.held_frames_sent = Some(held.frames.items.len());
                stats.input_frames_delivered = Some(t.input.len());
                stats.announced = held
                    .addresses
                    .iter()
                    .map(|a| std::net::Ipv4Addr::from(*a).to_string())
                    .collect();
            }
            let outcome = match host.resume(*t)? {
                Resumed::Running(mut guest) => {
                    stats.restore_ms = Some(drained.elapsed().as_secs_f64() * 1e3);
                    stats.resumed_unix_us = Some(unix_us(SystemTime::now()));
                    // The takeover is on record while the guest runs on (written again at exit).
                    stats.outcome = "running".into();
                    stats.peak_rss_mib = peak_rss_mib();
                    write_json(args.host.stats_json.as_deref(), &stats)?;
                    guest.vmm.wait()
                }
                Resumed::Ended(outcome) => outcome,
                Resumed::Swapped { .. } => {
                    return Err("the primary handed over; only node daemons swap".into())
                }
            };
            stats.outcome = format!("{outcome:?}");
            Ok(exit_status(outcome))
        }
    };
    stats.peak_rss_mib = peak_rss_mib();
    write_json(args.host.stats_json.as_deref(), &stats)?;
    result
}
