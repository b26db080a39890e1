//! The link between the two node daemons: each dials the other's control address and says,
//! on the connection it dialled, what its view of each VM is (and a heartbeat), so that each
//! hears the other on the connection it accepted. JSON lines, versioned by the first one.
//! The views carry the generation identifiers the role machines decide with; ownership with a
//! fencing token will travel in them too.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::role::PeerView;

/// Version of the daemons' link; a peer speaking another is refused.
pub const PEER_PROTOCOL: u32 = 1;
/// How often a daemon tells its peer it is alive.
pub const BEAT: Duration = Duration::from_millis(200);
/// Silence after which the peer's daemon counts as gone.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(2);

/// One line on the daemons' link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "kebab-case")]
pub enum PeerMsg {
    /// The first line: who dials whom, in which protocol version.
    Hello {
        version: u32,
        from: String,
        to: String,
    },
    /// The sender's view of one VM.
    View {
        vm: String,
        view: PeerView,
    },
    Beat,
}

/// What the link tells the daemon.
#[derive(Debug, Clone, PartialEq)]
pub enum PeerEvent {
    Up,
    View { vm: String, view: PeerView },
    Down { why: String },
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("nodes.{node}.control = {addr}: cannot listen: {source}")]
    Listen {
        node: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Listens on `addr` for the peer `peer`'s daemon (as node `me`) and hands what it says to
/// `events`. One connection at a time: a new one (the peer restarted) replaces the old.
pub fn listen(
    me: &str,
    addr: SocketAddr,
    peer: &str,
    events: Sender<PeerEvent>,
) -> Result<(), PeerError> {
    let listener = TcpListener::bind(addr).map_err(|source| PeerError::Listen {
        node: me.to_string(),
        addr,
        source,
    })?;
    let (me, peer) = (me.to_string(), peer.to_string());
    let current = Arc::new(Mutex::new(0u64));
    std::thread::Builder::new()
        .name("peer-listen".into())
        .spawn(move || {
            for (id, stream) in (1u64..).zip(listener.incoming()) {
                let Ok(stream) = stream else { continue };
                *lock(&current) = id;
                let (me, peer, events, current) =
                    (me.clone(), peer.clone(), events.clone(), current.clone());
                std::thread::spawn(move || {
                    let why = hear(stream, &me, &peer, &events, &current, id);
                    if *lock(&current) == id {
                        let _ = events.send(PeerEvent::Down { why });
                    }
                });
            }
        })
        .map_err(|source| PeerError::Listen {
            node: String::new(),
            addr,
            source,
        })?;
    Ok(())
}

/// Reads one connection of the peer's; returns why it ended.
fn hear(
    stream: TcpStream,
    me: &str,
    peer: &str,
    events: &Sender<PeerEvent>,
    current: &Mutex<u64>,
    id: u64,
) -> String {
    let _ = stream.set_read_timeout(Some(PEER_TIMEOUT));
    let mut lines = BufReader::new(stream).lines();
    let mut hello = false;
    loop {
        let line = match lines.next() {
            Some(Ok(line)) => line,
            Some(Err(e)) => return format!("the peer's daemon was silent or failed: {e}"),
            None => return "the peer's daemon closed the link".into(),
        };
        if *lock(current) != id {
            return "replaced by a newer connection".into();
        }
        let msg = match serde_json::from_str::<PeerMsg>(&line) {
            Ok(msg) => msg,
            Err(e) => return format!("the peer's daemon sent a bad line: {e}"),
        };
        match msg {
            PeerMsg::Hello { version, from, to } => {
                if version != PEER_PROTOCOL {
                    return format!(
                        "the peer's daemon speaks version {version}, this one {PEER_PROTOCOL}"
                    );
                }
                if from != peer || to != me {
                    return format!(
                        "a daemon named {from} dialled {to}; this is {me}, expecting {peer}"
                    );
                }
                hello = true;
                info!(peer, "the peer's daemon is up");
                let _ = events.send(PeerEvent::Up);
            }
            _ if !hello => return "the peer's daemon did not say hello".into(),
            PeerMsg::View { vm, view } => {
                let _ = events.send(PeerEvent::View { vm, view });
            }
            PeerMsg::Beat => {}
        }
    }
}

/// What this daemon tells its peer: the latest view of each VM, sent on a connection it keeps
/// dialled (all views again after each reconnection), with heartbeats.
#[derive(Clone)]
pub struct Outbox {
    state: Arc<(Mutex<OutboxState>, Condvar)>,
}

#[derive(Default)]
struct OutboxState {
    views: BTreeMap<String, PeerView>,
    /// VMs whose view changed since it was last sent.
    changed: Vec<String>,
}

impl Outbox {
    /// Starts dialling `addr` (the peer `peer`'s control address) as node `me`.
    pub fn start(me: &str, peer: &str, addr: SocketAddr) -> Self {
        let outbox = Self {
            state: Arc::new((Mutex::new(OutboxState::default()), Condvar::new())),
        };
        let (me, peer, o) = (me.to_string(), peer.to_string(), outbox.clone());
        std::thread::Builder::new()
            .name("peer-dial".into())
            .spawn(move || loop {
                match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                    Ok(stream) => {
                        let why = o.speak(stream, &me, &peer);
                        warn!(peer, "link to the peer's daemon lost: {why}");
                    }
                    Err(_) => std::thread::sleep(BEAT),
                }
            })
            // Without a dialler the peer never hears this node: the daemon is useless.
            .unwrap_or_else(|e| panic!("cannot start the peer link thread: {e}"));
        outbox
    }

    /// This node's view of `vm` is now `view`.
    pub fn publish(&self, vm: &str, view: PeerView) {
        let (state, changed) = &*self.state;
        let mut st = lock(state);
        st.views.insert(vm.to_string(), view);
        if !st.changed.iter().any(|v| v == vm) {
            st.changed.push(vm.to_string());
        }
        changed.notify_all();
    }

    /// Talks on one dialled connection until it fails.
    fn speak(&self, stream: TcpStream, me: &str, peer: &str) -> String {
        let _ = stream.set_nodelay(true);
        let _ = stream.set_write_timeout(Some(PEER_TIMEOUT));
        let mut out = std::io::BufWriter::new(stream);
        let mut send = |msg: &PeerMsg| -> std::io::Result<()> {
            let line = serde_json::to_string(msg).map_err(std::io::Error::other)?;
            writeln!(out, "{line}")?;
            out.flush()
        };
        let hello = PeerMsg::Hello {
            version: PEER_PROTOCOL,
            from: me.to_string(),
            to: peer.to_string(),
        };
        if let Err(e) = send(&hello) {
            return e.to_string();
        }
        // Everything again: the peer may have restarted and know nothing.
        let (state, changed) = &*self.state;
        {
            let mut st = lock(state);
            st.changed = st.views.keys().cloned().collect();
        }
        let mut last_beat = Instant::now();
        loop {
            let pending: Vec<(String, PeerView)> = {
                let mut st = lock(state);
                if st.changed.is_empty() {
                    st = changed
                        .wait_timeout(st, BEAT)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                let names = std::mem::take(&mut st.changed);
                names
                    .into_iter()
                    .filter_map(|vm| st.views.get(&vm).map(|v| (vm, v.clone())))
                    .collect()
            };
            for (vm, view) in pending {
                if let Err(e) = send(&PeerMsg::View { vm, view }) {
                    return e.to_string();
                }
            }
            if last_beat.elapsed() >= BEAT {
                last_beat = Instant::now();
                if let Err(e) = send(&PeerMsg::Beat) {
                    return e.to_string();
                }
            }
        }
    }
}
