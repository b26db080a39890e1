//! `ftvmm primary` and `ftvmm standby`: the two roles of a replicated guest, started by hand.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use checkpoint::link::{self, LinkError, Listener, PeerConfig};
use checkpoint::outputs::Outputs;
use checkpoint::primary::{self, PrimaryEnd, PrimaryReport};
use checkpoint::standby::{self, Local, StandbyEnd, Takeover};
use disk_sync::{
    bitmap_path, EpochRecorder, MarkingBackend, RecordingBackend, Replica, WriteIntentBitmap,
};
use netbuf::{ConsoleGateSink, Gate, Ipv4, Mode, FRAME_HOLD_LIMIT};
use serde::Serialize;
use tracing::{info, warn};
use vmm::builder::HostIo;
use vmm::cast::saturating_u64;
use vmm::devices::virtio::tap::Tap;
use vmm::devices::{BlockBackend, FrameSink};
use vmm::{VmOutcome, Vmm};

use crate::options::{OnReboot, PrimaryArgs, StandbyArgs};
use crate::run::{
    boot, console_sink, exit_status, guest, host_io, open_disk, open_net, vm_config, Error,
};

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
    /// Epochs ended early because they held as much output and disk writing as one may.
    full_epochs: u64,
    precopy_pages: usize,
    pause_us_p50: u64,
    pause_us_p99: u64,
    dirty_pages_total: u64,
    wire_bytes: u64,
    page_bytes: u64,
    unprotected_at: Option<u64>,
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
    /// The guest's IPv4 addresses this node announced at takeover.
    announced: Vec<String>,
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
    let guest = guest(&args.vm)?;
    if args.vm.on_reboot == OnReboot::Restart {
        return Err("--on-reboot restart is not supported for a replicated guest (it ends)".into());
    }
    let mut io = host_io(&args.vm)?;
    // Output is held from the first byte: nothing leaves before a standby can continue from it.
    let console = std::mem::replace(
        &mut io.console,
        Box::new(vmm::devices::console::StdoutConsole),
    );
    let console = Gate::new(Box::new(console), 0, Mode::Held);
    io.console = Box::new(ConsoleGateSink(console.clone()));
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
        epoch_ms: args.epoch_ms,
        failover_timeout_ms: args.failover_timeout_ms,
        ack_timeout_ms: args.ack_timeout_ms,
    };
    // Boot (which checks the payload) before connecting, so bad input never reaches the peer.
    let recorder = record_disk(&mut io, args.vm.host.disk.as_deref())?;
    let mut vmm = boot(&config.vm, &guest, io)?;
    let outputs = Outputs::attach(console, Mode::Held, &vmm, FRAME_HOLD_LIMIT, recorder);
    let connect_timeout = Duration::from_millis(args.connect_timeout_ms);
    let link = match link::connect(&args.peer, &config, connect_timeout) {
        Ok(link) => link,
        Err(e @ LinkError::Connect { .. }) if args.allow_unprotected => {
            warn!("{e}; running unprotected (--allow-unprotected)");
            outputs.open();
            vmm.start()?;
            let outcome = vmm.wait();
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
        let result = primary::protect(vmm, outputs, link, &config, &watch);
        running.store(false, std::sync::atomic::Ordering::Relaxed);
        result
    })?;
    write_json(stats_path, &primary_stats(format!("{end:?}"), &report))?;
    match end {
        PrimaryEnd::Guest(outcome) => Ok(exit_status(outcome)),
        PrimaryEnd::Deposed => {
            Err("the standby took over; this node stopped and released nothing more".into())
        }
    }
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
        full_epochs: r.full_epochs,
        precopy_pages: r.precopy_pages,
        pause_us_p50: quantile_us(&r.pauses, 0.5),
        pause_us_p99: quantile_us(&r.pauses, 0.99),
        dirty_pages_total: r.dirty_pages_total,
        wire_bytes: r.wire_bytes,
        page_bytes: r.page_bytes,
        unprotected_at: r.unprotected_at,
    }
}

