//! builtin:kv answers a TCP client on a test host in another network namespace, through
//! ftvmm's tap on a bridge.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicU64;
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use ftvmm::testbed::{kv_stream, StreamWay, Topology, BRIDGE, GUEST_IP};

/// Starts kv in the topology's host namespace and waits for its `kv listening` line.
fn start_kv(topo: &Topology, vcpus: &str) -> Guard {
    let mut child = dies_with_test(&mut Command::new("ip"))
        .args(["netns", "exec", &topo.host, FTVMM, "run", "--vcpus", vcpus])
        .args([
            "--net",
            &format!("tap=ftkv0,mac=02:00:00:00:00:02,bridge={BRIDGE}"),
        ])
        .args(["--payload", "builtin:kv", "--"])
        .args([format!("ip={GUEST_IP}/24"), "port=7000".into()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn ftvmm");
    let stdout = child.stdout.take().expect("stdout");
    let guard = Guard(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("kv did not start");
    assert_eq!(line, format!("kv listening on {GUEST_IP}:7000"));
    guard
}

/// Sends `k` for every k in `ks` on one connection, checking each reply against `total`.
fn exchange(ks: Vec<u64>, mut total: u64) -> u64 {
    let addr = format!("{GUEST_IP}:7000").parse().unwrap();
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    for k in ks {
        writeln!(writer, "{k}").unwrap();
        let mut reply = String::new();
        reader.read_line(&mut reply).expect("reply");
        total = total.wrapping_add(k);
        assert_eq!(reply, format!("{k} {total}\n"));
    }
    total
}

#[test]
fn kv_keeps_a_guest_wide_total_across_connections() {
    let topo = Topology::new("kv").expect("test topology");
    let _kv = start_kv(&topo, "2");
    let total = topo.in_client(|| exchange((1..=500).collect(), 0));
    assert_eq!(total, 500 * 501 / 2);
    // A second connection continues the same total, and bad input gets `error`.
    let total = topo.in_client(move || exchange(vec![1000, 7], total));
    assert_eq!(total, 500 * 501 / 2 + 1007);
    let reply = topo.in_client(|| {
        let mut s = TcpStream::connect(format!("{GUEST_IP}:7000")).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"not-a-number\nout 0\nin 65537\nout 2\n")
            .unwrap();
        let mut reader = BufReader::new(s);
        let mut lines = String::new();
        for _ in 0..4 {
            reader.read_line(&mut lines).expect("reply");
        }
        lines
    });
    assert_eq!(reply, "error\nerror\nerror\nx\n");
    // One-way streams (the bench's): every reply checked, every byte counted.
    for way in [StreamWay::In, StreamWay::Out] {
        let (_, bytes) = topo
            .in_client(move || kv_stream(way, 64, &AtomicU64::new(0)))
            .expect("stream");
        assert_eq!(bytes, 64 * 64 * 1024, "{way:?}");
    }
    // The total is untouched by streams.
    let total = topo.in_client(move || exchange(vec![1], total));
    assert_eq!(total, 500 * 501 / 2 + 1008);
}
