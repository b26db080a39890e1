//! The self-healing pair as an operator sees it (`--only pair`): what a returning node's
//! resync sends against what changed and against a plain copy, how long a 1 GiB guest takes
//! to be protected again, what each idle protected VM costs when 32 share a pair, the
//! downtime of a swap as a kv client sees it, and each drill's report. Node daemons of this
//! binary on loopback (and, for the client, in test namespaces).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use node::config::{self, Config};
use node::status::{Role, VmStatus};

use super::{Figure, Row};
use crate::run::{Error, Node};
use crate::testbed::{
    kv_sequential, PairTopology, BRIDGE, GUEST_IP, HOST_A_IP, HOST_B_IP, KV_PORT,
};

const MIB: f64 = 1024.0 * 1024.0;
const LIMIT: Duration = Duration::from_secs(600);
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// Two node daemons of one config in a scratch directory.
struct Pair {
    dir: PathBuf,
    config: Config,
    daemons: Vec<Option<Node>>,
    /// Network namespaces of nodes a and b, if they run in some.
    namespaces: Option<(String, String)>,
}

impl Pair {
    /// A pair whose nodes are `ips` (a, b), with `rest` (policy and VMs; `{dir}` is the
    /// scratch directory) after the nodes' sections.
    fn new(
        tag: &str,
        ips: (&str, &str),
        namespaces: Option<(String, String)>,
        rest: &str,
    ) -> Result<Self, Error> {
        let dir =
            std::env::temp_dir().join(format!("ftvmm-bench-pair-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let d = dir.display().to_string();
        let port =
            || -> Result<u16, Error> { Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()) };
        let text = format!(
            "[nodes.a]\ncontrol = \"{}:{}\"\nreplication = \"{}\"\nsocket = \"{d}/a.sock\"\n\
             state_dir = \"{d}/a\"\n\n[nodes.b]\ncontrol = \"{}:{}\"\nreplication = \"{}\"\n\
             socket = \"{d}/b.sock\"\nstate_dir = \"{d}/b\"\n\n{}",
            ips.0,
            port()?,
            ips.0,
            ips.1,
            port()?,
            ips.1,
            rest.replace("{dir}", &d)
        );
        let path = dir.join("pair.toml");
        std::fs::write(&path, text)?;
        let config = config::load(&path)?;
        Ok(Self {
            dir,
            config,
            daemons: vec![None, None],
            namespaces,
        })
    }

    fn start(&mut self, i: usize) -> Result<(), Error> {
        let exe = std::env::current_exe()?;
        let name = self.config.nodes[i].name.clone();
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))?;
        let mut cmd = match &self.namespaces {
            Some((a, b)) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", if i == 0 { a } else { b }])
                    .arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        cmd.args(["node", "--config"])
            .arg(&self.config.path)
            .args(["--name", &name])
            .env("FTVMM_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        self.daemons[i] = Some(Node(cmd.spawn()?));
        Ok(())
    }

    fn kill(&mut self, i: usize) -> Result<(), Error> {
        if let Some(mut d) = self.daemons[i].take() {
            d.0.kill()?;
            d.0.wait()?;
        }
        Ok(())
    }

    fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("{}.log", self.config.nodes[i].name)))
            .unwrap_or_default()
    }

    fn vm(&self, i: usize, vm: &str) -> Option<VmStatus> {
        let s = node::control::query_status(&self.config.nodes[i], STATUS_TIMEOUT).ok()?;
        s.vms.into_iter().find(|v| v.name == vm)
    }

    fn wait(
        &self,
        i: usize,
        vm: &str,
        what: &str,
        cond: impl Fn(&VmStatus) -> bool,
    ) -> Result<VmStatus, Error> {
        let start = Instant::now();
        loop {
            if let Some(s) = self.vm(i, vm).filter(|s| cond(s)) {
                return Ok(s);
            }
            if start.elapsed() > LIMIT {
                return Err(format!("bench pair: {vm} on node {i} did not {what}").into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn wait_protected(&self, primary: usize, vm: &str) -> Result<(), Error> {
        self.wait(primary, vm, "protect", |s| {
            s.role == Role::Primary && s.protected
        })?;
        self.wait(1 - primary, vm, "stand by", |s| s.role == Role::Standby)?;
        Ok(())
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for d in self.daemons.iter_mut().flatten() {
            let _ = d.0.kill();
            let _ = d.0.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The last `key=value` of the log lines containing `needle`.
fn logged<T: std::str::FromStr>(log: &str, needle: &str, key: &str) -> Option<T> {
    log.lines()
        .rev()
        .filter(|l| l.contains(needle))
        .find_map(|l| {
            l.split(&format!("{key}="))
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
}

/// The journal's last `committed N` in a console file.
fn committed(console: &Path) -> u64 {
    let bytes = std::fs::read(console).unwrap_or_default();
    String::from_utf8_lossy(&bytes)
        .lines()
        .filter_map(|l| {
            l.trim_matches('\0')
                .strip_prefix("committed ")?
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(0)
}

/// Sends `bytes` bytes of `image` from `offset` over a loopback TCP connection to a receiver
/// that writes them to a file and fdatasyncs every 8 MiB, as a resync does; returns MiB/s.
fn plain_copy(image: &Path, offset: u64, bytes: u64, into: &Path) -> Result<f64, Error> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let into = into.to_path_buf();
    let receiver = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        let mut out = std::fs::File::create(into)?;
        let mut buf = vec![0u8; 1 << 20];
        let (mut got, mut since_sync) = (0u64, 0u64);
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n])?;
            got += n as u64;
            since_sync += n as u64;
            if since_sync >= 8 << 20 {
                out.sync_data()?;
                since_sync = 0;
            }
        }
        out.sync_data()?;
        let _ = got;
        Ok(())
    });
    let start = Instant::now();
    let mut src = std::fs::File::open(image)?;
    std::io::Seek::seek(&mut src, std::io::SeekFrom::Start(offset))?;
    let mut s = TcpStream::connect(addr)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = src.read(&mut buf[..(left.min(1 << 20)) as usize])?;
        if n == 0 {
            break;
        }
        s.write_all(&buf[..n])?;
        left -= n as u64;
    }
    drop(s);
    receiver.join().map_err(|_| "copy receiver panicked")??;
    Ok(bytes as f64 / MIB / start.elapsed().as_secs_f64())
}

/// A 1 GiB guest writing its journal: node a protects it, is killed, b goes on alone while
/// 256 MiB more are written, a returns: the resync against what changed and against a plain
/// copy, and the time to protection.
fn resync_rows(rows: &mut Vec<Row>, quick: bool) -> Result<(), Error> {
    let away_mib: u64 = if quick { 64 } else { 256 };
    let vm = "[policy]\nfailover_timeout_ms = 1000\nack_timeout_ms = 30000\nfailback = \"manual\"\n\n\
              [[vm]]\nname = \"log\"\npayload = \"builtin:journal\"\nargs = [\"4000000\", \"batch=64\"]\n\
              mem = \"1G\"\n[vm.nodes.a]\ndisk = \"{dir}/a.img\"\nconsole = \"{dir}/a.console\"\n\
              [vm.nodes.b]\ndisk = \"{dir}/b.img\"\nconsole = \"{dir}/b.console\"\n";
    let mut pair = Pair::new("resync", ("127.0.0.1", "127.0.0.1"), None, vm)?;
    for n in ["a", "b"] {
        std::fs::File::create(pair.dir.join(format!("{n}.img")))?.set_len(2 << 30)?;
    }
    pair.start(0)?;
    pair.start(1)?;
    pair.wait_protected(0, "log")?;
    let acked_at_kill = committed(&pair.dir.join("a.console"));
    pair.kill(0)?;
    pair.wait(1, "log", "take over", |s| s.role == Role::Primary)?;
    let b_console = pair.dir.join("b.console");
    let target = acked_at_kill + away_mib * 2048;
    let start = Instant::now();
    let alone_from = committed(&b_console);
    while committed(&b_console) < target {
        if start.elapsed() > LIMIT {
            return Err("bench pair: the journal did not write enough".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let alone_rate = (committed(&b_console) - alone_from) as f64 / start.elapsed().as_secs_f64();
    // The baseline runs just before a returns, under the load the resync meets (b's guest
    // writing its journal alone), on about the bytes the resync will send; the mean of two.
    // The blocks of the records written from the last one a had acknowledged (64 KiB blocks
    // of 128 records).
    let first_block = acked_at_kill / 128;
    let first = first_block * 65536;
    let volume = committed(&b_console).div_ceil(128) * 65536 - first;
    let copy = pair.dir.join("copy.img");
    let mut plain = 0.0;
    for _ in 0..2 {
        plain += plain_copy(&pair.dir.join("b.img"), first, volume, &copy)? / 2.0;
        std::fs::remove_file(&copy)?;
    }
    let back = Instant::now();
    let back_at = committed(&b_console);
    pair.start(0)?;
    pair.wait(0, "log", "sync", |s| s.role == Role::Syncing)?;
    let written_when_synced = committed(&b_console);
    pair.wait_protected(1, "log")?;
    let reprotected = back.elapsed().as_secs_f64();
    let reprotect_rate = (committed(&b_console) - back_at) as f64 / reprotected;
    let log = pair.log(1);
    let sent: u64 = logged(&log, "resync of the disk begins", "bytes").unwrap_or(0);
    // What the resync sent in all: the plan, and the blocks written while it ran.
    let total: u64 = logged(&log, "resync of the disk sent", "sent").unwrap_or(0);
    let secs: f64 = logged(&log, "resync of the disk sent", "secs").unwrap_or(f64::NAN);
    // Those blocks up to the resync's start.
    let last_block = written_when_synced.div_ceil(128);
    let changed = (last_block - first_block) as f64 * 65536.0;
    let rate = total as f64 / MIB / secs;
    let sent = sent as f64;
    rows.push(Row {
        what: format!(
            "resync after {away_mib} MiB written while the node was away (journal, 1 GiB guest): \
             bytes sent {:.1} MiB / bytes of blocks changed {:.1} MiB",
            sent / MIB,
            changed / MIB
        ),
        figures: vec![Figure::new(
            "resync_sent_over_changed",
            sent / changed,
            "ratio",
            3,
        )],
        target: "<= 1.1",
    });
    rows.push(Row {
        what: format!(
            "resync rate {rate:.0} MiB/s / plain copy of as many bytes over the same loopback \
             link with the same fdatasyncs, just before, under the same guest load (mean of \
             two) {plain:.0} MiB/s"
        ),
        figures: vec![Figure::new(
            "resync_rate_over_plain_copy",
            rate / plain,
            "ratio",
            2,
        )],
        target: ">= 0.8",
    });
    rows.push(Row {
        what: format!(
            "the guest's own I/O meanwhile: journal records/s while its node re-protected it \
             (resync, pre-copy, first checkpoint) {reprotect_rate:.0} / while it ran alone \
             {alone_rate:.0}"
        ),
        figures: vec![Figure::new(
            "reprotect_guest_io_ratio",
            reprotect_rate / alone_rate,
            "ratio",
            2,
        )],
        target: "-",
    });
    rows.push(Row {
        what: format!(
            "node's return to protected again: 1 GiB guest, {away_mib} MiB written while away \
             (daemon start, resync, pre-copy of memory, first checkpoint)"
        ),
        figures: vec![Figure::new("reprotect_s_1g_guest", reprotected, "s", 1)],
        target: "-",
    });
    Ok(())
}

/// CPU seconds (user + system) a process and its threads have used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split(' ').collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime, fields 14 and 15 of stat (11 and 12 after the command name).
    (ticks(11) + ticks(12)) / 100.0
}

/// A process's resident memory in bytes and its thread count.
fn rss_and_threads(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| {
                l.strip_prefix(key)?
                    .split_whitespace()
                    .next()?
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or(0.0)
    };
    (field("VmRSS:") * 1024.0, field("Threads:"))
}

/// The resident memory of an unprotected VM of the idle guest (`ftvmm run`), in bytes, once
/// its guest has said it idles.
fn unprotected_idle_rss(mem: &str) -> Result<f64, Error> {
    let child = Command::new(std::env::current_exe()?)
        .args(["run", "--mem", mem, "--payload", "builtin:idle"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let pid = child.id();
    let mut vm = Node(child);
    let mut line = String::new();
    if let Some(out) = vm.0.stdout.take() {
        std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line)?;
    }
    if line.trim() != "idle" {
        return Err(format!("bench pair: the unprotected idle VM printed {line:?}").into());
    }
    let (rss, _) = rss_and_threads(pid);
    vm.0.kill()?;
    vm.0.wait()?;
    Ok(rss)
}

/// 32 idle VMs (64 MiB, 1 vCPU, napping) protected on one pair, half preferring each node:
/// what each costs in CPU, memory and host threads, against Stratus everRun's sizing rules
/// (each FT VM takes its vCPUs plus 2 hardware threads, and its memory plus 20 %).
fn idle_rows(rows: &mut Vec<Row>, quick: bool) -> Result<(), Error> {
    let count = if quick { 8 } else { 32 };
    let mut vms =
        "[policy]\nfailover_timeout_ms = 2000\nack_timeout_ms = 30000\nfailback = \"manual\"\n"
            .to_string();
    for i in 0..count {
        vms.push_str(&format!(
            "\n[[vm]]\nname = \"idle{i}\"\npayload = \"builtin:idle\"\nmem = \"64M\"\n\
             [vm.policy]\npreferred = \"{}\"\n[vm.nodes.a]\n[vm.nodes.b]\n",
            if i % 2 == 0 { "a" } else { "b" }
        ));
    }
    let mut pair = Pair::new("idle", ("127.0.0.1", "127.0.0.1"), None, &vms)?;
    pair.start(0)?;
    pair.start(1)?;
    for i in 0..count {
        pair.wait_protected(i % 2, &format!("idle{i}"))?;
    }
    // (pid, primary?) of every VM process.
    let processes: Vec<(u32, bool)> = (0..2)
        .flat_map(|n| (0..count).map(move |i| (n, i)))
        .filter_map(|(n, i)| {
            let s = pair.vm(n, &format!("idle{i}"))?;
            Some((s.pid?, s.role == Role::Primary))
        })
        .collect();
    if processes.len() != 2 * count {
        return Err("bench pair: an idle VM has no process on one of the nodes".into());
    }
    let daemons: Vec<u32> = (0..2)
        .filter_map(|n| {
            node::control::query_status(&pair.config.nodes[n], STATUS_TIMEOUT)
                .ok()?
                .pid
        })
        .collect();
    let all: Vec<u32> = processes.iter().map(|&(p, _)| p).chain(daemons).collect();
    let window = Duration::from_secs(if quick { 3 } else { 10 });
    let before: f64 = all.iter().map(|&p| cpu_seconds(p)).sum();
    std::thread::sleep(window);
    let used: f64 = all.iter().map(|&p| cpu_seconds(p)).sum::<f64>() - before;
    let mean = |primary: bool| {
        let (rss, threads) = processes
            .iter()
            .filter(|&&(_, p)| p == primary)
            .map(|&(pid, _)| rss_and_threads(pid))
            .fold((0.0, 0.0), |(r, t), (r2, t2)| (r + r2, t + t2));
        (rss / count as f64, threads / count as f64)
    };
    let ((primary_rss, primary_threads), (standby_rss, standby_threads)) =
        (mean(true), mean(false));
    let alone = unprotected_idle_rss("64M")?;
    let guest = 64.0 * MIB;
    let extra = (primary_rss.max(standby_rss) - alone).max(0.0) / guest * 100.0;
    let per_vm_cpu = used / window.as_secs_f64() / count as f64 * 100.0;
    rows.push(Row {
        what: format!(
            "{count} idle protected VMs (64 MiB, 1 vCPU each) on one pair: CPU of both nodes \
             (daemons and VM processes, primary and standby, vCPUs included) per VM, % of one \
             hardware thread (everRun reserves 2 hardware threads per FT VM beyond its vCPUs)"
        ),
        figures: vec![Figure::new("idle_vm_cpu_percent", per_vm_cpu, "%", 2)],
        target: "< 200 %",
    });
    rows.push(Row {
        what: format!(
            "same: resident memory of its VM process beyond an unprotected VM of the same guest \
             ({:.1} MiB), on the node where that is larger, % of its 64 MiB (primary {:.1} MiB, \
             standby {:.1} MiB; host threads {primary_threads:.0} + {standby_threads:.0}, \
             one of them the kernel's per-VM worker; everRun: 20 % extra memory per FT VM)",
            alone / MIB,
            primary_rss / MIB,
            standby_rss / MIB,
        ),
        figures: vec![Figure::new("idle_vm_extra_memory_percent", extra, "%", 1)],
        target: "< 20 %",
    });
    Ok(())
}

/// kv on a pair in test namespaces, one client throughout: the longest reply wait across a
/// swap to b and one back.
fn swap_rows(rows: &mut Vec<Row>) -> Result<(), Error> {
    let topo = PairTopology::new("bswap")?;
    let vm = format!(
        "[policy]\nfailover_timeout_ms = 1000\nack_timeout_ms = 20000\nfailback = \"manual\"\n\n\
         [[vm]]\nname = \"kv\"\npayload = \"builtin:kv\"\nargs = [\"ip={GUEST_IP}/24\", \"port={KV_PORT}\"]\n\
         mem = \"64M\"\nmac = \"02:00:00:00:00:02\"\n\
         [vm.nodes.a]\ntap = \"ftkv0\"\nbridge = \"{BRIDGE}\"\n[vm.nodes.b]\ntap = \"ftkv0\"\nbridge = \"{BRIDGE}\"\n"
    );
    let mut pair = Pair::new(
        "swap",
        (HOST_A_IP, HOST_B_IP),
        Some((topo.a.clone(), topo.b.clone())),
        &vm,
    )?;
    pair.start(0)?;
    pair.start(1)?;
    pair.wait_protected(0, "kv")?;
    let progress = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (progress, stop) = (progress.clone(), stop.clone());
        topo.spawn_in_client(move || kv_sequential(&progress, &stop, Duration::from_millis(2)))
    };
    let mut worst = Duration::ZERO;
    for (from, to) in [(0usize, 1usize), (1, 0)] {
        std::thread::sleep(Duration::from_secs(1));
        let asked = node::control::request(
            &pair.config.nodes[from].socket,
            &node::control::Request::Swap { vm: "kv".into() },
            STATUS_TIMEOUT,
        )?;
        if !matches!(asked, node::control::Response::Done { .. }) {
            return Err(format!("bench pair: swap refused: {asked:?}").into());
        }
        pair.wait_protected(to, "kv")?;
    }
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    let round_trips = client.join().map_err(|_| "kv client panicked")??;
    worst = worst.max(round_trips.iter().copied().max().unwrap_or_default());
    rows.push(Row {
        what: format!(
            "swap downtime seen by a kv client: longest reply wait across two swaps \
             ({} replies; 2 epochs of the 40 ms default = 80 ms)",
            round_trips.len(),
        ),
        figures: vec![Figure::new(
            "swap_downtime_ms",
            worst.as_secs_f64() * 1e3,
            "ms",
            1,
        )],
        target: "< 2 epochs",
    });
    Ok(())
}

/// Each drill on a stencil pair on loopback, its JSON report.
fn drill_rows(rows: &mut Vec<Row>) -> Result<(), Error> {
    let vm =
        "[policy]\nfailover_timeout_ms = 300\nack_timeout_ms = 20000\nfailback_delay = \"1s\"\n\n\
              [[vm]]\nname = \"calc\"\npayload = \"builtin:stencil\"\n\
              args = [\"n=128\", \"steps=1000000000\", \"report=20000\"]\nmem = \"64M\"\n\
              [vm.nodes.a]\n[vm.nodes.b]\n";
    let mut pair = Pair::new("drill", ("127.0.0.1", "127.0.0.1"), None, vm)?;
    pair.start(0)?;
    pair.start(1)?;
    pair.wait_protected(0, "calc")?;
    for fault in [
        "kill-primary",
        "hang-primary",
        "kill-standby",
        "kill-node",
        "swap",
    ] {
        let out = Command::new(std::env::current_exe()?)
            .args(["drill", "calc", "--config"])
            .arg(&pair.config.path)
            .args(["--name", "a", "--fault", fault, "--json"])
            .output()?;
        if !out.status.success() {
            return Err(format!(
                "bench pair: drill {fault}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )
            .into());
        }
        let r: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        let id = fault.replace('-', "_");
        rows.push(Row {
            what: format!(
                "drill {fault} (stencil, failover timeout 300 ms): detection / restore ms, \
                 epochs lost {}, protected again after {:.1} s, home after {:.1} s, longest \
                 console stall",
                r["epochs_lost"],
                f("reprotected_s"),
                f("home_s")
            ),
            figures: vec![
                Figure::new(
                    format!("drill_{id}_detection_ms"),
                    f("detection_ms"),
                    "ms",
                    1,
                ),
                Figure::new(format!("drill_{id}_restore_ms"), f("restore_ms"), "ms", 1),
                Figure::new(format!("drill_{id}_stall_ms"), f("stall_ms"), "ms", 0),
            ],
            target: "epochs lost 0",
        });
        if fault == "swap" {
            pair.wait_protected(0, "calc")?;
        }
    }
    // A kill-node drill started node a's daemon again itself: end it by its pid.
    if let Some(pid) = node::control::query_status(&pair.config.nodes[0], STATUS_TIMEOUT)
        .ok()
        .and_then(|s| s.pid)
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(0)),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    Ok(())
}

pub(super) fn rows(quick: bool) -> Result<Vec<Row>, Error> {
    let mut rows = Vec::new();
    resync_rows(&mut rows, quick)?;
    idle_rows(&mut rows, quick)?;
    swap_rows(&mut rows)?;
    drill_rows(&mut rows)?;
    Ok(rows)
}
