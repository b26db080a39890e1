//! `kv`: a TCP service on smoltcp over virtio-net that keeps one running total for the guest.
//!
//! Arguments: `ip=ADDR/PREFIX port=P [gw=ADDR] [sockets=K] [log=N] [dirty=MIB]`
//! - `ip`: the guest's IPv4 address and prefix length, e.g. `ip=10.0.0.2/24` (required)
//! - `port`: the TCP port to listen on (required)
//! - `gw`: default IPv4 gateway (optional)
//! - `sockets`: listening sockets, i.e. concurrent connections (default 4, 1..=64), so a
//!   reconnect is accepted while another connection is still open
//! - `log`: a data-acquisition service's log on the virtio-blk disk: each request appends N
//!   journal records (the `journal` payload's format, 512 bytes each, from sector 0) and
//!   flushes them before its reply, so that `journal verify` on the image counts
//!   N * requests records (1..=1024; default: no log)
//! - `dirty`: a guest that computes while it serves: every vCPU but vCPU 0 rewrites a buffer
//!   of its own of MIB MiB (1..=4096) with fresh pseudo-random words every 40 ms, forever
//!
//! Protocol: the client sends lines `{k}\n` (k a decimal u64, a trailing `\r` is ignored);
//! for each, the server adds k to the guest-wide total (wrapping) and replies `{k} {total}\n`.
//! Streams, for measuring TCP throughput one way: `in N\n` followed by N bytes of any content
//! (1 <= N <= 65536), which the server reads and drops, replying `in N\n` once all N arrived;
//! `out N\n` gets N bytes back (N - 1 bytes of `x`, then `\n`; 1 <= N <= 65536).
//! A malformed line gets `error\n`. The line `quit` gets `bye` and ends the guest with exit
//! code 0 once the reply is sent. Prints `kv listening on ADDR:P` when ready. ICMP echo (ping)
//! is answered by the stack. Only vCPU 0 serves.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::alloc::{alloc, Layout};
use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt::Write;
use core::net::Ipv4Addr;

use guest_rt::abi::DeviceKind;
use guest_rt::args::{key_value, parse_u64};
use guest_rt::virtio::blk::VirtioBlk;
use guest_rt::virtio::net::VirtioNet;
use guest_rt::{println, Ctx};
use journal::RECORD_SIZE;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};

guest_rt::entry!(main);

/// Longest accepted line (u64::MAX has 20 digits).
const MAX_LINE: usize = 32;
/// Stop reading from a connection while this many reply bytes wait for send-buffer room.
const MAX_PENDING_OUT: usize = 64 * 1024;
/// Largest `in` or `out` stream request.
const MAX_STREAM: u64 = 64 * 1024;
/// TCP windows of up to 2 MiB (with window scaling): under output commit a stream moves at
/// most one window per checkpoint round trip (a few ms with adaptive epochs), so a 16 KiB
/// window capped a replicated stream at about 0.3 MiB/s and 256 KiB at about 70 MiB/s.
const SOCKET_BUFFER: usize = 2048 * 1024;
/// The smallest socket buffer, for a small guest with many sockets.
const MIN_SOCKET_BUFFER: usize = 64 * 1024;

/// Each socket's receive and send buffer: [`SOCKET_BUFFER`], or less so that all of them
/// take at most a quarter of the guest's memory.
fn socket_buffer(mem_size: u64, sockets: usize) -> usize {
    let share = usize::try_from(mem_size / 4).unwrap_or(usize::MAX) / (2 * sockets.max(1));
    let size = share.clamp(MIN_SOCKET_BUFFER, SOCKET_BUFFER);
    // A power of two: smoltcp scales its window by a shift.
    1 << size.ilog2()
}

struct Params {
    ip: Ipv4Addr,
    prefix: u8,
    port: u16,
    gw: Option<Ipv4Addr>,
    sockets: usize,
    /// Journal records appended per request, if the service logs.
    log: Option<u64>,
}

fn usage(msg: &str) -> ! {
    println!(
        "kv: {msg}; usage: kv ip=ADDR/PREFIX port=P [gw=ADDR] [sockets=K] [log=N] [dirty=MIB]"
    );
    guest_rt::exit(2)
}

