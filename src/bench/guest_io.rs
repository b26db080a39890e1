//! What output commit and the disk barrier cost a guest's clients: kv round trips and TCP
//! throughput, journal write throughput, each replicated against unreplicated in one run, and
//! the stall a client sees when the primary dies. Nodes are child processes in a test
//! topology's host namespace (their taps on its bridge); clients run in its client namespace.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use vmm::cast::{u64_to_usize, usize_to_u64};

use super::{median, Row};
use crate::pair::quantile_index;
use crate::run::{Error, Node};
use crate::testbed::{kv_pipelined, kv_sequential, Topology, BRIDGE, GUEST_IP, KV_PORT};

const MAC: &str = "02:00:00:00:00:42";
/// The failover timeout of the pairs here (the stall target is this plus 50 ms).
const TIMEOUT_MS: u64 = 200;
/// The epoch of the pairs here (ftvmm's default).
const EPOCH_MS: u64 = 40;

/// How a guest runs: alone (`ftvmm run`) or as a protected primary with a standby.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Alone,
    Replicated,
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
        if mode == Mode::Replicated {
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
            ];
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

    /// Starts kv in `mode` and waits until it listens (replicated: under protection).
    fn kv(&self, mode: Mode) -> Result<Vec<Node>, Error> {
        let net = |tap: &str| format!("--net=tap={tap},mac={MAC},bridge={BRIDGE}");
        let payload = [
            "--payload=builtin:kv".into(),
            "--".into(),
            format!("ip={GUEST_IP}/24"),
            format!("port={KV_PORT}"),
        ];
        let out = self.path("kv.out");
        let nodes = self.start(mode, &[net("ftbp0")], &[net("ftbs0")], &payload, &out)?;
        wait_console(&out, "kv listening", Duration::from_secs(60))?;
        Ok(nodes)
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

/// Round trips of `count` sequential kv requests (after a warm-up), `think` apart at most.
fn kv_round_trips(mode: Mode, count: u64, think: Duration) -> Result<Vec<Duration>, Error> {
    let bench = Bench::new("kvrtt")?;
    let _nodes = bench.kv(mode)?;
    let client = KvClient::start(&bench.topo, think);
    let warm_up = 20;
    client.reach(warm_up + count);
    let trips = client.finish()?;
    if usize_to_u64(trips.len()) < warm_up + count {
        return Err(format!("kv answered only {} requests", trips.len()).into());
    }
    Ok(trips[u64_to_usize(warm_up)..].to_vec())
}

fn kv_throughput(mode: Mode, lines: u64) -> Result<f64, Error> {
    let bench = Bench::new("kvtput")?;
    let _nodes = bench.kv(mode)?;
    let (seconds, bytes) = bench.topo.in_client(move || kv_pipelined(lines))?;
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
    let nodes = bench.kv(Mode::Replicated)?;
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

/// A row of `measure` replicated / unreplicated, naming both figures (in `unit`).
fn ratio_row(
    what: String,
    unit: &str,
    measure: impl Fn(Mode) -> Result<f64, Error>,
) -> Result<Row, Error> {
    let alone = measure(Mode::Alone)?;
    let replicated = measure(Mode::Replicated)?;
    Ok(Row {
        what: format!("{what}, replicated / unreplicated ({replicated:.1} / {alone:.1} {unit})"),
        value: format!("{:.2}", replicated / alone),
        target: "-",
    })
}

pub(super) fn rows(quick: bool) -> Result<Vec<Row>, Error> {
    let mut rows = Vec::new();
    let count = if quick { 100 } else { 500 };
    let p50_p99 = |v: Vec<Duration>| {
        format!(
            "{:.2} / {:.2} ms",
            ms(quantile(v.clone(), 0.5)),
            ms(quantile(v, 0.99))
        )
    };
    rows.push(Row {
        what: format!(
            "kv request/response round trip, unreplicated, p50 / p99 ({count} sequential \
             requests)"
        ),
        value: p50_p99(kv_round_trips(Mode::Alone, count, Duration::ZERO)?),
        target: "-",
    });
    // A client that asks again as soon as it has its answer is in step with the epochs: its
    // next request arrives just after a checkpoint and waits for the next one, a whole epoch.
    // Requests at moments unrelated to the epochs wait half an epoch on average.
    for (think, how) in [
        (Duration::ZERO, "back to back"),
        (Duration::from_millis(EPOCH_MS), "0-40 ms apart at random"),
    ] {
        rows.push(Row {
            what: format!("same, replicated ({EPOCH_MS} ms epochs), requests {how}"),
            value: p50_p99(kv_round_trips(Mode::Replicated, count, think)?),
            target: "about half an epoch plus transfer",
        });
    }

    let lines = if quick { 20_000 } else { 100_000 };
    rows.push(ratio_row(
        format!("TCP stream ({lines} pipelined kv requests)"),
        "MiB/s",
        |mode| kv_throughput(mode, lines),
    )?);
    let records = if quick { 10_000 } else { 40_000 };
    rows.push(ratio_row(
        format!("journal writes ({records} records of 512 B, a flush per 16)"),
        "records/s",
        |mode| journal_rate(mode, records),
    )?);

    let reps = if quick { 1 } else { 3 };
    for (signal, how) in [(Signal::SIGKILL, "SIGKILL"), (Signal::SIGSTOP, "SIGSTOP")] {
        let stalls: Vec<f64> = (0..reps)
            .map(|_| failover_stall(signal).map(ms))
            .collect::<Result<_, _>>()?;
        let max = stalls.iter().copied().fold(0.0, f64::max);
        rows.push(Row {
            what: format!(
                "client-observed stall at failover, {how} of the primary, timeout \
                 {TIMEOUT_MS} ms (longest kv reply wait; {reps} drills, max {max:.0} ms)"
            ),
            value: format!("{:.0} ms", median(stalls)),
            target: "<= timeout + 50 ms",
        });
    }
    Ok(rows)
}
