//! Network output commit end to end: a client on a test host keeps one TCP connection to
//! builtin:kv on a replicated pair whose taps share a bridge; the primary is killed (SIGKILL) or
//! frozen (SIGSTOP) mid-stream, and the same connection goes on with the standby, with no reset
//! and no wrong or missing reply. Bulk streams both ways survive a SIGKILL too: into the guest,
//! the guest's acknowledgements leave before their epoch commits once the standby holds the
//! input they acknowledge, so a byte the client was told was delivered and then lost with the
//! primary would stall the stream (the client never sends it again).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{free_port, signal, stats, wait_for, Node, Scratch};
use ftvmm::testbed::{kv_sequential, kv_stream, StreamWay, Topology, BRIDGE, GUEST_IP, KV_PORT};

/// One replicated pair at a time: each needs most of this machine.
static ONE_PAIR: Mutex<()> = Mutex::new(());

const MAC: &str = "02:00:00:00:00:02";
/// Requests answered before the fault, and after it.
const BEFORE: u64 = 60;
const AFTER: u64 = 120;
/// Generous, so that a starved machine never fails over before the fault; the frozen primary
/// is detected after it (the bench measures the stall with a short one).
const FAILOVER_TIMEOUT_MS: u64 = 1000;

/// What the client does on its one connection.
#[derive(Clone, Copy)]
enum Client {
    /// Sequential requests, each checked (`{k} {total}`).
    Requests,
    /// A one-way stream of 64 KiB requests, each reply checked.
    Stream(StreamWay),
}

/// 64 KiB requests of a stream before the fault, and in all.
const STREAM_BEFORE: u64 = 128;
const STREAM_CHUNKS: u64 = 512;

/// Starts a standby and a kv primary on taps of the topology's bridge, waits for kv to answer
/// under protection, runs `fault` on the primary once the client has `BEFORE` replies, and
/// checks that the stream goes on for `AFTER` more on the standby (a bulk stream: that it
/// completes).
fn stream_survives(tag: &str, kind: Client, fault: impl FnOnce(&mut Node)) {
    let _one = ONE_PAIR.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Scratch::new(tag);
    let topo = Topology::new(tag).expect("test topology");
    let (p_out, s_stats) = (dir.path("p.out"), dir.path("s.json"));
    let addr = format!("127.0.0.1:{}", free_port());
    let net = |tap: &str| format!("--net=tap={tap},mac={MAC},bridge={BRIDGE}");
    let standby = Node::spawn_in(
        &topo.host,
        &[
            "standby".into(),
            "--listen".into(),
            addr.clone(),
            net("fts0"),
            format!("--console=file:{}", dir.path("s.out").display()),
            format!("--stats-json={}", s_stats.display()),
        ],
    );
    let mut primary = Node::spawn_in(
        &topo.host,
        &[
            "primary".into(),
            "--peer".into(),
            addr,
            "--mem=64M".into(),
            format!("--failover-timeout-ms={FAILOVER_TIMEOUT_MS}"),
            "--ack-timeout-ms=30000".into(),
            net("ftp0"),
            format!("--console=file:{}", p_out.display()),
            "--payload=builtin:kv".into(),
            "--".into(),
            format!("ip={GUEST_IP}/24"),
            format!("port={KV_PORT}"),
        ],
    );
    // Released console output means a checkpoint was acknowledged: protection is on.
    let listening = wait_for(Duration::from_secs(60), || {
        std::fs::read_to_string(&p_out).is_ok_and(|s| s.contains("kv listening"))
    });
    assert!(listening, "{tag}: kv never listened: {}", primary.stderr());

    let progress = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (progress, stop) = (progress.clone(), stop.clone());
        topo.spawn_in_client(move || match kind {
            Client::Requests => {
                kv_sequential(&progress, &stop, Duration::ZERO).map(|round_trips| {
                    let longest = round_trips.iter().max().copied().unwrap_or_default();
                    format!(
                        "{} replies; longest reply gap {} ms",
                        round_trips.len(),
                        longest.as_millis()
                    )
                })
            }
            Client::Stream(way) => kv_stream(way, STREAM_CHUNKS, &progress)
                .map(|(seconds, bytes)| format!("{bytes} bytes in {seconds:.2} s")),
        })
    };
    let (before, after) = match kind {
        Client::Requests => (BEFORE, AFTER),
        Client::Stream(_) => (STREAM_BEFORE, STREAM_CHUNKS - STREAM_BEFORE),
    };
    let answered = |n: u64| progress.load(Ordering::SeqCst) >= n;
    assert!(
        wait_for(Duration::from_secs(60), || answered(before)
            || client.is_finished()),
        "{tag}: the stream never reached {before} replies"
    );
    let at_fault = progress.load(Ordering::SeqCst);
    fault(&mut primary);
    let went_on = wait_for(Duration::from_secs(60), || {
        answered(at_fault + after) || client.is_finished()
    });
    stop.store(true, Ordering::SeqCst);
    let summary = match client.join() {
        Ok(Ok(summary)) => summary,
        Ok(Err(e)) => panic!("{tag}: the stream broke: {e}"),
        Err(panic) => std::panic::resume_unwind(panic),
    };
    assert!(went_on, "{tag}: the stream stalled after the fault");
    println!("{tag}: {summary}, {at_fault} replies before the fault");
    // The standby's status, written once the guest runs there: it announced the guest's
    // address, learnt on the primary from the guest's own frames.
    let s = stats(&s_stats);
    assert_eq!(s["took_over"], true, "{tag}: {}", standby.stderr());
    assert_eq!(s["announced"], serde_json::json!([GUEST_IP]), "{tag}: {s}");
    println!(
        "{tag}: the standby sent {} held frames and delivered {} logged input frames again at \
         takeover",
        s["held_frames_sent"], s["input_frames_delivered"]
    );
}

