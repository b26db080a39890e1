//! The Prometheus endpoint: `GET /metrics` over plain HTTP/1.1 on a std TcpListener, which
//! is all a scraper needs (one request per connection, then close).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use tracing::debug;

use crate::accept::AcceptLoop;

/// How long a scraper may take to send its request and read the answer. Connections are
/// answered one at a time, so this bounds how long one stuck client delays the next.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// The most of a request's head that is read; a scraper's is a few hundred bytes.
const MAX_REQUEST_HEAD: u64 = 8 << 10;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot serve metrics at {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
}

/// The endpoint being served; dropping it stops serving.
pub struct MetricsServer {
    addr: SocketAddr,
    _accept: AcceptLoop,
}

impl MetricsServer {
    /// The address it listens at (the port the system picked, when asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Serves `render()` as `GET /metrics` at `addr` on a thread; any other request gets 404.
pub fn serve(
    addr: SocketAddr,
    render: impl Fn() -> String + Send + Sync + 'static,
) -> Result<MetricsServer, MetricsError> {
    let bind_error = |source| MetricsError::Bind { addr, source };
    let listener = TcpListener::bind(addr).map_err(bind_error)?;
    let addr = listener.local_addr().map_err(bind_error)?;
    let accept = AcceptLoop::spawn(
        "metrics",
        listener,
        move || TcpStream::connect(addr).is_ok(),
        move |stream| {
            if let Err(e) = answer(&stream, &render) {
                debug!("metrics: a client: {e}");
            }
        },
    );
    Ok(MetricsServer {
        addr,
        _accept: accept,
    })
}

fn answer(stream: &TcpStream, render: &dyn Fn() -> String) -> io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut reader = BufReader::new(stream.take(MAX_REQUEST_HEAD));
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // The rest of the head is read too: closing a socket with unread data resets the
    // connection, and the client could lose the response.
    let mut header = String::new();
    while reader.read_line(&mut header)? > 0 && header.trim_end() != "" {
        header.clear();
    }
    let mut words = request_line.split_whitespace();
    let target = match (words.next(), words.next()) {
        (Some("GET"), Some(target)) => target.split('?').next(),
        _ => None,
    };
    let (status, content_type, body) = if target == Some("/metrics") {
        ("200 OK", "text/plain; version=0.0.4", render())
    } else {
        ("404 Not Found", "text/plain", "not found\n".to_string())
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    let mut out = stream;
    out.write_all(head.as_bytes())?;
    out.write_all(body.as_bytes())?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: SocketAddr, target: &str) -> String {
        let mut stream = TcpStream::connect(addr).unwrap();
        let request = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n");
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    }

    #[test]
    fn serves_metrics_and_nothing_else() {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        let server = serve(loopback, || "ftvmm_up 1\n".to_string()).unwrap();
        let response = get(server.addr(), "/metrics");
        let (head, body) = response.split_once("\r\n\r\n").expect("head and body");
        let mut lines = head.lines();
        assert_eq!(lines.next(), Some("HTTP/1.1 200 OK"));
        let headers: Vec<&str> = lines.collect();
        assert!(
            headers.contains(&"Content-Type: text/plain; version=0.0.4"),
            "{head}"
        );
        assert!(headers.contains(&"Content-Length: 11"), "{head}");
        assert!(headers.contains(&"Connection: close"), "{head}");
        assert_eq!(body, "ftvmm_up 1\n");
        assert!(get(server.addr(), "/metrics?x=1").ends_with("\r\n\r\nftvmm_up 1\n"));

        let response = get(server.addr(), "/");
        assert!(
            response.starts_with("HTTP/1.1 404 Not Found\r\n"),
            "{response}"
        );
        let mut stream = TcpStream::connect(server.addr()).unwrap();
        stream.write_all(b"POST /metrics HTTP/1.1\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(
            response.starts_with("HTTP/1.1 404 Not Found\r\n"),
            "{response}"
        );
    }

    #[test]
    fn a_bind_error_names_the_address() {
        let first = serve(SocketAddr::from(([127, 0, 0, 1], 0)), String::new).unwrap();
        let addr = first.addr();
        let e = serve(addr, String::new).err().expect("the port is taken");
        assert!(
            e.to_string()
                .starts_with(&format!("cannot serve metrics at {addr}: ")),
            "{e}"
        );
    }
}
