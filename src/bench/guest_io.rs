//! What output commit and the disk barrier cost a guest's clients: kv round trips (under the
//! adaptive epoch policy, next to fixed 40 ms epochs, and while another vCPU dirties 16 MiB
//! per 40 ms) and TCP throughput, journal write throughput, each replicated against
//! unreplicated in one run, and the stall a client sees when the primary dies. Nodes are child processes in a test
//! topology's host namespace (their taps on its bridge); clients run in its client namespace.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use vmm::cast::{u64_to_usize, usize_to_u64};

use super::{median, Figure, Row};
use crate::pair::quantile_index;
use crate::run::{Error, Node};
use crate::testbed::{kv_sequential, kv_stream, StreamWay, Topology, BRIDGE, GUEST_IP, KV_PORT};

const MAC: &str = "02:00:00:00:00:42";
/// The failover timeout of the pairs here (the stall target is this plus 50 ms).
const TIMEOUT_MS: u64 = 200;
/// The fixed epoch the adaptive policy is compared with (ftvmm's period before it).
const EPOCH_MS: u64 = 40;

/// How a guest runs: alone (`ftvmm run`) or as a protected primary with a standby, with the
/// default epoch policy or fixed epochs of `fixed_ms`.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Alone,
    Replicated { fixed_ms: Option<u64> },
}

const REPLICATED: Mode = Mode::Replicated { fixed_ms: None };

/// What kv runs beside its service: nothing, or another vCPU that rewrites 16 MiB of its
/// memory every 40 ms.
#[derive(Clone, Copy, PartialEq)]
enum Load {
    Light,
    HeavyDirty,
}

