//! The node daemons end to end: a pair that protects its guests, loses a node, keeps the guests
//! running on the other, and re-protects them when the node returns, resyncing only what
//! changed; several VMs at once; resyncs interrupted by either side's death; histories that
//! cannot be ordered.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use common::pair::{Hosts, Pair};
use common::{file_len, wait_for};
use ftvmm::testbed::{
    kv_quit, kv_sequential, PairTopology, BRIDGE, GUEST_IP, HOST_A_IP, HOST_B_IP, KV_PORT,
};
use node::status::Role;

/// Each pair needs most of this machine: one at a time.
static ONE_PAIR: Mutex<()> = Mutex::new(());

fn one_pair() -> MutexGuard<'static, ()> {
    ONE_PAIR.lock().unwrap_or_else(|e| e.into_inner())
}

/// Generous for a loaded 2-core machine: a node returning resyncs and pre-copies while the
/// guest runs.
const LIMIT: Duration = Duration::from_secs(90);

/// Timing of the tests' pairs: a SIGKILLed node's links close at once, so the failover timeout
/// hardly delays a takeover; generous timeouts keep a loaded machine from failing over early.
const POLICY: &str =
    "[policy]\nfailover_timeout_ms = 1000\nack_timeout_ms = 20000\nfailback = \"manual\"\n";

/// Sparse zero images for both nodes.
fn images(pair: &Pair, vm: &str, size: u64) {
    for node in ["a", "b"] {
        let f = std::fs::File::create(pair.path(&format!("{node}-{vm}.img"))).unwrap();
        f.set_len(size).unwrap();
    }
}

/// What `journal verify` prints for an image.
fn verify(image: &std::path::Path) -> String {
    let disk = format!("--disk={}", image.display());
    let out = common::ftvmm(
        &["run", &disk, "--payload=builtin:journal", "--", "verify"],
        Duration::from_secs(60),
    );
    common::stdout_of(&out)
}