pub fn standby(args: &StandbyArgs) -> Result<ExitCode, Error> {
    // Open local resources first: a bad flag fails here, before any primary relies on us.
    let disk = open_disk(args.host.disk.as_deref())?;
    let net = open_net(args.host.net.as_ref())?;
    let (replica, bitmap) = match (&args.host.disk, &disk) {
        (Some(path), Some(backend)) => (
            Some(
                Replica::open(path)?
                    .with_sync_delay(Duration::from_millis(args.test_fsync_delay_ms)),
            ),
            Some(WriteIntentBitmap::open(&bitmap_path(path), backend.size())?),
        ),
        _ => (None, None),
    };
    let local = Local {
        disk_size: disk.as_ref().map(|d| d.size()),
        net_mac: net.as_ref().map(|(_, mac)| *mac),
        kvm_path: args.host.kvm_device.clone(),
    };
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
        announced: Vec::new(),
    };
    let result = match standby::serve(&listener, &local, replica)? {
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
            if net.is_some() {
                let held = &t.state.output;
                stats.held_frames_sent = Some(held.frames.items.len());
                stats.announced = held
                    .addresses
                    .iter()
                    .map(|a| std::net::Ipv4Addr::from(*a).to_string())
                    .collect();
            }
            // Alone now: every write marks the bitmap, for the resync when a peer returns.
            let disk = match (disk, bitmap) {
                (Some(d), Some(b)) => {
                    Some(Box::new(MarkingBackend::new(d, b)) as Box<dyn BlockBackend>)
                }
                (d, _) => d,
            };
            let outcome = match resume(*t, args, disk, net)? {
                Resumed::Running(mut vmm) => {
                    stats.restore_ms = Some(drained.elapsed().as_secs_f64() * 1e3);
                    stats.resumed_unix_us = Some(unix_us(SystemTime::now()));
                    // The takeover is on record while the guest runs on (written again at exit).
                    stats.outcome = "running".into();
                    write_json(args.host.stats_json.as_deref(), &stats)?;
                    vmm.wait()
                }
                Resumed::Ended(outcome) => outcome,
            };
            stats.outcome = format!("{outcome:?}");
            Ok(exit_status(outcome))
        }
    };
    write_json(args.host.stats_json.as_deref(), &stats)?;
    result
}

/// What a takeover resumed.
enum Resumed {
    Running(Vmm),
    /// The checkpoint was the final one of a guest that had ended this way.
    Ended(VmOutcome),
}

/// Builds the VM from the last committed checkpoint and starts it. First releases the output
/// that checkpoint holds (the primary may or may not have released it: a repeat lands at the
/// same stream offset with the same bytes).
fn resume(
    t: Takeover,
    args: &StandbyArgs,
    disk: Option<Box<dyn BlockBackend>>,
    mut net: Option<(Tap, [u8; 6])>,
) -> Result<Resumed, Error> {
    let held = &t.state.output;
    let mut console = console_sink(&args.host.console, held.console.first)?;
    for chunk in &held.console.items {
        console.write_console(&chunk.0);
    }
    if let Some((tap, mac)) = &mut net {
        for frame in &held.frames.items {
            tap.send_frame(&frame.0);
        }
        announce(tap, *mac, &held.addresses)?;
    }
    if let Some(outcome) = t.state.ended {
        info!(
            epoch = t.epoch,
            ?outcome,
            "took over a guest that had ended"
        );
        return Ok(Resumed::Ended(outcome));
    }
    let io = HostIo {
        kvm_path: args.host.kvm_device.clone(),
        console,
        disk,
        net,
    };
    let detection = standby::detection_time(&t);
    let mut vmm = t.shell.restore(&t.state.vmm, io)?;
    vmm.start()?;
    info!(
        epoch = t.epoch,
        detection_ms = detection.as_secs_f64() * 1e3,
        drain_ms = (t.drained - t.decided).as_secs_f64() * 1e3,
        restore_ms = t.drained.elapsed().as_secs_f64() * 1e3,
        "took over: the guest runs on this node"
    );
    Ok(Resumed::Running(vmm))
}

/// The pause before each round of announcements after a takeover (as QEMU's self-announce: a
/// switch that missed one round learns from the next).
const ANNOUNCE_GAPS_MS: [u64; 3] = [0, 50, 150];

/// Tells the network that the guest with `mac` (and `addresses`) is now behind `tap`, from a
/// thread while the guest runs.
fn announce(tap: &Tap, mac: [u8; 6], addresses: &[Ipv4]) -> Result<(), Error> {
    let frames = netbuf::announcements(mac, addresses);
    let mut out = tap.try_clone()?;
    info!(?addresses, "announcing the guest's new location");
    std::thread::Builder::new()
        .name("announce".into())
        .spawn(move || {
            for gap in ANNOUNCE_GAPS_MS {
                std::thread::sleep(Duration::from_millis(gap));
                for frame in &frames {
                    out.send_frame(frame);
                }
            }
        })?;
    Ok(())
}

/// Puts the primary's disk (the image at `path`) behind a recorder of the guest's writes, which
/// also marks them in the image's write-intent bitmap.
fn record_disk(io: &mut HostIo, path: Option<&Path>) -> Result<Option<EpochRecorder>, Error> {
    let (Some(inner), Some(path)) = (io.disk.take(), path) else {
        return Ok(None);
    };
    let bitmap = WriteIntentBitmap::open(&bitmap_path(path), inner.size())?;
    let (backend, recorder) = RecordingBackend::new(inner, Some(bitmap));
    io.disk = Some(Box::new(backend));
    Ok(Some(recorder))
}