#[test]
fn a_tcp_stream_survives_a_primary_sigkill() {
    stream_survives("netkill", Client::Requests, |primary| {
        primary.child.0.kill().unwrap()
    });
}

#[test]
fn a_tcp_stream_survives_a_frozen_primary() {
    stream_survives("netstop", Client::Requests, |primary| {
        signal(primary.pid(), libc::SIGSTOP)
    });
}

#[test]
fn a_bulk_stream_into_the_guest_survives_a_primary_sigkill() {
    stream_survives("netinkill", Client::Stream(StreamWay::In), |primary| {
        primary.child.0.kill().unwrap()
    });
}

#[test]
fn a_bulk_stream_out_of_the_guest_survives_a_primary_sigkill() {
    stream_survives("netoutkill", Client::Stream(StreamWay::Out), |primary| {
        primary.child.0.kill().unwrap()
    });
}

#[test]
fn a_standby_with_another_mac_is_refused_by_both_nodes() {
    let topo = Topology::new("netmac").expect("test topology");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut standby = Node::spawn_in(
        &topo.host,
        &[
            "standby",
            "--listen",
            &addr,
            &format!("--net=tap=fts1,mac=02:00:00:00:00:09,bridge={BRIDGE}"),
        ],
    );
    let mut primary = Node::spawn_in(
        &topo.host,
        &[
            "primary",
            "--peer",
            &addr,
            "--mem=64M",
            &format!("--net=tap=ftp1,mac={MAC},bridge={BRIDGE}"),
            "--payload=builtin:kv",
            "--",
            &format!("ip={GUEST_IP}/24"),
            "port=7000",
        ],
    );
    let reason = "network device differs: the primary has MAC 02:00:00:00:00:02, \
                  the standby MAC 02:00:00:00:00:09";
    for (who, node, want) in [
        ("primary", &mut primary, "the standby refused this primary"),
        ("standby", &mut standby, "refused the primary"),
    ] {
        let (status, err) = node.wait(Duration::from_secs(30));
        assert_eq!(
            status.code(),
            Some(common::EXIT_FTVMM_ERROR),
            "{who}: {err}"
        );
        assert_eq!(
            err.trim_end().lines().last(),
            Some(format!("ftvmm: error: {want}: {reason}").as_str()),
            "{who}"
        );
    }
}
