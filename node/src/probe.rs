//! Probes of a guest's service as its clients see it, for drills (and the test bed): a client
//! of the `kv` payload's protocol on one TCP connection, and a watcher of a guest's console
//! stream across the nodes' console files. Each reports the longest stall it saw.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a probe waits for one reply before it calls the service broken.
const REPLY_LIMIT: Duration = Duration::from_secs(10);

/// A connection to `kv` at `addr`, requests in one segment each (a tail-loss probe resends a
/// lost request whole).
pub fn kv_connect(addr: SocketAddr) -> Result<TcpStream, String> {
    let stream =
        TcpStream::connect_timeout(&addr, REPLY_LIMIT).map_err(|e| format!("connect: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(REPLY_LIMIT))
        .map_err(|e| e.to_string())?;
    Ok(stream)
}

/// A kv client on one connection: sends k = 1, 2, 3, ... one at a time, checks each reply
/// `{k} {total}`, publishes the last k answered in `progress`, until `stop` is set. Between a
/// reply and the next request it waits a pseudo-random time below `think` (zero: back to
/// back). Returns each request's round trip; any error (reset, wrong or missing reply, none
/// within 10 s) ends it with the request it happened on.
pub fn kv_sequential(
    addr: SocketAddr,
    progress: &AtomicU64,
    stop: &AtomicBool,
    think: Duration,
) -> Result<Vec<Duration>, String> {
    let stream = kv_connect(addr)?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut writer = stream;
    let (mut total, mut k) = (0u64, 0u64);
    let mut round_trips = Vec::new();
    let mut reply = String::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    while !stop.load(Ordering::SeqCst) {
        k += 1;
        if !think.is_zero() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            std::thread::sleep(think.mul_f64((seed % 1000) as f64 / 1000.0));
        }
        let asked = Instant::now();
        writer
            .write_all(format!("{k}\n").as_bytes())
            .map_err(|e| format!("request {k}: {e}"))?;
        reply.clear();
        reader
            .read_line(&mut reply)
            .map_err(|e| format!("reply to {k}: {e}"))?;
        total = total.wrapping_add(k);
        if reply != format!("{k} {total}\n") {
            return Err(format!("reply to {k}: got {reply:?}, want \"{k} {total}\""));
        }
        round_trips.push(asked.elapsed());
        progress.store(k, Ordering::SeqCst);
    }
    Ok(round_trips)
}

/// Watches a guest's console stream, written at stream offsets into one file per node: the
/// stream's length is the furthest byte any file holds.
pub struct ConsoleWatch {
    files: Vec<PathBuf>,
}

impl ConsoleWatch {
    pub fn new(files: Vec<PathBuf>) -> Self {
        Self { files }
    }

    /// The stream's length now.
    pub fn length(&self) -> u64 {
        self.files
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .max()
            .unwrap_or(0)
    }

    /// Looks every millisecond until `stop` is set; returns the longest time the stream did
    /// not grow.
    pub fn longest_stall(&self, stop: &AtomicBool) -> Duration {
        let (mut length, mut since) = (self.length(), Instant::now());
        let mut longest = Duration::ZERO;
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
            let now = self.length();
            if now != length {
                longest = longest.max(since.elapsed());
                (length, since) = (now, Instant::now());
            }
        }
        longest
    }
}