fn parse(ctx: &Ctx) -> Params {
    let (mut ip, mut port, mut gw, mut sockets, mut log) = (None, None, None, 4usize, None);
    for arg in ctx.args() {
        match key_value(arg) {
            ("ip", Some(v)) => {
                let (addr, prefix) = v
                    .split_once('/')
                    .unwrap_or_else(|| usage("ip needs /PREFIX"));
                let addr: Ipv4Addr = addr.parse().unwrap_or_else(|_| usage("bad ip address"));
                let prefix = parse_u64(prefix)
                    .filter(|p| *p <= 32)
                    .unwrap_or_else(|| usage("bad prefix"));
                ip = Some((addr, prefix as u8));
            }
            ("port", Some(v)) => {
                port = Some(
                    parse_u64(v)
                        .filter(|p| (1..=65535).contains(p))
                        .unwrap_or_else(|| usage("bad port")) as u16,
                )
            }
            ("gw", Some(v)) => {
                gw = Some(v.parse().unwrap_or_else(|_| usage("bad gateway address")))
            }
            ("sockets", Some(v)) => {
                sockets = parse_u64(v)
                    .filter(|k| (1..=64).contains(k))
                    .unwrap_or_else(|| usage("bad sockets")) as usize
            }
            ("log", Some(v)) => {
                log = Some(
                    parse_u64(v)
                        .filter(|n| (1..=1024).contains(n))
                        .unwrap_or_else(|| usage("bad log")),
                )
            }
            // The other vCPUs act on it (see `dirty_forever`).
            ("dirty", Some(v)) => {
                dirty_mib(v);
            }
            _ => usage("unknown argument"),
        }
    }
    let (ip, prefix) = ip.unwrap_or_else(|| usage("missing ip="));
    let port = port.unwrap_or_else(|| usage("missing port="));
    Params {
        ip,
        prefix,
        port,
        gw,
        sockets,
        log,
    }
}

/// The service's state: the running total, and its log on the disk.
struct Service {
    total: u64,
    log: Option<Log>,
    /// A client asked to end the guest.
    quitting: bool,
}

/// The log: `per_request` journal records per request, the next at sector `next`.
struct Log {
    blk: VirtioBlk,
    per_request: u64,
    next: u64,
    buf: Vec<u8>,
}

impl Log {
    /// Appends this request's records and makes them durable.
    fn append(&mut self) {
        if self.next + self.per_request > self.blk.capacity_sectors() {
            println!("kv: the log is full at record {}", self.next);
            guest_rt::exit(3)
        }
        for (i, record) in self.buf.chunks_exact_mut(RECORD_SIZE).enumerate() {
            journal::encode(self.next + i as u64, record);
        }
        if let Err(e) = self
            .blk
            .write(self.next, &self.buf)
            .and_then(|()| self.blk.flush())
        {
            println!("kv: log write failed at record {}: {e}", self.next);
            guest_rt::exit(3)
        }
        self.next += self.per_request;
    }
}

/// Per-connection protocol state.
#[derive(Default)]
struct Conn {
    line: Vec<u8>,
    /// The current line is too long; answer `error` at its end.
    overlong: bool,
    /// Replies not yet accepted by the socket's send buffer.
    out: Replies,
    /// Bytes of an `in` request still to drop, and the request's size.
    sinking: u64,
    sink_size: u64,
}

/// Replies waiting for send-buffer room, in order: text (a ring of bytes) and the bodies of
/// `out` requests, which are written straight into the socket's send buffer when it has room
/// (as a server sends a file from its cache) rather than staged first. Under replication
/// every page a guest writes is checkpointed: a body staged in a buffer, then copied into the
/// socket's, then into a frame, is dirtied three times. And a partial send drops bytes from
/// the front without moving the rest (a `String` drained from its front moved up to 64 KiB
/// per send: twelve dirty bytes per byte a stream sent).
#[derive(Default)]
struct Replies {
    text: VecDeque<u8>,
    /// In order: a run of `text` bytes, or an `out` body of so many `x` then a newline.
    pieces: VecDeque<Piece>,
    len: usize,
}

enum Piece {
    Text(usize),
    Body(usize),
}

impl Replies {
    fn push_str(&mut self, s: &str) {
        self.text.extend(s.as_bytes());
        self.len += s.len();
        match self.pieces.back_mut() {
            Some(Piece::Text(n)) => *n += s.len(),
            _ => self.pieces.push_back(Piece::Text(s.len())),
        }
    }

    /// An `out` reply of `n` bytes: `n - 1` times `x`, then a newline.
    fn push_body(&mut self, n: usize) {
        self.len += n;
        self.pieces.push_back(Piece::Body(n));
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn clear(&mut self) {
        *self = Self::default();
    }

    /// Fills `buf` from the front of the replies; returns how many bytes it took.
    fn fill(&mut self, buf: &mut [u8]) -> usize {
        let mut at = 0;
        while at < buf.len() {
            let Some(piece) = self.pieces.front_mut() else {
                break;
            };
            let room = &mut buf[at..];
            let taken = match piece {
                Piece::Text(n) => {
                    let k = (*n).min(room.len());
                    for (dst, src) in room[..k].iter_mut().zip(self.text.drain(..k)) {
                        *dst = src;
                    }
                    *n -= k;
                    k
                }
                Piece::Body(n) => {
                    let k = (*n).min(room.len());
                    room[..k].fill(b'x');
                    *n -= k;
                    if *n == 0 {
                        room[k - 1] = b'\n';
                    }
                    k
                }
            };
            if matches!(piece, Piece::Text(0) | Piece::Body(0)) {
                self.pieces.pop_front();
            }
            at += taken;
            self.len -= taken;
        }
        at
    }

    /// Hands the socket what its send buffer takes (its free space may wrap: twice).
    fn send(&mut self, socket: &mut tcp::Socket) {
        for _ in 0..2 {
            match socket.send(|buf| (self.fill(buf), ())) {
                Ok(()) if !self.is_empty() && socket.can_send() => continue,
                _ => break,
            }
        }
    }
}

impl Write for Replies {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.push_str(s);
        Ok(())
    }
}

