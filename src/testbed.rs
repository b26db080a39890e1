//! Test hosts in network namespaces that a test or benchmark creates and always removes: a
//! "host" namespace with a bridge (where ftvmm runs and puts its tap) and a "client" namespace
//! wired to the bridge by a veth pair. Addresses are from TEST-NET-1 (192.0.2.0/24).

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vmm::cast::usize_to_u64;

pub const BRIDGE: &str = "ftbr0";
pub const CLIENT_IP: &str = "192.0.2.1";
pub const GUEST_IP: &str = "192.0.2.2";

/// The port builtin:kv listens on in tests and benchmarks.
pub const KV_PORT: u16 = 7000;

fn kv_addr() -> std::net::SocketAddr {
    std::net::SocketAddr::from((
        GUEST_IP
            .parse::<std::net::Ipv4Addr>()
            .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
        KV_PORT,
    ))
}

fn kv_connect() -> Result<TcpStream, String> {
    node::probe::kv_connect(kv_addr())
}

/// [`node::probe::kv_sequential`] to the test bed's guest.
pub fn kv_sequential(
    progress: &AtomicU64,
    stop: &AtomicBool,
    think: Duration,
) -> Result<Vec<Duration>, String> {
    node::probe::kv_sequential(kv_addr(), progress, stop, think)
}

/// A kv client that writes `lines` requests at once on one connection while reading the
/// replies; returns the seconds it took and the bytes moved both ways.
pub fn kv_pipelined(lines: u64) -> Result<(f64, u64), String> {
    let stream = kv_connect()?;
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let start = Instant::now();
    let sender = std::thread::spawn(move || {
        let mut buf = Vec::new();
        for k in 1..=lines {
            buf.extend_from_slice(format!("{k}\n").as_bytes());
        }
        let sent = usize_to_u64(buf.len());
        writer.write_all(&buf).map(|_| sent)
    });
    let mut received = 0u64;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    for _ in 0..lines {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .map_err(|e| format!("reply: {e}"))?;
        received += usize_to_u64(n);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let sent = sender
        .join()
        .map_err(|_| "sender panicked")?
        .map_err(|e| e.to_string())?;
    Ok((elapsed, sent + received))
}

/// Which way a one-way kv stream moves its bytes.
#[derive(Clone, Copy, Debug)]
pub enum StreamWay {
    /// `in N` requests: the client sends the bytes, the guest drops them.
    In,
    /// `out N` requests: the guest sends the bytes.
    Out,
}

/// Bytes per kv stream request (the guest's largest).
const STREAM_CHUNK: usize = 64 * 1024;

/// Moves `chunks` requests of 64 KiB one way on one connection, pipelined (a sender thread
/// writes every request while the caller reads and checks every reply, counting them in
/// `progress`); returns the seconds it took and the bytes streamed.
pub fn kv_stream(way: StreamWay, chunks: u64, progress: &AtomicU64) -> Result<(f64, u64), String> {
    let stream = kv_connect()?;
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let start = Instant::now();
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let request = match way {
            StreamWay::In => {
                let mut r = format!("in {STREAM_CHUNK}\n").into_bytes();
                r.resize(r.len() + STREAM_CHUNK, b'x');
                r
            }
            StreamWay::Out => format!("out {STREAM_CHUNK}\n").into_bytes(),
        };
        for _ in 0..chunks {
            writer.write_all(&request)?;
        }
        Ok(())
    });
    let mut reader = BufReader::new(stream);
    let mut reply = vec![0u8; STREAM_CHUNK];
    let want_in = format!("in {STREAM_CHUNK}\n");
    for k in 1..=chunks {
        let got = match way {
            StreamWay::In => {
                let mut line = String::new();
                reader.read_line(&mut line).map(|_| line == want_in)
            }
            StreamWay::Out => std::io::Read::read_exact(&mut reader, &mut reply).map(|()| {
                reply[..STREAM_CHUNK - 1].iter().all(|&b| b == b'x')
                    && reply[STREAM_CHUNK - 1] == b'\n'
            }),
        };
        let failed = match got {
            Ok(true) => {
                progress.store(k, Ordering::SeqCst);
                continue;
            }
            Ok(false) => format!("kv stream {way:?}: reply {k} is wrong"),
            Err(e) => format!("kv stream {way:?}: reply {k}: {e}"),
        };
        // Unblocks the sender, which may be waiting for window the guest no longer opens.
        let _ = reader.get_ref().shutdown(std::net::Shutdown::Both);
        let _ = sender.join();
        return Err(failed);
    }
    let seconds = start.elapsed().as_secs_f64();
    sender
        .join()
        .map_err(|_| "stream sender panicked")?
        .map_err(|e| e.to_string())?;
    Ok((seconds, chunks * usize_to_u64(STREAM_CHUNK)))
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip (iproute2): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// The two namespaces; dropping it deletes them (and so the bridge, veths and taps in them).
pub struct Topology {
    pub host: String,
    pub client: String,
}

