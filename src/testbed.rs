//! Test hosts in network namespaces that a test or benchmark creates and always removes: a
//! "host" namespace with a bridge (where ftvmm runs and puts its tap) and a "client" namespace
//! wired to the bridge by a veth pair. Addresses are from TEST-NET-1 (192.0.2.0/24).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;

pub const BRIDGE: &str = "ftbr0";
pub const CLIENT_IP: &str = "192.0.2.1";
pub const GUEST_IP: &str = "192.0.2.2";

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
        let (veth_c, veth_b) = (format!("ftvc{id}"), format!("ftvb{id}"));
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
