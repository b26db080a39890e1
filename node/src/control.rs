//! The node daemon's control socket: a Unix socket only root may use (mode 0600), where
//! `ftvmm status` and the operator's commands talk to the daemon. Per connection, one request
//! and one response, each a line of JSON.

use std::fs::{self, DirBuilder, Permissions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::accept::AcceptLoop;
use crate::config::NodeConfig;
use crate::status::NodeStatus;

/// How long the daemon waits for a client's request and for it to take the response, so that
/// a stuck client holds nothing for long.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest request line read; requests are a few dozen bytes.
const MAX_REQUEST: u64 = 64 << 10;

/// What a client asks the daemon.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    /// Planned failback: move the VM to the other node at an epoch boundary.
    Swap {
        vm: String,
    },
    /// Inject a fault into the VM's replication, for drills.
    Drill {
        vm: String,
        fault: String,
    },
    /// Give up this node's diverged state of the VM, so that it resyncs from the peer.
    Discard {
        vm: String,
    },
}

/// What the daemon answers.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    Status(NodeStatus),
    Done {
        message: String,
    },
    Refused {
        reason: String,
    },
    /// A command's findings; a JSON object (the response's own fields sit beside its keys).
    Report(serde_json::Value),
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot create the control socket's directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("another node is listening at {path}")]
    InUse { path: PathBuf },
    #[error("{path} exists and is not a socket")]
    NotASocket { path: PathBuf },
    #[error("cannot listen at {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("no node is listening at {path}: {source}; is `ftvmm node{}` running?",
        node.as_ref().map(|n| format!(" --name {n}")).unwrap_or_default())]
    NotListening {
        path: PathBuf,
        /// The node expected there, when the caller knows it.
        node: Option<String>,
        source: io::Error,
    },
    #[error("cannot connect to the node at {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("cannot talk to the node at {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("the node at {path} did not answer within {} ms", timeout.as_millis())]
    Timeout { path: PathBuf, timeout: Duration },
    #[error("bad response from the node at {path}: {problem}")]
    BadResponse { path: PathBuf, problem: String },
    #[error("node {node} refused: {reason}")]
    Refused { node: String, reason: String },
}

/// A bound control socket, not yet served.
pub struct ControlServer {
    socket: SocketFile,
    listener: UnixListener,
}

/// The socket's file, removed on drop: a daemon that stops leaves no socket behind.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

impl ControlServer {
    /// Listens at `path`: creates its directory (mode 0700) if missing, replaces a stale
    /// socket that nothing answers on (a daemon that was killed), and refuses one that
    /// another daemon serves. The socket's mode is 0600.
    pub fn bind(path: &Path) -> Result<Self, ControlError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| ControlError::CreateDir {
                    path: dir.to_path_buf(),
                    source,
                })?;
        }
        remove_stale(path)?;
        let bind_error = |source| ControlError::Bind {
            path: path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(bind_error)?;
        let socket = SocketFile(path.to_path_buf());
        fs::set_permissions(path, Permissions::from_mode(0o600)).map_err(bind_error)?;
        Ok(ControlServer { socket, listener })
    }

    pub fn path(&self) -> &Path {
        &self.socket.0
    }

    /// Answers requests with `handler` on a thread until the returned handle is dropped;
    /// each connection has a thread of its own, so that a slow command or a stuck client
    /// does not hold up the others.
    pub fn serve(
        self,
        handler: impl Fn(Request) -> Response + Send + Sync + 'static,
    ) -> ControlHandle {
        let handler = Arc::new(handler);
        let path = self.socket.0.clone();
        let accept = AcceptLoop::spawn(
            "control socket",
            self.listener,
            move || UnixStream::connect(&path).is_ok(),
            move |stream| {
                let handler = Arc::clone(&handler);
                let spawned = std::thread::Builder::new()
                    .name("control".into())
                    .spawn(move || answer(&stream, &*handler));
                if let Err(e) = spawned {
                    warn!("control socket: cannot start a thread for a client: {e}");
                }
            },
        );
        ControlHandle {
            _accept: accept,
            socket: self.socket,
        }
    }
}