/// A scratch directory and a topology for one measurement, both removed when dropped.
struct Bench {
    dir: PathBuf,
    topo: Topology,
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Bench {
    fn new(tag: &str) -> Result<Self, Error> {
        let dir = std::env::temp_dir().join(format!("ftvmm-bench-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            dir,
            topo: Topology::new(tag)?,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `ftvmm ARGS` in the host namespace.
    fn node(&self, args: &[String]) -> Result<Node, Error> {
        Ok(Node(
            Command::new("ip")
                .args(["netns", "exec", &self.topo.host])
                .arg(std::env::current_exe()?)
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        ))
    }

    /// Starts `payload` in `mode` with `vm` flags (the primary's; a standby gets `standby_vm`),
    /// its console (released output) in `out`. Returns the nodes, the primary first.
    fn start(
        &self,
        mode: Mode,
        vm: &[String],
        standby_vm: &[String],
        payload: &[String],
        out: &Path,
    ) -> Result<Vec<Node>, Error> {
        let _ = std::fs::remove_file(out);
        let mut nodes = Vec::new();
        let mut args = vec!["run".to_string()];
        if let Mode::Replicated { fixed_ms } = mode {
            // Loopback of the host namespace, which this measurement has to itself.
            let addr = "127.0.0.1:7700";
            let mut standby = vec!["standby".into(), format!("--listen={addr}")];
            standby.extend_from_slice(standby_vm);
            standby.push(format!("--console=file:{}", self.path("s.out").display()));
            nodes.push(self.node(&standby)?);
            args = vec![
                "primary".into(),
                format!("--peer={addr}"),
                format!("--failover-timeout-ms={TIMEOUT_MS}"),
                format!("--stats-json={}", self.path("p.json").display()),
            ];
            args.extend(fixed_ms.map(|ms| format!("--epoch-ms={ms}")));
        }
        args.extend_from_slice(vm);
        args.extend([
            "--mem=64M".into(),
            format!("--console=file:{}", out.display()),
        ]);
        args.extend_from_slice(payload);
        nodes.insert(0, self.node(&args)?);
        Ok(nodes)
    }

    /// Starts kv in `mode` beside `load` and waits until it listens (replicated: under
    /// protection).
    fn kv(&self, mode: Mode, load: Load) -> Result<Vec<Node>, Error> {
        let net = |tap: &str| format!("--net=tap={tap},mac={MAC},bridge={BRIDGE}");
        let mut payload = vec![
            "--payload=builtin:kv".into(),
            "--".into(),
            format!("ip={GUEST_IP}/24"),
            format!("port={KV_PORT}"),
        ];
        let mut vm = vec![net("ftbp0")];
        if load == Load::HeavyDirty {
            vm.push("--vcpus=2".into());
            payload.push("dirty=16".into());
        }
        let out = self.path("kv.out");
        let nodes = self.start(mode, &vm, &[net("ftbs0")], &payload, &out)?;
        wait_console(&out, "kv listening", Duration::from_secs(60))?;
        Ok(nodes)
    }

    /// The primary's `--stats-json` as it last wrote it.
    fn primary_stats(&self) -> Result<serde_json::Value, Error> {
        Ok(serde_json::from_slice(&std::fs::read(
            self.path("p.json"),
        )?)?)
    }
}

/// Waits until the console file at `path` has a line starting with `prefix`; returns it.
fn wait_console(path: &Path, prefix: &str, limit: Duration) -> Result<String, Error> {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.starts_with(prefix)) {
            return Ok(line.to_string());
        }
        if start.elapsed() > limit {
            return Err(format!("no '{prefix}' line within {limit:?}").into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The `q`-quantile of `v`.
fn quantile(mut v: Vec<Duration>, q: f64) -> Duration {
    v.sort_unstable();
    v[quantile_index(v.len(), q)]
}

/// A [`kv_sequential`] client running in the topology's client namespace.
struct KvClient {
    progress: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<Vec<Duration>, String>>,
}

impl KvClient {
    fn start(topo: &Topology, think: Duration) -> Self {
        let progress = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (progress, stop) = (progress.clone(), stop.clone());
            topo.spawn_in_client(move || kv_sequential(&progress, &stop, think))
        };
        Self {
            progress,
            stop,
            thread,
        }
    }

    /// Waits (at most a minute) until `n` requests are answered; returns how many are.
    fn reach(&self, n: u64) -> u64 {
        let start = Instant::now();
        while self.progress.load(Ordering::SeqCst) < n
            && !self.thread.is_finished()
            && start.elapsed() < Duration::from_secs(60)
        {
            std::thread::sleep(Duration::from_millis(2));
        }
        self.progress.load(Ordering::SeqCst)
    }

    /// Stops the client; every request's round trip, or what broke the stream.
    fn finish(self) -> Result<Vec<Duration>, Error> {
        self.stop.store(true, Ordering::SeqCst);
        Ok(self.thread.join().map_err(|_| "kv client panicked")??)
    }
}

/// Round trips of `count` sequential kv requests (after a warm-up), `think` apart at most,
/// and the primary's stats at the end (replicated).
fn kv_round_trips(
    mode: Mode,
    load: Load,
    count: u64,
    think: Duration,
) -> Result<(Vec<Duration>, Option<serde_json::Value>), Error> {
    let bench = Bench::new("kvrtt")?;
    let _nodes = bench.kv(mode, load)?;
    let client = KvClient::start(&bench.topo, think);
    let warm_up = 20;
    client.reach(warm_up + count);
    let trips = client.finish()?;
    if usize_to_u64(trips.len()) < warm_up + count {
        return Err(format!("kv answered only {} requests", trips.len()).into());
    }
    let stats = match mode {
        Mode::Alone => None,
        Mode::Replicated { .. } => {
            // Written every 250 ms: wait for one that covers the requests.
            std::thread::sleep(Duration::from_millis(300));
            Some(bench.primary_stats()?)
        }
    };
    Ok((trips[u64_to_usize(warm_up)..].to_vec(), stats))
}

/// MiB/s of a one-way kv stream of `chunks` requests of 64 KiB.
fn kv_stream_rate(mode: Mode, way: StreamWay, chunks: u64) -> Result<f64, Error> {
    let bench = Bench::new("kvstream")?;
    let _nodes = bench.kv(mode, Load::Light)?;
    let (seconds, bytes) = bench
        .topo
        .in_client(move || kv_stream(way, chunks, &AtomicU64::new(0)))?;
    Ok(bytes as f64 / (1 << 20) as f64 / seconds)
}

/// Records per second of `builtin:journal` writing `records` (fresh images each run).
fn journal_rate(mode: Mode, records: u64) -> Result<f64, Error> {
    let bench = Bench::new("journal")?;
    let image = |name: &str| -> Result<String, Error> {
        let path = bench.path(name);
        std::fs::File::create(&path)?.set_len((records * 512).next_multiple_of(1 << 20))?;
        Ok(format!("--disk={}", path.display()))
    };
    let (p_disk, s_disk) = (image("p.img")?, image("s.img")?);
    let payload = [
        "--payload=builtin:journal".into(),
        "--".into(),
        records.to_string(),
    ];
    let out = bench.path("journal.out");
    let _nodes = bench.start(mode, &[p_disk], &[s_disk], &payload, &out)?;
    let done = wait_console(&out, "done ", Duration::from_secs(300))?;
    let us: f64 = done
        .strip_prefix(&format!("done {records} records in "))
        .and_then(|r| r.strip_suffix(" us"))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("unexpected journal line: {done}"))?;
    Ok(records as f64 / (us / 1e6))
}

/// The longest wait a kv client sees for a reply when the primary gets `signal` mid-stream.
fn failover_stall(signal: Signal) -> Result<Duration, Error> {
    let bench = Bench::new("stall")?;
    let nodes = bench.kv(REPLICATED, Load::Light)?;
    let client = KvClient::start(&bench.topo, Duration::ZERO);
    let at_fault = client.reach(100);
    kill(nodes[0].pid()?, signal)?;
    let after = client.reach(at_fault + 100);
    let trips = client.finish()?;
    if after < at_fault + 100 {
        return Err("the kv stream did not go on after the failover".into());
    }
    Ok(trips[u64_to_usize(at_fault)..]
        .iter()
        .copied()
        .max()
        .unwrap_or_default())
}

/// A row of `measure` replicated / unreplicated under `id`, naming both figures (in `unit`).
fn ratio_row(
    what: String,
    id: &str,
    unit: &str,
    target: &'static str,
    measure: impl Fn(Mode) -> Result<f64, Error>,
) -> Result<Row, Error> {
    let alone = measure(Mode::Alone)?;
    let replicated = measure(REPLICATED)?;
    Ok(Row::new(
        format!("{what}, replicated / unreplicated ({replicated:.1} / {alone:.1} {unit})"),
        Figure::new(id, replicated / alone, "ratio", 2),
        target,
    ))
}

/// A row of round trips' p50 and p99, under `{id}_p50_ms`-style ids (`p50` and `p99` replace
/// `{q}` in `id`).
fn p50_p99(what: String, id: &str, trips: &[Duration], target: &'static str) -> Row {
    let figure = |q: &str, v: f64| Figure::new(id.replace("{q}", q), v, "ms", 2);
    Row {
        what,
        figures: vec![
            figure("p50", ms(quantile(trips.to_vec(), 0.5))),
            figure("p99", ms(quantile(trips.to_vec(), 0.99))),
        ],
        target,
    }
}

/// Epoch lengths and why epochs ended, from a primary's stats, for a row's text.
fn epochs_said(stats: &serde_json::Value) -> String {
    let ends = stats["epoch_ends"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(_, n)| n.as_u64().is_some_and(|n| n > 0))
                .map(|(why, n)| format!("{why} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    format!(
        "epochs p50 {:.1} ms, p99 {:.1} ms; ended by: {ends}",
        stats["epoch_ms_p50"].as_f64().unwrap_or(0.0),
        stats["epoch_ms_p99"].as_f64().unwrap_or(0.0)
    )
}

pub(super) fn rows(quick: bool) -> Result<Vec<Row>, Error> {
    let mut rows = Vec::new();
    let count = if quick { 100 } else { 500 };
    let (trips, _) = kv_round_trips(Mode::Alone, Load::Light, count, Duration::ZERO)?;
    rows.push(p50_p99(
        format!(
            "kv request/response round trip, unreplicated, p50 / p99 ({count} sequential \
             requests)"
        ),
        "kv_unrepl_{q}_ms",
        &trips,
        "-",
    ));
    // With fixed epochs a client that asks again as soon as it has its answer is in step with
    // the epochs: its next request arrives just after a checkpoint and waits for the next one,
    // a whole epoch; requests at moments unrelated to the epochs wait half an epoch on
    // average. The adaptive policy ends the epoch once a reply waits (at most the minimum
    // interval after the epoch began).
    let random = Duration::from_millis(EPOCH_MS);
    for (mode, think, how, id, target) in [
        (
            REPLICATED,
            Duration::ZERO,
            "adaptive epochs (the default), requests back to back",
            "kv_{q}_ms",
            "p50 <= 3 ms, p99 <= 10 ms",
        ),
        (
            REPLICATED,
            random,
            "adaptive epochs, requests 0-40 ms apart at random",
            "kv_random_{q}_ms",
            "p50 <= 3 ms, p99 <= 10 ms",
        ),
        (
            Mode::Replicated {
                fixed_ms: Some(EPOCH_MS),
            },
            Duration::ZERO,
            "fixed 40 ms epochs, requests back to back",
            "kv_fixed40_{q}_ms",
            "about an epoch plus transfer",
        ),
        (
            Mode::Replicated {
                fixed_ms: Some(EPOCH_MS),
            },
            random,
            "fixed 40 ms epochs, requests 0-40 ms apart at random",
            "kv_fixed40_random_{q}_ms",
            "about half an epoch plus transfer",
        ),
    ] {
        let (trips, stats) = kv_round_trips(mode, Load::Light, count, think)?;
        let said = stats.as_ref().map(epochs_said).unwrap_or_default();
        rows.push(p50_p99(
            format!("same, replicated, {how} ({said})"),
            id,
            &trips,
            target,
        ));
    }
    // Another vCPU rewrites 16 MiB every 40 ms (with fresh data: lz4 gains nothing).
    let (trips, _) = kv_round_trips(Mode::Alone, Load::HeavyDirty, count, Duration::ZERO)?;
    rows.push(p50_p99(
        "kv round trip, unreplicated, while another vCPU dirties 16 MiB per 40 ms, requests \
         back to back"
            .into(),
        "kv_unrepl_{q}_ms_heavy_dirty",
        &trips,
        "-",
    ));
    let (trips, stats) = kv_round_trips(REPLICATED, Load::HeavyDirty, count, Duration::ZERO)?;
    let stats = stats.ok_or("no stats of the replicated kv")?;
    rows.push(p50_p99(
        format!(
            "same, replicated, adaptive epochs ({})",
            epochs_said(&stats)
        ),
        "kv_{q}_ms_heavy_dirty",
        &trips,
        "p99 <= 45 ms (a 40 ms epoch + 5 ms)",
    ));

    let chunks: u64 = if quick { 256 } else { 1024 };
    for (way, how, id) in [
        (StreamWay::In, "into the guest", "tcp_stream_ratio_in"),
        (StreamWay::Out, "out of the guest", "tcp_stream_ratio_out"),
    ] {
        rows.push(ratio_row(
            format!(
                "TCP stream {how} ({} MiB in pipelined kv requests of 64 KiB, one connection)",
                chunks / 16
            ),
            id,
            "MiB/s",
            ">= 0.5",
            |mode| kv_stream_rate(mode, way, chunks),
        )?);
    }
    let records = if quick { 10_000 } else { 40_000 };
    rows.push(ratio_row(
        format!("journal writes ({records} records of 512 B, a flush per 16)"),
        "journal_ratio",
        "records/s",
        ">= 0.9",
        |mode| journal_rate(mode, records),
    )?);

    let reps = if quick { 1 } else { 3 };
    for (signal, how, id, target) in [
        (Signal::SIGKILL, "SIGKILL", "stall_ms_sigkill", "<= 50 ms"),
        (
            Signal::SIGSTOP,
            "SIGSTOP",
            "stall_ms_sigstop",
            "<= timeout + 50 ms",
        ),
    ] {
        let stalls: Vec<f64> = (0..reps)
            .map(|_| failover_stall(signal).map(ms))
            .collect::<Result<_, _>>()?;
        let max = stalls.iter().copied().fold(0.0, f64::max);
        rows.push(Row::new(
            format!(
                "client-observed stall at failover, {how} of the primary, timeout \
                 {TIMEOUT_MS} ms (longest kv reply wait; {reps} drills, max {max:.0} ms)"
            ),
            Figure::new(id, median(stalls), "ms", 0),
            target,
        ));
    }
    Ok(rows)
}
