//! The replication link: two TCP connections between the nodes (epoch data; control with
//! heartbeats and role messages, so that liveness never queues behind a large epoch), the
//! handshake that checks both nodes agree on the VM, and silence detection.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm::cast::saturating_u64;
use vmm::VmConfig;

use crate::policy::EpochBounds;
use crate::wire::{self, Channel, FrameReader, Message, WireError, PROTOCOL_VERSION};

/// What the primary tells the standby in its Hello: the VM, the devices the standby must
/// provide locally, and the timing both nodes use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerConfig {
    pub vm: VmConfig,
    /// Size of the primary's disk image, if the VM has a disk.
    pub disk_size: Option<u64>,
    /// MAC of the VM's NIC, if it has one.
    pub net_mac: Option<[u8; 6]>,
    /// Where epochs may end (see [`crate::policy`]).
    #[serde(default)]
    pub epochs: EpochBounds,
    /// Silence after which a node judges its peer dead.
    pub failover_timeout_ms: u64,
    /// How long a standby whose heartbeats arrive may leave a checkpoint unacknowledged
    /// before the primary drops protection (longer than the failover timeout: slow is not dead).
    pub ack_timeout_ms: u64,
    /// The highest rate of a disk resync, in MiB/s; 0 leaves it unlimited.
    #[serde(default)]
    pub resync_max_mib_s: u64,
}

impl PeerConfig {
    pub fn failover_timeout(&self) -> Duration {
        Duration::from_millis(self.failover_timeout_ms)
    }

    pub fn ack_timeout(&self) -> Duration {
        Duration::from_millis(self.ack_timeout_ms)
    }