/// The bytes the primary's resync sent, from its log line (0 if none began).
fn resync_bytes(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("resync of the disk begins") && l.contains("checkpoint::primary"))
        .filter_map(|l| {
            l.split("bytes=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// kv logging 16 records (8 KiB) per request, one client connection open throughout: node a
/// runs it protected, is killed, b goes on alone, a returns, resyncs only what was written while
/// it was away, and is b's standby again; the client got every reply right; once the guest
/// ends both images are equal and hold every record.
#[test]
fn a_returning_node_resyncs_only_what_changed_and_protects_the_running_guest() {
    let _one = one_pair();
    let topo = PairTopology::new("reprotect").expect("test topology");
    let mut pair = kv_pair("reprotect", &topo, "failback = \"manual\"");
    pair.start("a");
    pair.start("b");
    pair.wait_protected("kv", "a", LIMIT);
    let client = Client::start(&topo);
    let progress = client.progress.clone();
    client.replies(50);
    pair.kill("a");
    let killed_at = progress.load(Ordering::SeqCst);
    pair.wait_vm("b", "kv", LIMIT, "running alone", |s| {
        s.role == Role::Primary && !s.protected
    });
    client.replies(200);
    let back_at = progress.load(Ordering::SeqCst);
    pair.start("a");
    pair.wait_protected("kv", "b", LIMIT);
    // The resync's plan was made on the way: writes until then count as made while a was away.
    let protected_at = progress.load(Ordering::SeqCst);
    client.replies(50);
    // Status says what the epoch policy did: a served client ends epochs by output.
    let status = pair.status("b").expect("b's status");
    let kv = status
        .vms
        .iter()
        .find(|v| v.name == "kv")
        .expect("kv in b's status");
    assert!(
        kv.epoch_ms_p50.is_some() && kv.epoch_ends.get("output").copied().unwrap_or(0) > 0,
        "epoch lengths and reasons in status: {:?} {:?}",
        kv.epoch_ms_p50,
        kv.epoch_ends
    );
    let round_trips = client.finish(&pair);
    let requests = round_trips.len() as u64;
    println!(
        "{requests} replies; a killed at {killed_at}, started again at {back_at}, \
         protected again at {protected_at}; longest reply {} ms",
        round_trips
            .iter()
            .max()
            .unwrap_or(&Duration::ZERO)
            .as_millis()
    );

    // Written while a was away: the records of the requests in between (8 KiB each), and
    // those of requests a had not seen acknowledged; the resync sent about only their blocks.
    let sent = resync_bytes(&pair.log("b"));
    let away = (protected_at + 40 - killed_at.saturating_sub(40)) * 16 * 512;
    let blocks = away.div_ceil(64 << 10) + 2;
    println!("resync sent {sent} bytes; written while a was away at most {away}");
    assert!(
        sent > 0 && sent <= blocks * (64 << 10),
        "the resync sent {sent} bytes for about {away} written"
    );

    topo.in_client(kv_quit).expect("kv quits");
    for node in ["a", "b"] {
        pair.wait_vm(node, "kv", LIMIT, "ended", |s| s.role == Role::Stopped);
    }
    let (a_img, b_img) = (pair.path("a-kv.img"), pair.path("b-kv.img"));
    assert!(
        std::fs::read(&a_img).unwrap() == std::fs::read(&b_img).unwrap(),
        "the images differ"
    );
    assert_eq!(verify(&a_img), format!("ok {}\n", requests * 16));
}

/// Two VMs, one preferring each node: each runs protected on its own node; killing node a
/// moves its VM to b, which then runs both alone; a returns and both are protected again, a
/// as the standby of both. Both stencils end with the fault-free checksum.
#[test]
fn two_vms_active_on_both_nodes_survive_a_node_kill_and_are_reprotected() {
    let _one = one_pair();
    let steps = 2_000_000u64;
    let stencil = |name: &str, preferred: &str| {
        format!(
            "[[vm]]\nname = \"{name}\"\npayload = \"builtin:stencil\"\n\
             args = [\"n=128\", \"steps={steps}\", \"report=20000\"]\nmem = \"64M\"\n\
             [vm.policy]\npreferred = \"{preferred}\"\n\
             [vm.nodes.a]\nconsole = \"{{dir}}/a-{name}.console\"\n\
             [vm.nodes.b]\nconsole = \"{{dir}}/b-{name}.console\"\n"
        )
    };
    let vms = format!(
        "{POLICY}\n{}\n{}",
        stencil("left", "a"),
        stencil("right", "b")
    );
    let mut pair = Pair::new("activeactive", Hosts::Loopback, &vms);
    pair.start("a");
    pair.start("b");
    pair.wait_protected("left", "a", LIMIT);
    pair.wait_protected("right", "b", LIMIT);
    pair.kill("a");
    for vm in ["left", "right"] {
        pair.wait_vm("b", vm, LIMIT, "running alone", |s| {
            s.role == Role::Primary && !s.protected
        });
    }
    pair.start("a");
    pair.wait_protected("left", "b", LIMIT);
    pair.wait_protected("right", "b", LIMIT);
    let want = format!(
        "checksum {:016x}",
        stencil_core::reference_checksum(128, steps)
    );
    for vm in ["left", "right"] {
        pair.wait_vm("b", vm, Duration::from_secs(600), "ended", |s| {
            s.role == Role::Stopped
        });
        let a = std::fs::read(pair.path(&format!("a-{vm}.console"))).unwrap_or_default();
        let b = std::fs::read(pair.path(&format!("b-{vm}.console"))).unwrap_or_default();
        let merged = String::from_utf8(common::merge(&a, &b)).expect("console is text");
        assert_eq!(merged.lines().last(), Some(want.as_str()), "{vm}: {merged}");
        assert!(file_len(&pair.path(&format!("b-{vm}.console"))) > 0);
    }
}

/// A file of `size` bytes of seeded noise: an image that compresses not at all, so that a
/// resync of it takes its time at the pair's rate limit.
fn noise_image(path: &std::path::Path, size: u64, seed: u64) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x = seed | 1;
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..size >> 20 {
        for word in chunk.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&chunk).unwrap();
    }
    f.flush().unwrap();
}

/// The bytes each resync the primary began was to send, in order, from its log.
fn resync_plans(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("resync of the disk begins") && l.contains("checkpoint::primary"))
        .filter_map(|l| {
            l.split("bytes=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// A new node a takes every block of b's 256 MiB image (rate-limited to 64 MiB/s). Killed
/// part way, a resumes with only what it still needs; then b, the primary, is killed part way
/// through the second attempt: a, inconsistent, does not start the guest. b returns, boots the
/// guest again from its disk, a finishes the resync without starting over, and once the guest
/// ends the images are equal.
#[test]
fn a_resync_interrupted_by_either_side_resumes_and_an_inconsistent_node_never_runs_the_guest() {
    let _one = one_pair();
    const SIZE: u64 = 256 << 20;
    let steps = 1_500_000u64;
    let vm = format!(
        "[policy]\nfailover_timeout_ms = 1000\nack_timeout_ms = 20000\npreferred = \"b\"\n\
         resync_max_mib_s = 64\n\n[[vm]]\nname = \"calc\"\npayload = \"builtin:stencil\"\n\
         args = [\"n=128\", \"steps={steps}\", \"report=50000\", \"disk=on\"]\nmem = \"64M\"\n\
         [vm.nodes.a]\ndisk = \"{{dir}}/a.img\"\n[vm.nodes.b]\ndisk = \"{{dir}}/b.img\"\n"
    );
    let mut pair = Pair::new("resume", Hosts::Loopback, &vm);
    noise_image(&pair.path("a.img"), SIZE, 0xa);
    noise_image(&pair.path("b.img"), SIZE, 0xb);
    let syncing_past = |pair: &Pair, percent: f64| {
        pair.wait_vm("a", "calc", LIMIT, "syncing", |s| {
            s.role == Role::Syncing && s.resync.as_ref().is_some_and(|r| r.percent >= percent)
        })
    };
    pair.start("b");
    pair.start("a");
    let first = syncing_past(&pair, 20.0);
    let done = first.resync.map_or(0, |r| r.done_bytes);
    pair.kill("a");

    pair.start("a");
    let second = syncing_past(&pair, 10.0);
    let plans = resync_plans(&pair.log("b"));
    assert_eq!(plans.first(), Some(&SIZE), "{plans:?}");
    // No second plan: the first resync had finished by the kill and a needed nothing more.
    let resumed = plans.get(1).copied().unwrap_or(0);
    println!("first resync {SIZE} bytes, {done} done at the kill; the second {resumed}");
    // What was written and not yet made durable (at most a flush's worth) is sent again.
    assert!(
        resumed <= SIZE - done + (9 << 20),
        "the resumed resync sends {resumed} bytes after {done} of {SIZE} were done"
    );
    let done2 = second.resync.map_or(0, |r| r.done_bytes);
    pair.kill("b");

    // a holds no checkpoint and an image half old, half new: it must not run the guest.
    let stopped = pair.wait_vm("a", "calc", LIMIT, "stopped", |s| s.role == Role::Stopped);
    assert!(!stopped.generation.consistent, "{stopped:?}");
    assert!(
        stopped
            .why
            .as_deref()
            .unwrap_or_default()
            .contains("inconsistent"),
        "{stopped:?}"
    );
    pair.start("b");
    pair.wait_protected("calc", "b", LIMIT);
    let plans = resync_plans(&pair.log("b"));
    // None: the kill came after the second resync had finished (the status poll that picked
    // the moment can be late on a busy host), and neither node had a block left to send.
    let third = plans.get(2).copied().unwrap_or(0);
    println!("the third resync {third} bytes, {done2} done before b was killed");
    assert!(third == 0 || third < resumed, "{plans:?}");
    let a_log = pair.log("a");
    assert!(
        a_log.contains("to=Syncing")
            && !a_log.contains("to=Booting")
            && !a_log.contains("to=Primary"),
        "node a ran the guest:\n{a_log}"
    );
    pair.wait_vm("b", "calc", Duration::from_secs(600), "ended", |s| {
        s.role == Role::Stopped
    });
    pair.wait_vm("a", "calc", LIMIT, "ended", |s| s.role == Role::Stopped);
    assert!(
        std::fs::read(pair.path("a.img")).unwrap() == std::fs::read(pair.path("b.img")).unwrap(),
        "the images differ"
    );
}

/// A long stencil VM on disks of `size` bytes, preferring a, with a short wait for the peer at
/// start.
fn calc_pair(tag: &str, size: u64) -> Pair {
    let vm = "[policy]\nfailover_timeout_ms = 1000\nack_timeout_ms = 20000\npeer_wait = \"1s\"\n\n\
              [[vm]]\nname = \"calc\"\npayload = \"builtin:stencil\"\n\
              args = [\"n=128\", \"steps=100000000\", \"report=100000\"]\nmem = \"64M\"\n\
              [vm.nodes.a]\ndisk = \"{dir}/a-calc.img\"\n[vm.nodes.b]\ndisk = \"{dir}/b-calc.img\"\n";
    let pair = Pair::new(tag, Hosts::Loopback, vm);
    images(&pair, "calc", size);
    pair
}

/// Both nodes run the guest alone since their last common generation (a killed, b took over;
/// b killed, a alone booted it again): when they meet neither resyncs over the other, status
/// says why and names the command; `ftvmm discard` on b keeps a's copy and b resyncs from it.
#[test]
fn a_split_history_is_refused_until_an_operator_discards_one_copy() {
    let _one = one_pair();
    let mut pair = calc_pair("split", 16 << 20);
    pair.start("a");
    pair.start("b");
    pair.wait_protected("calc", "a", LIMIT);
    pair.kill("a");
    pair.wait_vm("b", "calc", LIMIT, "running alone", |s| {
        s.role == Role::Primary
    });
    pair.kill("b");
    // a ran the guest last: with no peer after its wait it boots the guest alone.
    pair.start("a");
    pair.wait_vm("a", "calc", LIMIT, "running alone", |s| {
        s.role == Role::Primary
    });
    pair.start("b");
    let b = pair.wait_vm("b", "calc", LIMIT, "refusing", |s| {
        s.why
            .as_deref()
            .is_some_and(|w| w.starts_with("split history"))
    });
    assert_eq!(b.role, Role::Stopped);
    let hint = b.hint.unwrap_or_default();
    assert!(hint.contains("ftvmm discard calc --config"), "{hint}");
    let a = pair.wait_vm("a", "calc", LIMIT, "told", |s| {
        s.why
            .as_deref()
            .is_some_and(|w| w.starts_with("peer refused: split history"))
    });
    assert!(a.role == Role::Primary && !a.protected, "{a:?}");

    let config = pair.config_path.display().to_string();
    let out = common::ftvmm(
        &["discard", "calc", "--config", &config, "--name", "b"],
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", common::stderr_of(&out));
    assert!(
        common::stdout_of(&out).contains("takes every block from a"),
        "{}",
        common::stdout_of(&out)
    );
    pair.wait_protected("calc", "a", LIMIT);
}

/// Copies of two different pairs' VM, of the same size, meet: they share no history, and
/// neither node runs the guest over the other.
#[test]
fn unrelated_images_are_refused() {
    let _one = one_pair();
    let mut other = calc_pair("unrelated-other", 16 << 20);
    other.start("a");
    other.start("b");
    other.wait_protected("calc", "a", LIMIT);
    other.kill("a");
    other.kill("b");
    let mut pair = calc_pair("unrelated", 16 << 20);
    pair.start("a");
    pair.start("b");
    pair.wait_protected("calc", "a", LIMIT);
    pair.kill("a");
    pair.kill("b");
    // b's copy and state are the other pair's now.
    std::fs::copy(other.path("b/calc.state"), pair.path("b/calc.state")).unwrap();
    std::fs::copy(other.path("b-calc.img"), pair.path("b-calc.img")).unwrap();
    pair.start("a");
    pair.start("b");
    for node in ["a", "b"] {
        let s = pair.wait_vm(node, "calc", LIMIT, "refusing", |s| {
            s.why
                .as_deref()
                .is_some_and(|w| w.starts_with("unrelated images"))
        });
        assert_eq!(s.role, Role::Stopped, "{node}: {s:?}");
    }
}

/// The kv pair of the network tests: node a preferred, `policy` on top of the tests' timing.
fn kv_pair(tag: &str, topo: &PairTopology, policy: &str) -> Pair {
    let vm = format!(
        "[policy]\nfailover_timeout_ms = 1000\nack_timeout_ms = 20000\n{policy}\n\n\
         [[vm]]\nname = \"kv\"\npayload = \"builtin:kv\"\n\
         args = [\"ip={GUEST_IP}/24\", \"port={KV_PORT}\", \"log=16\"]\n\
         mem = \"64M\"\nmac = \"02:00:00:00:00:02\"\n\
         [vm.nodes.a]\ndisk = \"{{dir}}/a-kv.img\"\ntap = \"ftkv0\"\nbridge = \"{BRIDGE}\"\n\
         [vm.nodes.b]\ndisk = \"{{dir}}/b-kv.img\"\ntap = \"ftkv0\"\nbridge = \"{BRIDGE}\"\n"
    );
    let hosts = Hosts::Namespaces {
        a: topo.a.clone(),
        b: topo.b.clone(),
        a_ip: HOST_A_IP.into(),
        b_ip: HOST_B_IP.into(),
    };
    let pair = Pair::new(tag, hosts, &vm);
    images(&pair, "kv", 64 << 20);
    pair
}

/// A kv client on one connection, running in the topology's client namespace until stopped.
struct Client {
    progress: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<Vec<Duration>, String>>,
}

impl Client {
    fn start(topo: &PairTopology) -> Self {
        let progress = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (progress, stop) = (progress.clone(), stop.clone());
            topo.spawn_in_client(move || kv_sequential(&progress, &stop, Duration::ZERO))
        };
        Self {
            progress,
            stop,
            thread,
        }
    }

    /// Waits for `n` more replies.
    fn replies(&self, n: u64) {
        let at = self.progress.load(Ordering::SeqCst);
        assert!(
            wait_for(LIMIT, || self.progress.load(Ordering::SeqCst) >= at + n
                || self.thread.is_finished()),
            "the client's stream stalled at {at}"
        );
        assert!(
            !self.thread.is_finished(),
            "the client's stream ended at {at}"
        );
    }

    /// Stops the client; every reply was right; returns the round trips.
    fn finish(self, pair: &Pair) -> Vec<Duration> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.join() {
            Ok(Ok(rt)) => rt,
            Ok(Err(e)) => panic!(
                "the stream broke: {e}\nlog a:\n{}\nlog b:\n{}",
                pair.log("a"),
                pair.log("b")
            ),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

/// The whole cycle with one client connection open throughout: a runs kv protected, node a is
/// killed, b takes over, a returns and resyncs, and the guest goes back to a by itself
/// (failback = auto); no reply was wrong or missing, and the images are equal at the end.
#[test]
fn the_guest_goes_home_by_itself_once_its_node_returns() {
    let _one = one_pair();
    let topo = PairTopology::new("home").expect("test topology");
    let mut pair = kv_pair(
        "home",
        &topo,
        "failback = \"auto\"\nfailback_delay = \"1s\"",
    );
    pair.start("a");
    pair.start("b");
    pair.wait_protected("kv", "a", LIMIT);
    let client = Client::start(&topo);
    client.replies(50);
    pair.kill("a");
    pair.wait_vm("b", "kv", LIMIT, "running alone", |s| {
        s.role == Role::Primary && !s.protected
    });
    client.replies(50);
    pair.start("a");
    pair.wait_protected("kv", "b", LIMIT);
    // Home again by itself, failback_delay after a is b's synced standby.
    pair.wait_protected("kv", "a", LIMIT);
    assert!(
        pair.log("b").contains("failing back"),
        "no automatic failback in b's log"
    );
    client.replies(50);
    let round_trips = client.finish(&pair);
    println!(
        "{} replies; longest {} ms",
        round_trips.len(),
        round_trips
            .iter()
            .max()
            .unwrap_or(&Duration::ZERO)
            .as_millis()
    );
    topo.in_client(kv_quit).expect("kv quits");
    for node in ["a", "b"] {
        pair.wait_vm(node, "kv", LIMIT, "ended", |s| s.role == Role::Stopped);
    }
    assert!(
        std::fs::read(pair.path("a-kv.img")).unwrap()
            == std::fs::read(pair.path("b-kv.img")).unwrap(),
        "the images differ"
    );
}

/// Swaps under load: the client's connection goes on through a swap to b and one back, with
/// no wrong or missing reply; each swap leaves the old primary the standby at once.
#[test]
fn a_swap_under_load_loses_no_reply() {
    let _one = one_pair();
    let topo = PairTopology::new("swap").expect("test topology");
    let mut pair = kv_pair("swap", &topo, "failback = \"manual\"");
    pair.start("a");
    pair.start("b");
    pair.wait_protected("kv", "a", LIMIT);
    let client = Client::start(&topo);
    client.replies(50);
    let config = pair.config_path.display().to_string();
    for (to, from) in [("b", "a"), ("a", "b")] {
        let out = common::ftvmm(&["swap", "kv", "--config", &config, "--name", from], LIMIT);
        assert!(out.status.success(), "{}", common::stderr_of(&out));
        let said = common::stdout_of(&out);
        assert!(
            said.contains(&format!("{to} runs it, protected by {from}")),
            "{said}"
        );
        println!("{}", said.trim_end());
        pair.wait_protected("kv", to, LIMIT);
        client.replies(50);
    }
    let round_trips = client.finish(&pair);
    println!(
        "{} replies; longest {} ms",
        round_trips.len(),
        round_trips
            .iter()
            .max()
            .unwrap_or(&Duration::ZERO)
            .as_millis()
    );
    // Only b's first sync moved disk blocks: neither swap resynced anything.
    let resyncs = |node: &str| resync_plans(&pair.log(node)).len();
    assert_eq!(
        (resyncs("a"), resyncs("b")),
        (1, 0),
        "log a:\n{}\nlog b:\n{}",
        pair.log("a"),
        pair.log("b")
    );
}

/// A swap asked for while the standby is still syncing is refused with the reason, and
/// changes nothing.
#[test]
fn a_swap_while_the_standby_syncs_is_refused() {
    let _one = one_pair();
    let vm = "[policy]\nfailover_timeout_ms = 1000\nack_timeout_ms = 20000\nresync_max_mib_s = 16\n\n\
              [[vm]]\nname = \"calc\"\npayload = \"builtin:stencil\"\n\
              args = [\"n=128\", \"steps=100000000\", \"report=100000\"]\nmem = \"64M\"\n\
              [vm.nodes.a]\ndisk = \"{dir}/a-calc.img\"\n[vm.nodes.b]\ndisk = \"{dir}/b-calc.img\"\n";
    let mut pair = Pair::new("swapsync", Hosts::Loopback, vm);
    images(&pair, "calc", 256 << 20);
    pair.start("a");
    pair.start("b");
    pair.wait_vm("b", "calc", LIMIT, "syncing", |s| s.role == Role::Syncing);
    // a learns its peer's role from the peer's next word: the swap is asked once a knows.
    pair.wait_vm("a", "calc", LIMIT, "its peer syncing", |s| {
        s.why.as_deref() == Some("peer syncing")
    });
    let config = pair.config_path.display().to_string();
    let out = common::ftvmm(&["swap", "calc", "--config", &config, "--name", "a"], LIMIT);
    let err = common::one_error_line(&out);
    assert!(err.contains("calc cannot swap now"), "{err}");
    assert!(err.contains("syncing"), "{err}");
    let a = pair.vm("a", "calc").expect("a answers");
    assert_eq!(a.role, Role::Primary, "{a:?}");
    assert_eq!(pair.vm("b", "calc").map(|s| s.role), Some(Role::Syncing));
}

/// Runs `ftvmm drill` with `fault` on the stencil pair; returns its JSON report.
fn drill(pair: &Pair, fault: &str) -> serde_json::Value {
    let config = pair.config_path.display().to_string();
    let out = common::ftvmm(
        &[
            "drill", "calc", "--config", &config, "--name", "a", "--fault", fault, "--json",
        ],
        Duration::from_secs(300),
    );
    assert!(
        out.status.success(),
        "drill {fault}: {}\nlog a:\n{}\nlog b:\n{}",
        common::stderr_of(&out),
        pair.log("a"),
        pair.log("b")
    );
    let report: serde_json::Value = serde_json::from_str(&common::stdout_of(&out))
        .unwrap_or_else(|e| panic!("drill {fault}: {e}: {}", common::stdout_of(&out)));
    println!("{report}");
    report
}

/// Every drill on a protected pair: each reports no committed epoch lost and ends with the
/// pair protected again, in the roles it started in (a swap's report, swapped). A drill on a
/// pair that is not protected is refused and changes nothing.
#[test]
fn every_drill_ends_with_the_pair_protected_and_reports_its_cost() {
    let _one = one_pair();
    let vm = "[policy]\nfailover_timeout_ms = 1000\nack_timeout_ms = 20000\nfailback_delay = \"1s\"\n\n\
              [[vm]]\nname = \"calc\"\npayload = \"builtin:stencil\"\n\
              args = [\"n=128\", \"steps=100000000\", \"report=20000\"]\nmem = \"64M\"\n\
              [vm.nodes.a]\ndisk = \"{dir}/a-calc.img\"\n[vm.nodes.b]\ndisk = \"{dir}/b-calc.img\"\n";
    let mut pair = Pair::new("drills", Hosts::Loopback, vm);
    images(&pair, "calc", 16 << 20);
    pair.start("a");
    let config = pair.config_path.display().to_string();
    // a alone (its peer not started): not protected, refused.
    pair.wait_vm("a", "calc", LIMIT, "running alone", |s| {
        s.role == Role::Primary
    });
    let out = common::ftvmm(
        &[
            "drill",
            "calc",
            "--config",
            &config,
            "--name",
            "a",
            "--fault",
            "kill-primary",
        ],
        LIMIT,
    );
    let err = common::one_error_line(&out);
    assert!(err.contains("calc is not protected"), "{err}");
    assert_eq!(pair.vm("a", "calc").map(|s| s.role), Some(Role::Primary));

    pair.start("b");
    pair.wait_protected("calc", "a", LIMIT);
    for fault in [
        "kill-primary",
        "hang-primary",
        "kill-standby",
        "kill-node",
        "swap",
    ] {
        let report = drill(&pair, fault);
        assert_eq!(report["fault"], fault);
        assert_eq!(report["epochs_lost"], 0, "{report}");
        for key in ["detection_ms", "restore_ms", "reprotected_s", "stall_ms"] {
            assert!(report[key].as_f64().is_some(), "{key}: {report}");
        }
        let home = if fault == "swap" { "b" } else { "a" };
        pair.wait_protected("calc", home, Duration::from_secs(5));
        if fault == "swap" {
            // The drill leaves a swap swapped; the preferred node takes it back by itself.
            pair.wait_protected("calc", "a", LIMIT);
        }
    }
}