/// A control socket being served; dropping it stops serving and removes the socket file.
pub struct ControlHandle {
    // Dropped first: stopping the accept loop connects to the socket, so the file must
    // still be there.
    _accept: AcceptLoop,
    socket: SocketFile,
}

impl ControlHandle {
    pub fn path(&self) -> &Path {
        &self.socket.0
    }
}

/// Removes a socket file at `path` that no one answers on.
fn remove_stale(path: &Path) -> Result<(), ControlError> {
    let bind_error = |source| ControlError::Bind {
        path: path.to_path_buf(),
        source,
    };
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(bind_error(e)),
        Ok(meta) if !meta.file_type().is_socket() => Err(ControlError::NotASocket {
            path: path.to_path_buf(),
        }),
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => Err(ControlError::InUse {
                path: path.to_path_buf(),
            }),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                fs::remove_file(path).map_err(bind_error)
            }
            Err(e) => Err(bind_error(e)),
        },
    }
}

/// Reads one request from `stream` and writes the handler's response; a request that does
/// not parse is refused with the parse error.
fn answer(stream: &UnixStream, handler: &dyn Fn(Request) -> Response) {
    let timeouts = stream
        .set_read_timeout(Some(CLIENT_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(CLIENT_TIMEOUT)));
    if let Err(e) = timeouts {
        warn!("control socket: cannot set a client's timeouts: {e}");
        return;
    }
    let mut line = Vec::new();
    let mut reader = BufReader::new(stream.take(MAX_REQUEST));
    match reader.read_until(b'\n', &mut line) {
        Ok(0) => return,
        Ok(_) => {}
        Err(e) => {
            debug!("control socket: no request from a client: {e}");
            return;
        }
    }
    let response = match serde_json::from_slice::<Request>(&line) {
        Ok(request) => handler(request),
        Err(e) => Response::Refused {
            reason: format!("bad request: {e}"),
        },
    };
    let encoded = serde_json::to_string(&response).or_else(|e| {
        serde_json::to_string(&Response::Refused {
            reason: format!("cannot encode the response: {e}"),
        })
    });
    match encoded {
        Ok(mut text) => {
            text.push('\n');
            if let Err(e) = (&*stream).write_all(text.as_bytes()) {
                debug!("control socket: a client did not take its response: {e}");
            }
        }
        Err(e) => warn!("control socket: cannot encode a response: {e}"),
    }
}

/// Sends `req` to the daemon listening at `path` and returns its response, waiting at most
/// `timeout` for each read and write.
pub fn request(path: &Path, req: &Request, timeout: Duration) -> Result<Response, ControlError> {
    let stream = UnixStream::connect(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => ControlError::NotListening {
            path: path.to_path_buf(),
            node: None,
            source,
        },
        _ => ControlError::Connect {
            path: path.to_path_buf(),
            source,
        },
    })?;
    let io_error = |source: io::Error| match source.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ControlError::Timeout {
            path: path.to_path_buf(),
            timeout,
        },
        _ => ControlError::Io {
            path: path.to_path_buf(),
            source,
        },
    };
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(io_error)?;
    let mut line = serde_json::to_vec(req).map_err(|e| io_error(e.into()))?;
    line.push(b'\n');
    (&stream).write_all(&line).map_err(io_error)?;
    let mut answer = Vec::new();
    BufReader::new(&stream)
        .read_until(b'\n', &mut answer)
        .map_err(io_error)?;
    if answer.is_empty() {
        return Err(ControlError::BadResponse {
            path: path.to_path_buf(),
            problem: "the connection closed without an answer".into(),
        });
    }
    serde_json::from_slice(&answer).map_err(|e| ControlError::BadResponse {
        path: path.to_path_buf(),
        problem: e.to_string(),
    })
}