    /// How often each node tells the other it is alive: several times per failover timeout,
    /// so that one late heartbeat is not a failure.
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis((self.failover_timeout_ms / 5).clamp(5, 100))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("no standby answered at {addr} within {waited_ms} ms: {source}")]
    Connect {
        addr: String,
        waited_ms: u64,
        source: io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: io::Error },
    #[error("replication link: {0}")]
    Io(#[from] io::Error),
    #[error("replication link: {0}")]
    Wire(#[from] WireError),
    #[error("the standby refused this primary: {0}")]
    Refused(String),
    #[error("refused the primary: {0}")]
    Refusing(String),
    #[error("replication handshake: expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: String },
    #[error("the primary's configuration is not valid JSON: {0}")]
    Config(#[from] serde_json::Error),
}

/// Read timeout of link sockets: how often loops waiting on the peer look at the clock.
pub const TICK: Duration = Duration::from_millis(5);

/// A connection's writing half, shared by the threads that send on it.
#[derive(Clone)]
pub struct Sender {
    writer: Arc<Mutex<TcpStream>>,
    /// Outside the writer's lock, so that a writer blocked on a full socket can be cut loose.
    handle: Arc<TcpStream>,
    /// Frames written whole, by every clone.
    sent: Arc<AtomicU64>,
}

impl Sender {
    pub fn new(stream: &TcpStream) -> io::Result<Self> {
        Ok(Self {
            writer: Arc::new(Mutex::new(stream.try_clone()?)),
            handle: Arc::new(stream.try_clone()?),
            sent: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Frames written whole so far (what a peer that has read them all reports).
    pub fn frames_sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    pub fn send(&self, msg: &Message) -> io::Result<()> {
        self.send_frame(&wire::encode(msg))
    }

    pub fn send_frame(&self, frame: &[u8]) -> io::Result<()> {
        use io::Write;
        let mut s = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        s.write_all(frame)?;
        self.sent.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Ends the connection both ways; a thread blocked writing on it returns with an error.
    pub fn shutdown(&self) {
        let _ = self.handle.shutdown(std::net::Shutdown::Both);
    }
}

/// The two connections of a link, as the primary sees them after the handshake, and the disk
/// blocks the standby said its image needs.
pub struct PrimaryLink {
    pub data: TcpStream,
    /// The control connection, with what has been read of it already.
    pub control: FrameReader<TcpStream>,
    pub need: Vec<(u64, u64)>,
    /// After a swap: the checkpoint both nodes hold already, which the first epoch follows
    /// (no resync, no pre-copy).
    pub continuing: Option<u64>,
}

/// Both connections of a link with what has been read of each, as a node hands them on when
/// a swap turns the link around.
pub struct Link {
    pub data: FrameReader<TcpStream>,
    pub control: FrameReader<TcpStream>,
}

impl Link {
    /// This link as the new primary uses it after a swap from checkpoint `epoch`.
    pub fn into_primary(self, epoch: u64) -> PrimaryLink {
        PrimaryLink {
            // The old primary, now standing by, sends nothing on the data connection.
            data: self.data.into_inner(),
            control: self.control,
            need: Vec::new(),
            continuing: Some(epoch),
        }
    }
}

fn configure(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(TICK))
}

/// Reads one message, waiting at most `limit` (the socket has a short read timeout).
pub fn read_within(
    reader: &mut FrameReader<TcpStream>,
    limit: Duration,
) -> Result<Message, LinkError> {
    let start = Instant::now();
    loop {
        match reader.read_message() {
            Err(WireError::Idle) if start.elapsed() < limit => continue,
            Err(WireError::Idle) => {
                return Err(LinkError::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the peer did not answer the handshake",
                )))
            }
            other => return Ok(other?),
        }
    }
}

/// Connects to the standby at `addr` (retrying until `timeout`, as it may start later) and
/// opens both connections with a Hello carrying `config`.
pub fn connect(
    addr: &str,
    config: &PeerConfig,
    timeout: Duration,
) -> Result<PrimaryLink, LinkError> {
    let session = session_id();
    let config = serde_json::to_vec(config)?;
    let start = Instant::now();
    let open = |channel| -> Result<TcpStream, LinkError> {
        let stream = loop {
            match TcpStream::connect(addr) {
                Ok(s) => break s,
                Err(source) if start.elapsed() >= timeout => {
                    return Err(LinkError::Connect {
                        addr: addr.to_string(),
                        waited_ms: saturating_u64(start.elapsed().as_millis()),
                        source,
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        configure(&stream)?;
        let hello = Message::Hello {
            version: PROTOCOL_VERSION,
            channel,
            session,
            config: config.clone(),
        };
        wire::write_message(&mut &stream, &hello)?;
        let mut reader = FrameReader::new(stream.try_clone()?);
        match read_within(&mut reader, timeout.max(Duration::from_secs(2)))? {
            Message::Welcome => Ok(stream),
            Message::Refuse { reason } => Err(LinkError::Refused(reason)),
            other => Err(LinkError::Unexpected {
                expected: "Welcome",
                got: format!("{other:?}"),
            }),
        }
    };
    let data = open(Channel::Data)?;
    let mut control = FrameReader::new(open(Channel::Control)?);
    let need = match read_within(&mut control, timeout.max(Duration::from_secs(2)))? {
        Message::Need { runs } => runs,
        other => {
            return Err(LinkError::Unexpected {
                expected: "Need",
                got: format!("{other:?}"),
            })
        }
    };
    Ok(PrimaryLink {
        data,
        control,
        need,
        continuing: None,
    })
}

/// A standby's listening socket.
pub struct Listener(TcpListener);

impl Listener {
    pub fn bind(addr: &str) -> Result<Self, LinkError> {
        TcpListener::bind(addr)
            .map(Self)
            .map_err(|source| LinkError::Listen {
                addr: addr.to_string(),
                source,
            })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }

    /// Accepts a primary's two connections. `check` decides whether the primary's config is
    /// acceptable here; a refusal is sent to the primary and returned as an error. Once both
    /// are welcome, tells the primary which disk blocks this node's image `need`s.
    pub fn accept(
        &self,
        check: impl Fn(&PeerConfig) -> Result<(), String>,
        need: &[(u64, u64)],
    ) -> Result<(PeerConfig, TcpStream, TcpStream), LinkError> {
        let (data, session, config) = self.accept_one(Channel::Data, None, &check)?;
        let (control, _, _) = self.accept_one(Channel::Control, Some(session), &check)?;
        wire::write_message(
            &mut &control,
            &Message::Need {
                runs: need.to_vec(),
            },
        )?;
        Ok((config, data, control))
    }

    fn accept_one(
        &self,
        channel: Channel,
        session: Option<u64>,
        check: &impl Fn(&PeerConfig) -> Result<(), String>,
    ) -> Result<(TcpStream, u64, PeerConfig), LinkError> {
        let (stream, peer) = self.0.accept()?;
        configure(&stream)?;
        let mut reader = FrameReader::new(stream.try_clone()?);
        let refuse = |reason: String| {
            let _ = wire::write_message(
                &mut &stream,
                &Message::Refuse {
                    reason: reason.clone(),
                },
            );
            LinkError::Refusing(reason)
        };
        let hello = match read_within(&mut reader, Duration::from_secs(10)) {
            Ok(m) => m,
            Err(LinkError::Wire(e @ WireError::Version { .. })) => {
                return Err(refuse(e.to_string()))
            }
            Err(e) => return Err(e),
        };
        let Message::Hello {
            channel: got_channel,
            session: got_session,
            config,
            ..
        } = hello
        else {
            return Err(LinkError::Unexpected {
                expected: "Hello",
                got: format!("{hello:?}"),
            });
        };
        if got_channel != channel || session.is_some_and(|s| s != got_session) {
            return Err(refuse(format!(
                "expected the {channel:?} connection of session {session:?} from {peer}"
            )));
        }
        let config: PeerConfig = serde_json::from_slice(&config)
            .map_err(|e| refuse(format!("unreadable VM configuration: {e}")))?;
        check(&config).map_err(refuse)?;
        wire::write_message(&mut &stream, &Message::Welcome)?;
        Ok((stream, got_session, config))
    }
}

// Truncating the nanosecond clock keeps its fast-changing low bits, all that an id needs.
#[allow(clippy::cast_possible_truncation)]
fn session_id() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    t.as_nanos() as u64 ^ (u64::from(std::process::id()) << 32)
}

/// Lowers the calling thread's scheduling priority (nice 10), so that replication work runs on
/// the cycles the guest's vCPUs leave: the guest keeps its speed, and a checkpoint that takes
/// longer to ship stretches the next epoch. Best effort: an error leaves the priority as it was.
pub fn yield_to_guest() {
    // SAFETY: plain syscalls on the calling thread's own id; no memory is passed.
    unsafe {
        // A thread id is a positive pid_t, so it converts; were it not, the priority stays.
        if let Ok(tid) = libc::id_t::try_from(libc::syscall(libc::SYS_gettid)) {
            libc::setpriority(libc::PRIO_PROCESS, tid, 10);
        }
    }
}

/// The calling thread at real-time priority (SCHED_FIFO, the lowest level) while it lives, then
/// back to normal scheduling: for the guest's pause, so that on a host whose other cores run
/// the sender, the standby or other guests, neither the pause nor the threads it spawns to copy
/// pages wait for a core (p99 of a 16 MiB pause here: 2.6-2.7 ms without, 2.0-2.1 ms with). A
/// pause is short and bounded; the kernel's real-time throttling bounds it anyway. Best effort:
/// without CAP_SYS_NICE the thread keeps its priority.
pub struct Urgent {
    raised: bool,
}

impl Urgent {
    pub fn raise() -> Self {
        let param = libc::sched_param { sched_priority: 1 };
        // SAFETY: sets the calling thread's own policy (pid 0); `param` outlives the call.
        let raised = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } == 0;
        Self { raised }
    }
}

impl Drop for Urgent {
    fn drop(&mut self) {
        if self.raised {
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: as in `raise`; SCHED_OTHER keeps the thread's nice value.
            unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &param) };
        }
    }
}

/// Puts the calling thread's disk I/O in the lowest best-effort class level (ioprio BE 7), so
/// that a resync's reads of the image yield to the guest's own I/O. Best effort.
pub fn lower_io_priority() {
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_CLASS_BE: libc::c_long = 2;
    const IOPRIO_CLASS_SHIFT: libc::c_long = 13;
    // SAFETY: ioprio_set on the calling thread (who 0 with IOPRIO_WHO_PROCESS means the
    // caller); no memory is passed.
    unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            0,
            (IOPRIO_CLASS_BE << IOPRIO_CLASS_SHIFT) | 7,
        );
    }
}

/// Whether `gap` between two looks at the clock, by a loop that looks at least every TICK, means
/// that this node did not run meanwhile (frozen by SIGSTOP, or starved) rather than that a turn
/// of the loop was slow.
pub fn not_running(gap: Duration, timeout: Duration) -> bool {
    gap > (timeout / 4).max(TICK * 10)
}

/// Measures how long the peer has been silent, counting only time during which this node was
/// itself running: a node that was frozen (SIGSTOP, starved) gives the peer a fresh timeout
/// when it wakes, so it drains what arrived meanwhile before it judges the peer.
pub struct SilenceClock {
    timeout: Duration,
    last_heard: Instant,
    last_look: Instant,
}

impl SilenceClock {
    pub fn new(timeout: Duration) -> Self {
        let now = Instant::now();
        Self {
            timeout,
            last_heard: now,
            last_look: now,
        }
    }

    /// The peer said something.
    pub fn heard(&mut self) {
        self.last_heard = Instant::now();
    }

    /// Whether the peer has been silent for the whole timeout; call at least every TICK.
    pub fn expired(&mut self) -> bool {
        let now = Instant::now();
        let gap = now - self.last_look;
        self.last_look = now;
        // A long gap between looks means this node did not run: restart the peer's window.
        if not_running(gap, self.timeout) {
            self.last_heard = now;
            return false;
        }
        now - self.last_heard > self.timeout
    }

    /// How long the peer has been silent.
    pub fn silent_for(&self) -> Duration {
        self.last_heard.elapsed()
    }
}
