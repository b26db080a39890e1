//! A pair of node daemons for end-to-end tests: a config written into a scratch directory
//! (sockets and state there too), the daemons started (in network namespaces, or on loopback)
//! and killed by pid, their status read through the control socket, and waits driven by what
//! status says.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use node::config::{self, Config};
use node::control;
use node::status::{NodeStatus, Role, VmStatus};

use super::{Node, Scratch};

/// Where each node's daemon runs.
pub enum Hosts {
    /// Both on this host's loopback.
    Loopback,
    /// In these network namespaces (a, b), at these addresses.
    Namespaces {
        a: String,
        b: String,
        a_ip: String,
        b_ip: String,
    },
}

/// The two daemons of one config.
pub struct Pair {
    pub dir: Scratch,
    pub config_path: PathBuf,
    pub config: Config,
    hosts: Hosts,
    daemons: [Option<Node>; 2],
    /// Everything each daemon wrote to stderr, over all its runs.
    logs: [String; 2],
}

pub const NODES: [&str; 2] = ["a", "b"];

fn index(node: &str) -> usize {
    NODES
        .iter()
        .position(|n| *n == node)
        .unwrap_or_else(|| panic!("no node {node}"))
}

impl Pair {
    /// Writes a config of nodes a and b (their sections made here) followed by `rest` (the
    /// `[policy]` and `[[vm]]` tables; `{dir}` in it stands for the scratch directory).
    pub fn new(tag: &str, hosts: Hosts, rest: &str) -> Self {
        let dir = Scratch::new(tag);
        let (a_ip, b_ip) = match &hosts {
            Hosts::Loopback => ("127.0.0.1".to_string(), "127.0.0.1".to_string()),
            Hosts::Namespaces { a_ip, b_ip, .. } => (a_ip.clone(), b_ip.clone()),
        };
        let (pa, pb) = (super::free_port(), super::free_port());
        let d = dir.0.display().to_string();
        let text = format!(
            "[nodes.a]\ncontrol = \"{a_ip}:{pa}\"\nreplication = \"{a_ip}\"\n\
             socket = \"{d}/a.sock\"\nstate_dir = \"{d}/a\"\n\n\
             [nodes.b]\ncontrol = \"{b_ip}:{pb}\"\nreplication = \"{b_ip}\"\n\
             socket = \"{d}/b.sock\"\nstate_dir = \"{d}/b\"\n\n{}",
            rest.replace("{dir}", &d)
        );
        let config_path = dir.path("pair.toml");
        std::fs::write(&config_path, text).expect("write the pair's config");
        let config = config::load(&config_path).unwrap_or_else(|e| panic!("{e}"));
        Self {
            dir,
            config_path,
            config,
            hosts,
            daemons: [None, None],
            logs: [String::new(), String::new()],
        }
    }

    /// Starts node `node`'s daemon.
    pub fn start(&mut self, node: &str) {
        let i = index(node);
        assert!(self.daemons[i].is_none(), "node {node} runs already");
        let args = [
            "node".to_string(),
            "--config".into(),
            self.config_path.display().to_string(),
            "--name".into(),
            node.into(),
        ];
        let daemon = match &self.hosts {
            Hosts::Loopback => Node::spawn_env(&args, &[("FTVMM_LOG", "info")]),
            Hosts::Namespaces { a, b, .. } => {
                let ns = if i == 0 { a } else { b };
                Node::spawn_in_env(ns, &args, &[("FTVMM_LOG", "info")])
            }
        };
        self.daemons[i] = Some(daemon);
    }

    /// Kills node `node`'s daemon with SIGKILL (its VM processes die with it): a dead host.
    pub fn kill(&mut self, node: &str) {
        let i = index(node);
        let mut daemon = self.daemons[i]
            .take()
            .unwrap_or_else(|| panic!("node {node} is not running"));
        let _ = daemon.child.0.kill();
        let (_, log) = daemon.wait(Duration::from_secs(10));
        self.logs[i].push_str(&log);
    }

    /// Everything node `node`'s daemon (and its VM processes) logged, over all its runs.
    pub fn log(&self, node: &str) -> String {
        let i = index(node);
        let mut log = self.logs[i].clone();
        if let Some(d) = &self.daemons[i] {
            log.push_str(&d.stderr());
        }
        log
    }

    /// Node `node`'s status, if its daemon answers.
    pub fn status(&self, node: &str) -> Option<NodeStatus> {
        let cfg = self.config.node(node).ok()?;
        control::query_status(cfg, Duration::from_secs(2)).ok()
    }

    /// VM `vm`'s status on node `node`, if its daemon answers.
    pub fn vm(&self, node: &str, vm: &str) -> Option<VmStatus> {
        self.status(node)?.vms.into_iter().find(|v| v.name == vm)
    }

    /// Waits at most `limit` until `cond` holds of VM `vm` on node `node`; panics with both
    /// nodes' status and logs if it does not.
    pub fn wait_vm(
        &self,
        node: &str,
        vm: &str,
        limit: Duration,
        what: &str,
        cond: impl Fn(&VmStatus) -> bool,
    ) -> VmStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.vm(node, vm).filter(|s| cond(s)) {
                return status;
            }
            if start.elapsed() > limit {
                panic!(
                    "{vm} on {node}: not {what} within {limit:?}\nstatus a: {:?}\nstatus b: {:?}\n\
                     log a:\n{}\nlog b:\n{}",
                    self.vm("a", vm),
                    self.vm("b", vm),
                    self.log("a"),
                    self.log("b")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `vm` runs protected on `primary` with the other node its standby.
    pub fn wait_protected(&self, vm: &str, primary: &str, limit: Duration) {
        let standby = NODES
            .iter()
            .find(|n| **n != primary)
            .copied()
            .unwrap_or("b");
        self.wait_vm(primary, vm, limit, "a protected primary", |s| {
            s.role == Role::Primary && s.protected
        });
        self.wait_vm(standby, vm, limit, "the standby", |s| {
            s.role == Role::Standby
        });
    }

    /// The path of a file in the scratch directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path(name)
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        // Killed by pid; their VM processes die with them (PR_SET_PDEATHSIG).
        for daemon in self.daemons.iter_mut().flatten() {
            let _ = daemon.child.0.kill();
            let _ = daemon.child.0.wait();
        }
        // A daemon started by someone else (a kill-node drill starts the node again) says
        // its pid in its status.
        for node in NODES {
            if let Some(pid) = self.status(node).and_then(|s| s.pid) {
                if let Ok(pid) = libc::pid_t::try_from(pid) {
                    // SAFETY: kill(2) has no memory effects; the pid is a daemon of this pair.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }
}
