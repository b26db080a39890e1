//! An accept loop on a thread of its own that stops when dropped: what the control socket and
//! the metrics endpoint both serve with.

use std::io;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::warn;

/// A listening socket of either kind.
pub(crate) trait Listener: Send + 'static {
    type Stream: Send + 'static;
    fn accept_one(&self) -> io::Result<Self::Stream>;
}

impl Listener for UnixListener {
    type Stream = std::os::unix::net::UnixStream;
    fn accept_one(&self) -> io::Result<Self::Stream> {
        self.accept().map(|(stream, _)| stream)
    }
}

impl Listener for TcpListener {
    type Stream = std::net::TcpStream;
    fn accept_one(&self) -> io::Result<Self::Stream> {
        self.accept().map(|(stream, _)| stream)
    }
}

/// Accepts connections and hands each to a function until dropped.
pub(crate) struct AcceptLoop {
    stop: Arc<AtomicBool>,
    /// Connects to the listener, so that a blocked accept returns and sees the stop flag.
    wake: Box<dyn Fn() -> bool + Send>,
    thread: Option<JoinHandle<()>>,
}

impl AcceptLoop {
    /// Runs `listener`'s accept loop on a thread, calling `on_connection` for each connection;
    /// `what` names the service in logs and `wake` connects to it.
    pub(crate) fn spawn<L: Listener>(
        what: &'static str,
        listener: L,
        wake: impl Fn() -> bool + Send + 'static,
        on_connection: impl Fn(L::Stream) + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::spawn(move || loop {
            let conn = listener.accept_one();
            if stopped.load(Ordering::SeqCst) {
                break;
            }
            match conn {
                Ok(stream) => on_connection(stream),
                Err(e) => {
                    // Out of file descriptors, most likely: give the others time to close.
                    warn!("{what}: accept: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        });
        AcceptLoop {
            stop,
            wake: Box::new(wake),
            thread: Some(thread),
        }
    }
}

impl Drop for AcceptLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Without the waking connection the thread stays blocked in accept: it is only
        // waited for when the connection was made.
        if (self.wake)() {
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }
}