impl Conn {
    fn reset(&mut self) {
        self.line.clear();
        self.overlong = false;
        self.out.clear();
        self.sinking = 0;
    }

    /// Consumes received bytes, appending a reply per complete line.
    fn input(&mut self, mut data: &[u8], service: &mut Service) {
        while !data.is_empty() {
            if self.sinking > 0 {
                let n = data
                    .len()
                    .min(usize::try_from(self.sinking).unwrap_or(usize::MAX));
                data = &data[n..];
                // n <= self.sinking, a u64.
                self.sinking -= u64::try_from(n).unwrap_or(self.sinking);
                if self.sinking == 0 {
                    let _ = writeln!(self.out, "in {}", self.sink_size);
                }
                continue;
            }
            let byte = data[0];
            data = &data[1..];
            if byte != b'\n' {
                if self.line.len() < MAX_LINE {
                    self.line.push(byte);
                } else {
                    self.overlong = true;
                }
                continue;
            }
            let line = self.line.strip_suffix(b"\r").unwrap_or(&self.line);
            match Request::parse(line, self.overlong) {
                Request::Quit => {
                    self.out.push_str("bye\n");
                    service.quitting = true;
                }
                Request::In(n) => {
                    self.sink_size = n;
                    self.sinking = n;
                }
                Request::Out(n) => {
                    // n <= MAX_STREAM: it fits.
                    self.out.push_body(usize::try_from(n).unwrap_or(0));
                }
                Request::Add(k) => {
                    if let Some(log) = service.log.as_mut() {
                        log.append();
                    }
                    service.total = service.total.wrapping_add(k);
                    let _ = writeln!(self.out, "{k} {}", service.total);
                }
                Request::Bad => self.out.push_str("error\n"),
            }
            self.line.clear();
            self.overlong = false;
        }
    }
}

/// One line of the protocol (see the module docs).
enum Request {
    Quit,
    /// `in N`: N bytes follow, to be dropped.
    In(u64),
    /// `out N`: N bytes to send back.
    Out(u64),
    /// `{k}`: add k to the total.
    Add(u64),
    Bad,
}

impl Request {
    /// The request `line` makes; an `overlong` one is always bad.
    fn parse(line: &[u8], overlong: bool) -> Self {
        let stream = |prefix: &[u8]| {
            let n = parse_line(line.strip_prefix(prefix)?)?;
            (1..=MAX_STREAM).contains(&n).then_some(n)
        };
        if overlong {
            Self::Bad
        } else if line == b"quit" {
            Self::Quit
        } else if let Some(n) = stream(b"in ") {
            Self::In(n)
        } else if let Some(n) = stream(b"out ") {
            Self::Out(n)
        } else {
            parse_line(line).map_or(Self::Bad, Self::Add)
        }
    }
}

/// A line is a non-empty run of decimal digits that fits a u64.
fn parse_line(line: &[u8]) -> Option<u64> {
    if line.is_empty() || !line.iter().all(u8::is_ascii_digit) {
        return None;
    }
    core::str::from_utf8(line).ok()?.parse().ok()
}

fn now() -> Instant {
    Instant::from_micros(guest_rt::clock::now_us() as i64)
}

/// How often a dirtying vCPU rewrites its buffer: 16 MiB per 40 ms is the heavy dirtying
/// that ftvmm's benchmark measures replies under.
const DIRTY_PERIOD_US: u64 = 40_000;

fn dirty_mib(v: &str) -> u64 {
    parse_u64(v)
        .filter(|m| (1..=4096).contains(m))
        .unwrap_or_else(|| usage("bad dirty"))
}

