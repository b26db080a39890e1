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
const POLICY: &str = "[policy]\nfailover_timeout_ms = 1000\nack_timeout_ms = 20000\n";

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
    let vm = format!(
        "{POLICY}\n[[vm]]\nname = \"kv\"\npayload = \"builtin:kv\"\n\
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
    let mut pair = Pair::new("reprotect", hosts, &vm);
    images(&pair, "kv", 64 << 20);
    pair.start("a");
    pair.start("b");
    pair.wait_protected("kv", "a", LIMIT);

    let progress = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (progress, stop) = (progress.clone(), stop.clone());
        topo.spawn_in_client(move || kv_sequential(&progress, &stop, Duration::ZERO))
    };
    let replies = |n: u64| {
        let at = progress.load(Ordering::SeqCst);
        assert!(
            wait_for(LIMIT, || progress.load(Ordering::SeqCst) >= at + n
                || client.is_finished()),
            "the client's stream stalled at {at}"
        );
    };
    replies(50);
    pair.kill("a");
    let killed_at = progress.load(Ordering::SeqCst);
    pair.wait_vm("b", "kv", LIMIT, "running alone", |s| {
        s.role == Role::Primary && !s.protected
    });
    replies(200);
    let back_at = progress.load(Ordering::SeqCst);
    pair.start("a");
    pair.wait_protected("kv", "b", LIMIT);
    replies(50);
    stop.store(true, Ordering::SeqCst);
    let round_trips = match client.join() {
        Ok(Ok(rt)) => rt,
        Ok(Err(e)) => panic!("the stream broke: {e}\nlog b:\n{}", pair.log("b")),
        Err(panic) => std::panic::resume_unwind(panic),
    };
    let requests = round_trips.len() as u64;
    println!(
        "{requests} replies; a killed at {killed_at}, back at {back_at}; longest reply {} ms",
        round_trips
            .iter()
            .max()
            .unwrap_or(&Duration::ZERO)
            .as_millis()
    );

    // Written while a was away: the records of the requests in between (8 KiB each), and
    // those of requests a had not seen acknowledged; the resync sent about only their blocks.
    let sent = resync_bytes(&pair.log("b"));
    let away = (back_at + 40 - killed_at.saturating_sub(40)) * 16 * 512;
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