impl Topology {
    pub fn new(tag: &str) -> Result<Self, String> {
        let id = std::process::id();
        let topo = Self {
            host: format!("fth-{tag}-{id}"),
            client: format!("ftc-{tag}-{id}"),
        };
        // Unique per topology: a test binary builds several at once.
        static MADE: AtomicU64 = AtomicU64::new(0);
        let n = MADE.fetch_add(1, Ordering::Relaxed);
        let (veth_c, veth_b) = (format!("ftvc{id}.{n}"), format!("ftvb{id}.{n}"));
        ip(&["netns", "add", &topo.host])?;
        // From here on, dropping `topo` removes whatever was made.
        ip(&["netns", "add", &topo.client])?;
        ip(&["-n", &topo.host, "link", "add", BRIDGE, "type", "bridge"])?;
        ip(&["-n", &topo.host, "link", "set", BRIDGE, "up"])?;
        // Loopback in the host namespace: a primary and its standby talk over it.
        ip(&["-n", &topo.host, "link", "set", "lo", "up"])?;
        ip(&[
            "link", "add", &veth_c, "type", "veth", "peer", "name", &veth_b,
        ])?;
        ip(&["link", "set", &veth_b, "netns", &topo.host])?;
        ip(&["link", "set", &veth_c, "netns", &topo.client])?;
        ip(&["-n", &topo.host, "link", "set", &veth_b, "master", BRIDGE])?;
        ip(&["-n", &topo.host, "link", "set", &veth_b, "up"])?;
        ip(&[
            "-n",
            &topo.client,
            "addr",
            "add",
            &format!("{CLIENT_IP}/24"),
            "dev",
            &veth_c,
        ])?;
        ip(&["-n", &topo.client, "link", "set", &veth_c, "up"])?;
        ip(&["-n", &topo.client, "link", "set", "lo", "up"])?;
        Ok(topo)
    }

    /// Runs `f` on a thread that has entered the client namespace; sockets it opens live there.
    /// A panic in `f` is passed on to the caller.
    pub fn in_client<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_namespace(&self.client, f)
    }

    /// Starts `f` on a thread that has entered the client namespace and returns at once.
    pub fn spawn_in_client<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        spawn_in_namespace(&self.client, f)
    }

    /// Runs `f` on a thread that has entered the host namespace (where taps must be created).
    pub fn in_host<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_namespace(&self.host, f)
    }
}

/// Runs `f` on a new thread that has entered network namespace `name`; what it opens (sockets,
/// taps) lives there and keeps working from any thread. A panic in `f` reaches the caller.
fn in_namespace<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let result = spawn_in_namespace(name, f).join();
    result.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Starts `f` on a new thread that has entered network namespace `name`.
fn spawn_in_namespace<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{name}");
    std::thread::spawn(move || {
        let ns = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns on a namespace fd we own; it changes only this thread's namespace.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.host, &self.client] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// The hosts' addresses on a [`PairTopology`]'s LAN.
pub const HOST_A_IP: &str = "192.0.2.11";
pub const HOST_B_IP: &str = "192.0.2.12";

/// Two hosts and a client on one LAN, each in a namespace of its own: hosts `a` and `b` each
/// have a bridge [`BRIDGE`] (for the taps of the VMs they run) carrying their address, wired to
/// a LAN bridge in the client's namespace, where the client is [`CLIENT_IP`]. Dropping it
/// deletes the namespaces and everything in them.
pub struct PairTopology {
    pub a: String,
    pub b: String,
    pub client: String,
}

impl PairTopology {
    pub fn new(tag: &str) -> Result<Self, String> {
        let id = std::process::id();
        let topo = Self {
            a: format!("fta-{tag}-{id}"),
            b: format!("ftb-{tag}-{id}"),
            client: format!("ftc-{tag}-{id}"),
        };
        static MADE: AtomicU64 = AtomicU64::new(0);
        let n = MADE.fetch_add(1, Ordering::Relaxed);
        for ns in [&topo.a, &topo.b, &topo.client] {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        // From here on, dropping `topo` removes whatever was made.
        let lan = "ftlan0";
        ip(&["-n", &topo.client, "link", "add", lan, "type", "bridge"])?;
        ip(&["-n", &topo.client, "link", "set", lan, "up"])?;
        let cidr = format!("{CLIENT_IP}/24");
        ip(&["-n", &topo.client, "addr", "add", &cidr, "dev", lan])?;
        for (i, (ns, addr)) in [(&topo.a, HOST_A_IP), (&topo.b, HOST_B_IP)]
            .into_iter()
            .enumerate()
        {
            // Unique (a test binary builds several at once) and within 15 characters.
            let (host_end, lan_end) = (format!("fh{id:x}.{n}.{i}"), format!("fl{id:x}.{n}.{i}"));
            ip(&[
                "link", "add", &host_end, "type", "veth", "peer", "name", &lan_end,
            ])?;
            ip(&["link", "set", &host_end, "netns", ns])?;
            ip(&["link", "set", &lan_end, "netns", &topo.client])?;
            ip(&["-n", &topo.client, "link", "set", &lan_end, "master", lan])?;
            ip(&["-n", &topo.client, "link", "set", &lan_end, "up"])?;
            ip(&["-n", ns, "link", "add", BRIDGE, "type", "bridge"])?;
            ip(&["-n", ns, "link", "set", &host_end, "master", BRIDGE])?;
            ip(&["-n", ns, "link", "set", &host_end, "up"])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                BRIDGE,
            ])?;
            ip(&["-n", ns, "link", "set", BRIDGE, "up"])?;
        }
        Ok(topo)
    }

    /// Starts `f` on a thread that has entered the client namespace and returns at once.
    pub fn spawn_in_client<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        spawn_in_namespace(&self.client, f)
    }

    /// Runs `f` on a thread that has entered the client namespace.
    pub fn in_client<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_namespace(&self.client, f)
    }
}

impl Drop for PairTopology {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b, &self.client] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Sends `quit` to kv on a connection of its own and waits for its `bye`.
pub fn kv_quit() -> Result<(), String> {
    let stream = kv_connect()?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut writer = stream;
    writer
        .write_all(b"quit\n")
        .map_err(|e| format!("quit: {e}"))?;
    let mut reply = String::new();
    reader
        .read_line(&mut reply)
        .map_err(|e| format!("reply to quit: {e}"))?;
    match reply.as_str() {
        "bye\n" => Ok(()),
        other => Err(format!("kv answered quit with {other:?}")),
    }
}