/// Rewrites a buffer of `mib` MiB, every word with a fresh xorshift value (so that
/// compression gains nothing), once every `DIRTY_PERIOD_US`, or back to back if a pass takes
/// longer.
fn dirty_forever(mib: u64, seed: u64) -> ! {
    let bytes = usize::try_from(mib << 20).unwrap_or_else(|_| usage("bad dirty"));
    let layout = Layout::from_size_align(bytes, 4096).unwrap_or_else(|_| usage("bad dirty"));
    // SAFETY: non-zero size (mib >= 1). Never freed: it is written until the VM ends.
    let buf = unsafe { alloc(layout) } as *mut u64;
    if buf.is_null() {
        println!("kv: not enough memory for dirty={mib}");
        guest_rt::exit(2);
    }
    let mut x = seed | 1;
    loop {
        let start = guest_rt::clock::now_us();
        for i in 0..bytes / 8 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // SAFETY: i < bytes / 8 words of the buffer this vCPU alone allocated.
            unsafe { buf.add(i).write_volatile(x) };
        }
        while guest_rt::clock::now_us() - start < DIRTY_PERIOD_US {
            core::hint::spin_loop();
        }
    }
}

fn main(ctx: &Ctx) {
    if !ctx.is_boot_vcpu() {
        let dirty = ctx.args().find_map(|arg| match key_value(arg) {
            ("dirty", Some(v)) => Some(dirty_mib(v)),
            _ => None,
        });
        if let Some(mib) = dirty {
            dirty_forever(mib, u64::from(ctx.vcpu_id()));
        }
        return;
    }
    let p = parse(ctx);
    let Some(dev) = ctx.device(DeviceKind::VirtioNet, 0) else {
        println!("kv: no virtio-net device attached");
        guest_rt::exit(1)
    };
    // SAFETY: the window comes from the boot block and only vCPU 0 drives it.
    let mut net = match unsafe { VirtioNet::new(dev.mmio_base) } {
        Ok(net) => net,
        Err(e) => {
            println!("kv: virtio-net: {e}");
            guest_rt::exit(1)
        }
    };

    let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(net.mac())));
    config.random_seed = guest_rt::clock::rdtsc();
    let mut iface = Interface::new(config, &mut net, now());
    iface.update_ip_addrs(|addrs| {
        addrs
            .push(IpCidr::new(IpAddress::Ipv4(p.ip), p.prefix))
            .expect("one address fits");
    });
    if let Some(gw) = p.gw {
        iface
            .routes_mut()
            .add_default_ipv4_route(gw)
            .expect("route table has room");
    }

    let mut sockets = SocketSet::new(Vec::new());
    let mut conns: Vec<(SocketHandle, Conn)> = Vec::new();
    let buffer = socket_buffer(ctx.boot_info().mem_size, p.sockets);
    for _ in 0..p.sockets {
        let rx = tcp::SocketBuffer::new(vec![0; buffer]);
        let tx = tcp::SocketBuffer::new(vec![0; buffer]);
        conns.push((sockets.add(tcp::Socket::new(rx, tx)), Conn::default()));
    }

    let log = p.log.map(|per_request| {
        let Some(dev) = ctx.device(DeviceKind::VirtioBlk, 0) else {
            usage("log= needs a disk (ftvmm --disk IMG)")
        };
        // SAFETY: the first virtio-blk window ftvmm listed; only vCPU 0 drives it.
        let blk = unsafe { VirtioBlk::new(dev.mmio_base) }.unwrap_or_else(|e| {
            println!("kv: virtio-blk: {e}");
            guest_rt::exit(1)
        });
        Log {
            blk,
            per_request,
            next: 0,
            buf: vec![0; per_request as usize * RECORD_SIZE],
        }
    });
    let mut service = Service {
        total: 0,
        log,
        quitting: false,
    };
    let mut announced = false;
    let mut buf = [0u8; 2048];
    loop {
        iface.poll(now(), &mut net, &mut sockets);
        for (handle, conn) in conns.iter_mut() {
            let socket = sockets.get_mut::<tcp::Socket>(*handle);
            if !socket.is_open() {
                conn.reset();
                socket.listen(p.port).expect("listen on a closed socket");
                continue;
            }
            while conn.out.len() < MAX_PENDING_OUT && socket.can_recv() {
                match socket.recv_slice(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => conn.input(&buf[..n], &mut service),
                }
            }
            if !conn.out.is_empty() && socket.can_send() {
                conn.out.send(socket);
            }
            // The peer has closed its side and everything is answered: close ours.
            if !socket.may_recv() && socket.may_send() && conn.out.is_empty() {
                socket.close();
            }
        }
        if !announced {
            announced = true;
            println!("kv listening on {}:{}", p.ip, p.port);
        }
        // Send what this round produced, then one notification per queue.
        iface.poll(now(), &mut net, &mut sockets);
        net.flush();
        if service.quitting
            && conns
                .iter()
                .all(|(h, c)| c.out.is_empty() && sockets.get::<tcp::Socket>(*h).send_queue() == 0)
        {
            println!("kv: quit");
            guest_rt::exit(0)
        }
    }
}