/// Asks the daemon of `node` for its status (what `ftvmm status` shows).
pub fn query_status(node: &NodeConfig, timeout: Duration) -> Result<NodeStatus, ControlError> {
    match request(&node.socket, &Request::Status, timeout) {
        Ok(Response::Status(status)) => Ok(status),
        Ok(Response::Refused { reason }) => Err(ControlError::Refused {
            node: node.name.clone(),
            reason,
        }),
        Ok(other) => Err(ControlError::BadResponse {
            path: node.socket.clone(),
            problem: format!("{other:?} is no answer to status"),
        }),
        Err(ControlError::NotListening { path, source, .. }) => Err(ControlError::NotListening {
            path,
            node: Some(node.name.clone()),
            source,
        }),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::status::PeerStatus;
    use crate::testutil::TempDir;

    const TIMEOUT: Duration = Duration::from_secs(5);

    fn status() -> NodeStatus {
        NodeStatus {
            node: "a".into(),
            pid: None,
            peer: PeerStatus {
                name: "b".into(),
                connected: false,
                last_heard_ms: None,
            },
            vms: vec![],
        }
    }

    /// Answers status with [`status`], swap with done, and refuses the rest.
    fn handler(req: Request) -> Response {
        match req {
            Request::Status => Response::Status(status()),
            Request::Swap { vm } => Response::Done {
                message: format!("{vm} swapped"),
            },
            other => Response::Refused {
                reason: format!("{other:?} is not for tests"),
            },
        }
    }

    fn node_config(socket: PathBuf) -> NodeConfig {
        NodeConfig {
            name: "a".into(),
            control: "127.0.0.1:1".parse().unwrap(),
            replication: "127.0.0.1".parse().unwrap(),
            socket,
            state_dir: PathBuf::from("/nonexistent"),
            metrics: None,
        }
    }

    #[test]
    fn requests_round_trip_over_the_socket() {
        let dir = TempDir::new("control");
        let path = dir.path().join("run/ftvmm/a.sock");
        let server = ControlServer::bind(&path).unwrap();
        assert_eq!(server.path(), path);
        let handle = server.serve(handler);
        let response = request(&path, &Request::Status, TIMEOUT).unwrap();
        assert_eq!(response, Response::Status(status()));
        let swap = Request::Swap { vm: "web".into() };
        let response = request(&path, &swap, TIMEOUT).unwrap();
        assert_eq!(
            response,
            Response::Done {
                message: "web swapped".into()
            }
        );
        assert_eq!(
            query_status(&node_config(path.clone()), TIMEOUT).unwrap(),
            status()
        );
        drop(handle);
        assert!(!path.exists(), "the socket file goes with the server");
    }

    #[test]
    fn only_root_may_use_the_socket() {
        let dir = TempDir::new("control");
        let parent = dir.path().join("new");
        let path = parent.join("a.sock");
        let server = ControlServer::bind(&path).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&parent), 0o700);
        drop(server);
        assert!(!path.exists());
    }

    #[test]
    fn a_live_socket_is_not_taken_over() {
        let dir = TempDir::new("control");
        let path = dir.path().join("a.sock");
        let _handle = ControlServer::bind(&path).unwrap().serve(handler);
        let e = ControlServer::bind(&path)
            .err()
            .expect("the socket is in use");
        assert_eq!(
            e.to_string(),
            format!("another node is listening at {}", path.display())
        );
        assert!(
            request(&path, &Request::Status, TIMEOUT).is_ok(),
            "still served"
        );
    }

    #[test]
    fn a_stale_socket_is_replaced_and_other_files_are_not() {
        let dir = TempDir::new("control");
        let path = dir.path().join("a.sock");
        // A socket file nothing listens on any more: a killed daemon's.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let _handle = ControlServer::bind(&path).unwrap().serve(handler);
        assert!(request(&path, &Request::Status, TIMEOUT).is_ok());

        let file = dir.write("not-a-socket", "data");
        let e = ControlServer::bind(&file).err().expect("not a socket");
        assert_eq!(
            e.to_string(),
            format!("{} exists and is not a socket", file.display())
        );
        assert_eq!(fs::read_to_string(&file).unwrap(), "data");
    }

    #[test]
    fn a_malformed_request_is_refused_with_the_parse_error() {
        let dir = TempDir::new("control");
        let path = dir.path().join("a.sock");
        let _handle = ControlServer::bind(&path).unwrap().serve(handler);
        for bad in [
            "{\"cmd\":\"reboot\"}\n",
            "{\"cmd\":\"swap\"}\n",
            "not json\n",
            "\u{ff}\n",
        ] {
            let mut stream = UnixStream::connect(&path).unwrap();
            stream.write_all(bad.as_bytes()).unwrap();
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line).unwrap();
            let response: Response = serde_json::from_str(&line).unwrap();
            match response {
                Response::Refused { reason } => {
                    assert!(reason.starts_with("bad request: "), "{bad}: {reason}")
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
        let mut stream = UnixStream::connect(&path).unwrap();
        stream.write_all(b"{\"cmd\":\"reboot\"}\n").unwrap();
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).unwrap();
        assert!(line.contains("unknown variant `reboot`"), "{line}");
    }

    #[test]
    fn a_stuck_client_does_not_hold_up_another() {
        let dir = TempDir::new("control");
        let path = dir.path().join("a.sock");
        let _handle = ControlServer::bind(&path).unwrap().serve(handler);
        let _stuck = UnixStream::connect(&path).unwrap();
        let start = Instant::now();
        assert!(request(&path, &Request::Status, TIMEOUT).is_ok());
        assert_quick(start);
    }

    #[test]
    fn the_client_gives_up_on_a_silent_server() {
        let dir = TempDir::new("control");
        let path = dir.path().join("a.sock");
        // Connections queue in the backlog and are never answered.
        let _listener = UnixListener::bind(&path).unwrap();
        let start = Instant::now();
        let timeout = Duration::from_millis(200);
        let e = request(&path, &Request::Status, timeout).expect_err("no answer");
        assert!(matches!(e, ControlError::Timeout { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            format!(
                "the node at {} did not answer within 200 ms",
                path.display()
            )
        );
        assert_quick(start);
    }

    /// Asserts that what began at `start` took well under the server's client timeout.
    fn assert_quick(start: Instant) {
        let took = start.elapsed();
        assert!(took < Duration::from_secs(2), "took {took:?}");
    }

    #[test]
    fn no_node_listening() {
        let dir = TempDir::new("control");
        let path = dir.path().join("a.sock");
        let e = request(&path, &Request::Status, TIMEOUT).expect_err("nothing there");
        assert_eq!(
            e.to_string(),
            format!(
                "no node is listening at {}: No such file or directory (os error 2); is \
                 `ftvmm node` running?",
                path.display()
            )
        );
        drop(UnixListener::bind(&path).unwrap());
        let e = query_status(&node_config(path.clone()), TIMEOUT).expect_err("stale socket");
        assert_eq!(
            e.to_string(),
            format!(
                "no node is listening at {}: Connection refused (os error 111); is `ftvmm \
                 node --name a` running?",
                path.display()
            )
        );
    }

    #[test]
    fn the_wire_format() {
        let swap = serde_json::to_string(&Request::Swap { vm: "web".into() }).unwrap();
        assert_eq!(swap, r#"{"cmd":"swap","vm":"web"}"#);
        let drill = Request::Drill {
            vm: "web".into(),
            fault: "kill-primary".into(),
        };
        assert_eq!(
            serde_json::to_string(&drill).unwrap(),
            r#"{"cmd":"drill","vm":"web","fault":"kill-primary"}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"cmd":"status"}"#
        );
        let refused = Response::Refused {
            reason: "no".into(),
        };
        assert_eq!(
            serde_json::to_string(&refused).unwrap(),
            r#"{"result":"refused","reason":"no"}"#
        );
        let report = Response::Report(serde_json::json!({"epochs": 3}));
        let text = serde_json::to_string(&report).unwrap();
        assert_eq!(text, r#"{"result":"report","epochs":3}"#);
        assert_eq!(serde_json::from_str::<Response>(&text).unwrap(), report);
        let status = serde_json::to_value(Response::Status(status())).unwrap();
        assert_eq!(status["result"], "status");
        assert_eq!(status["node"], "a");
    }
}
