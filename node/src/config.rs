//! The node daemon's configuration: the pair's two nodes and the VMs they protect, in one TOML
//! file that both nodes share (`examples/local-pair.toml`).
//!
//! The file is parsed into TOML tables and then read key by key, each key taken out of its
//! table as it is read, so that whatever is left over is an unknown key. Every error is one
//! line that names the file and the key by its full path (`vm "web": nodes.b.disk`).

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use checkpoint::policy::EpochBounds;
use toml::{Table, Value};
use vmm::devices::virtio::net::parse_mac;
use vmm::memory::{check_mem_size, parse_size};

/// Guest RAM of a VM that gives no `mem` (as `ftvmm run --mem`).
const DEFAULT_MEM: u64 = 256 << 20;
const VCPUS: RangeInclusive<u32> = 1..=32;
const EPOCH_MS: RangeInclusive<u64> = 1..=10_000;
const FAILOVER_TIMEOUT_MS: RangeInclusive<u64> = 20..=600_000;
/// As `ftvmm primary --ack-timeout-ms`; it must also be longer than the failover timeout.
const ACK_TIMEOUT_MS: RangeInclusive<u64> = 20..=3_600_000;
/// A resync's highest rate in MiB/s; 0 leaves it unlimited.
const RESYNC_MAX_MIB_S: RangeInclusive<u64> = 0..=1_000_000;
/// Node and VM names end up in file names, socket paths and metric labels: kept plain.
const NAME_LEN: RangeInclusive<usize> = 1..=32;
/// The longest Linux interface name (IFNAMSIZ less its NUL).
const IFNAME_MAX: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {source}")]
    Read { file: PathBuf, source: io::Error },
    #[error("{file}: {}{message}", at_line(*.line))]
    Syntax {
        file: PathBuf,
        line: Option<usize>,
        message: String,
    },
    #[error("{file}: {scope}unknown key {key}")]
    UnknownKey {
        file: PathBuf,
        scope: Scope,
        key: String,
    },
    #[error("{file}: {scope}missing key {key}")]
    MissingKey {
        file: PathBuf,
        scope: Scope,
        key: String,
    },
    /// One key's value is of the wrong type or out of its range.
    #[error("{file}: {scope}{key}: {problem}")]
    BadValue {
        file: PathBuf,
        scope: Scope,
        key: String,
        problem: String,
    },
    /// Keys that do not fit together, or a value naming something that is not there; the
    /// problem names the keys.
    #[error("{file}: {scope}{problem}")]
    Invalid {
        file: PathBuf,
        scope: Scope,
        problem: String,
    },
    /// A file this node needs cannot be opened.
    #[error("{file}: {scope}{key}: {}: {source}", path.display())]
    LocalFile {
        file: PathBuf,
        scope: Scope,
        key: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{file}: no node \"{name}\" (nodes: {known})")]
    UnknownNode {
        file: PathBuf,
        name: String,
        known: String,
    },
    #[error("{file}: no vm \"{name}\" (vms: {known})")]
    UnknownVm {
        file: PathBuf,
        name: String,
        known: String,
    },
}

fn at_line(line: Option<usize>) -> String {
    line.map(|l| format!("line {l}: ")).unwrap_or_default()
}

/// Where in the file a key is: at the top, or in one `[[vm]]`, named once its name is read
/// and numbered from 1 before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Top,
    Vm(String),
    VmNumber(usize),
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Top => Ok(()),
            Scope::Vm(name) => write!(f, "vm \"{name}\": "),
            Scope::VmNumber(n) => write!(f, "vm #{n}: "),
        }
    }
}

/// The whole file: both nodes and every VM.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file, as given to [`load`].
    pub path: PathBuf,
    /// Exactly two, in file order.
    pub nodes: Vec<NodeConfig>,
    pub vms: Vec<VmConfig>,
}

/// One node of the pair (`[nodes.NAME]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub name: String,
    /// This node's daemon-to-daemon TCP address.
    pub control: SocketAddr,
    /// The address its VMs' replication streams use (ports are picked per VM at run time).
    pub replication: IpAddr,
    /// The control socket of its daemon (default /run/ftvmm/NAME.sock).
    pub socket: PathBuf,
    /// Where it persists per-VM state (default /var/lib/ftvmm/NAME).
    pub state_dir: PathBuf,
    /// Where it serves Prometheus metrics, if anywhere: loopback unless `metrics_public`.
    pub metrics: Option<SocketAddr>,
}

/// One protected VM (`[[vm]]`).
#[derive(Debug, Clone, PartialEq)]
pub struct VmConfig {
    pub name: String,
    pub guest: GuestSpec,
    /// Guest RAM in bytes.
    pub mem: u64,
    pub vcpus: u32,
    /// The guest NIC's MAC, the same on both nodes; given exactly when the nodes give taps.
    pub mac: Option<[u8; 6]>,
    /// Each node's own resources for this VM (`[vm.nodes.NAME]`), for both nodes.
    pub on_node: BTreeMap<String, VmNodeConfig>,
    pub policy: Policy,
}

/// What a VM boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestSpec {
    /// `builtin:NAME`, or the path of a payload ELF (resolved against the file's directory).
    Payload { payload: String, args: Vec<String> },
    Kernel {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: Option<String>,
    },
}

/// What one node gives one VM: both nodes give a disk or neither, a tap or neither.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VmNodeConfig {
    /// A raw image; it must exist on that node (see [`Config::check_local`]).
    pub disk: Option<PathBuf>,
    pub tap: Option<String>,
    /// A bridge to enslave the tap to.
    pub bridge: Option<String>,
    /// A file for the console stream.
    pub console: Option<PathBuf>,
}

/// How a VM is replicated and which node should run it: `[policy]` for every VM, overridden
/// key by key by a VM's `[vm.policy]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Where epochs end: `epoch_ms` gives fixed epochs; `epoch_min_ms` and `epoch_max_ms`
    /// bound the adaptive policy (the default).
    pub epochs: EpochBounds,
    pub failover_timeout_ms: u64,
    /// Longer than `failover_timeout_ms`: a slow standby is not a dead one.
    pub ack_timeout_ms: u64,
    /// The node that runs the VM when both can.
    pub preferred: String,
    pub failback: Failback,
    /// How long the preferred node must be back and in sync before the VM moves back to it.
    pub failback_delay: Duration,
    /// The highest rate a resync sends at, in MiB/s (0: as fast as it can), to leave the
    /// link and the disks to the guest (DRBD's c-max-rate).
    pub resync_max_mib_s: u64,
    /// How long a daemon waits at its start for the peer before a node that ran the VM last
    /// runs it alone (DRBD's wait-for-connection timeout).
    pub peer_wait: Duration,
}

impl Policy {
    fn defaults(preferred: String) -> Self {
        Policy {
            epochs: EpochBounds::DEFAULT,
            failover_timeout_ms: 300,
            ack_timeout_ms: 3000,
            preferred,
            failback: Failback::Auto,
            failback_delay: Duration::from_secs(10),
            resync_max_mib_s: 0,
            peer_wait: Duration::from_secs(10),
        }
    }
}

/// Whether a VM moves back to its preferred node by itself once that node is back in sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failback {
    Auto,
    Manual,
}

impl Config {
    /// The node called `name`.
    pub fn node(&self, name: &str) -> Result<&NodeConfig, ConfigError> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| self.unknown_node(name))
    }

    /// The node that is not `name`.
    pub fn peer(&self, name: &str) -> Result<&NodeConfig, ConfigError> {
        self.node(name)?;
        // load() makes sure there are two nodes of different names.
        self.nodes
            .iter()
            .find(|n| n.name != name)
            .ok_or_else(|| self.unknown_node(name))
    }

    /// The VM called `name`.
    pub fn vm(&self, name: &str) -> Result<&VmConfig, ConfigError> {
        self.vms
            .iter()
            .find(|v| v.name == name)
            .ok_or_else(|| ConfigError::UnknownVm {
                file: self.path.clone(),
                name: name.to_string(),
                known: join_names(self.vms.iter().map(|v| v.name.as_str())),
            })
    }

    /// Checks that the files node `node` needs are there: each VM's payload file, kernel and
    /// initrd, and its disk on this node. The other node's files are not visible from here,
    /// so this is for the daemon to call at its start rather than part of [`load`].
    pub fn check_local(&self, node: &str) -> Result<(), ConfigError> {
        self.node(node)?;
        for vm in &self.vms {
            let cx = Context {
                file: &self.path,
                scope: Scope::Vm(vm.name.clone()),
            };
            match &vm.guest {
                GuestSpec::Payload { payload, .. } if !payload.starts_with(BUILTIN) => {
                    cx.check_file("payload", Path::new(payload))?;
                }
                GuestSpec::Payload { .. } => {}
                GuestSpec::Kernel { kernel, initrd, .. } => {
                    cx.check_file("kernel", kernel)?;
                    if let Some(initrd) = initrd {
                        cx.check_file("initrd", initrd)?;
                    }
                }
            }
            if let Some(disk) = vm.on_node.get(node).and_then(|n| n.disk.as_ref()) {
                cx.check_file(&format!("nodes.{node}.disk"), disk)?;
            }
        }
        Ok(())
    }

    fn unknown_node(&self, name: &str) -> ConfigError {
        ConfigError::UnknownNode {
            file: self.path.clone(),
            name: name.to_string(),
            known: node_names(&self.nodes),
        }
    }
}

/// The prefix of a builtin payload's name.
const BUILTIN: &str = "builtin:";

/// Reads and checks the config file at `path`; relative paths in it are relative to its
/// directory.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let read_error = |source| ConfigError::Read {
        file: path.to_path_buf(),
        source,
    };
    let text = std::fs::read_to_string(path).map_err(read_error)?;
    // Resolved once, so that relative paths mean the same wherever the daemon is started from.
    let absolute = std::path::absolute(path).map_err(read_error)?;
    let dir = absolute.parent().unwrap_or(Path::new("/"));
    let table: Table = toml::from_str(&text).map_err(|e| syntax_error(path, &text, &e))?;

    let cx = Context {
        file: path,
        scope: Scope::Top,
    };
    let mut top = TableReader::new(&cx, String::new(), table);
    let nodes = top.table("nodes")?;
    let policy = top.table("policy")?;
    let vms = top.take("vm");
    top.finish()?;

    let nodes = read_nodes(top.require("nodes", nodes)?, dir)?;
    let first = nodes.first().map(|n| n.name.clone()).unwrap_or_default();
    let mut defaults = Policy::defaults(first);
    if let Some(policy) = policy {
        defaults = read_policy(policy, defaults, &nodes)?;
    }
    let vms = read_vms(&cx, vms, &nodes, &defaults, dir)?;
    Ok(Config {
        path: path.to_path_buf(),
        nodes,
        vms,
    })
}

fn syntax_error(file: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let line = e.span().and_then(|span| {
        let before = text.as_bytes().get(..span.start)?;
        Some(before.iter().filter(|&&b| b == b'\n').count() + 1)
    });
    // One line, whatever the parser's message looks like.
    let message = e
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    ConfigError::Syntax {
        file: file.to_path_buf(),
        line,
        message,
    }
}

fn read_nodes(nodes: TableReader<'_>, dir: &Path) -> Result<Vec<NodeConfig>, ConfigError> {
    let cx = nodes.cx;
    if nodes.table.len() != 2 {
        let found = nodes.table.len();
        return Err(cx.bad(
            "nodes",
            format!("exactly two nodes are needed, found {found}"),
        ));
    }
    let nodes = nodes
        .sub_tables()?
        .into_iter()
        .map(|(name, table)| read_node(name, table, dir))
        .collect::<Result<Vec<_>, _>>()?;
    if let [a, b] = nodes.as_slice() {
        if a.control == b.control {
            return Err(cx.invalid(format!(
                "nodes.{}.control and nodes.{}.control are both {}",
                a.name, b.name, a.control
            )));
        }
    }
    Ok(nodes)
}

fn read_node(name: String, mut r: TableReader<'_>, dir: &Path) -> Result<NodeConfig, ConfigError> {
    check_name(&name).map_err(|problem| r.cx.bad(&format!("nodes.{name}"), problem))?;
    let control = r.parsed("control", parse_control)?;
    let replication = r.parsed("replication", parse_replication)?;
    let socket = r.path("socket", dir)?;
    let state_dir = r.path("state_dir", dir)?;
    let metrics = r.parsed("metrics", parse_socket_addr)?;
    let metrics_public = r.boolean("metrics_public")?.unwrap_or(false);
    r.finish()?;
    if let Some(addr) = metrics {
        if !metrics_public && !addr.ip().is_loopback() {
            return Err(r.bad(
                "metrics",
                format!(
                    "{addr} is not a loopback address (set {} = true to serve metrics to \
                     other hosts)",
                    r.key("metrics_public")
                ),
            ));
        }
    }
    Ok(NodeConfig {
        control: r.require("control", control)?,
        replication: r.require("replication", replication)?,
        socket: socket.unwrap_or_else(|| PathBuf::from(format!("/run/ftvmm/{name}.sock"))),
        state_dir: state_dir.unwrap_or_else(|| Path::new("/var/lib/ftvmm").join(&name)),
        metrics,
        name,
    })
}

fn read_vms(
    cx: &Context<'_>,
    vms: Option<Value>,
    nodes: &[NodeConfig],
    defaults: &Policy,
    dir: &Path,
) -> Result<Vec<VmConfig>, ConfigError> {
    let items = match vms {
        None => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(other) => return Err(cx.wrong_type("vm", "an array of tables ([[vm]])", &other)),
    };
    let mut vms: Vec<VmConfig> = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let number = i + 1;
        let Value::Table(table) = item else {
            return Err(cx.wrong_type(&format!("vm[{i}]"), "a table", &item));
        };
        let vm = read_vm(cx.file, number, table, nodes, defaults, dir)?;
        if let Some(first) = vms.iter().position(|other| other.name == vm.name) {
            let numbered = Context {
                file: cx.file,
                scope: Scope::VmNumber(number),
            };
            return Err(numbered.invalid(format!(
                "name \"{}\" is taken by vm #{}",
                vm.name,
                first + 1
            )));
        }
        vms.push(vm);
    }
    Ok(vms)
}

fn read_vm(
    file: &Path,
    number: usize,
    table: Table,
    nodes: &[NodeConfig],
    defaults: &Policy,
    dir: &Path,
) -> Result<VmConfig, ConfigError> {
    // The name first: every later error names the VM by it.
    let numbered = Context {
        file,
        scope: Scope::VmNumber(number),
    };
    let mut r = TableReader::new(&numbered, String::new(), table);
    let name = r.string("name")?;
    let name = r.require("name", name)?;
    check_name(&name).map_err(|problem| r.bad("name", format!("\"{name}\": {problem}")))?;
    let cx = Context {
        file,
        scope: Scope::Vm(name.clone()),
    };
    let mut r = TableReader::new(&cx, String::new(), r.table);

    let guest = GuestKeys::read(&mut r, dir)?;
    let mem = r.parsed("mem", parse_mem)?.unwrap_or(DEFAULT_MEM);
    let vcpus = r.integer("vcpus", VCPUS)?.unwrap_or(1);
    let mac = r.parsed("mac", parse_unicast_mac)?;
    let on_node = r.table("nodes")?;
    let policy = r.table("policy")?;
    r.finish()?;

    let guest = guest.spec(&cx)?;
    let on_node = read_vm_nodes(r.require("nodes", on_node)?, nodes, dir)?;
    both_or_neither(&cx, nodes, &on_node, "disk", |n| n.disk.is_some())?;
    let taps = both_or_neither(&cx, nodes, &on_node, "tap", |n| n.tap.is_some())?;
    match (taps, mac) {
        (true, None) => {
            return Err(cx.invalid(
                "the nodes give taps but mac is not given (both nodes' NICs share one MAC)",
            ))
        }
        (false, Some(_)) => return Err(cx.invalid("mac is given but no node gives a tap")),
        _ => {}
    }
    let policy = match policy {
        Some(policy) => read_policy(policy, defaults.clone(), nodes)?,
        None => defaults.clone(),
    };
    if policy.ack_timeout_ms <= policy.failover_timeout_ms {
        return Err(cx.invalid(format!(
            "policy.ack_timeout_ms ({}) must be longer than policy.failover_timeout_ms ({})",
            policy.ack_timeout_ms, policy.failover_timeout_ms
        )));
    }
    Ok(VmConfig {
        name,
        guest,
        mem,
        vcpus,
        mac,
        on_node,
        policy,
    })
}

/// The keys that say what a VM boots, as given; [`GuestKeys::spec`] checks that they fit.
struct GuestKeys {
    payload: Option<String>,
    args: Option<Vec<String>>,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    cmdline: Option<String>,
}

impl GuestKeys {
    fn read(r: &mut TableReader<'_>, dir: &Path) -> Result<Self, ConfigError> {
        let payload = match r.string("payload")? {
            Some(p) if p.starts_with(BUILTIN) => {
                if p.len() == BUILTIN.len() {
                    return Err(r.bad("payload", format!("\"{p}\" names no builtin payload")));
                }
                Some(p)
            }
            Some(p) => {
                let path = r.resolve("payload", &p, dir)?;
                let path = path.into_os_string().into_string().map_err(|path| {
                    r.bad(
                        "payload",
                        format!("{} is not UTF-8", Path::new(&path).display()),
                    )
                })?;
                Some(path)
            }
            None => None,
        };
        Ok(GuestKeys {
            payload,
            args: r.strings("args")?,
            kernel: r.path("kernel", dir)?,
            initrd: r.path("initrd", dir)?,
            cmdline: r.string("cmdline")?,
        })
    }

    fn spec(self, cx: &Context<'_>) -> Result<GuestSpec, ConfigError> {
        match (self.payload, self.kernel) {
            (Some(_), Some(_)) => {
                Err(cx.invalid("payload and kernel are both given (a VM boots one of them)"))
            }
            (None, None) => Err(cx.invalid("neither payload nor kernel is given")),
            (Some(payload), None) => {
                if self.initrd.is_some() || self.cmdline.is_some() {
                    let key = if self.initrd.is_some() {
                        "initrd"
                    } else {
                        "cmdline"
                    };
                    return Err(cx.invalid(format!("{key} goes with kernel, not payload")));
                }
                Ok(GuestSpec::Payload {
                    payload,
                    args: self.args.unwrap_or_default(),
                })
            }
            (None, Some(kernel)) => {
                if self.args.is_some() {
                    return Err(
                        cx.invalid("args go with payload, not kernel (a kernel takes cmdline)")
                    );
                }
                Ok(GuestSpec::Kernel {
                    kernel,
                    initrd: self.initrd,
                    cmdline: self.cmdline,
                })
            }
        }
    }
}

/// Reads `[vm.nodes.*]`: a table for each node and nothing else.
fn read_vm_nodes(
    mut r: TableReader<'_>,
    nodes: &[NodeConfig],
    dir: &Path,
) -> Result<BTreeMap<String, VmNodeConfig>, ConfigError> {
    let mut given = Vec::with_capacity(nodes.len());
    for node in nodes {
        given.push((node.name.as_str(), r.table(&node.name)?));
    }
    if let Some(other) = r.table.keys().next() {
        return Err(r.cx.invalid(format!(
            "{} is not a node (nodes: {})",
            r.key(other),
            node_names(nodes)
        )));
    }
    let mut on_node = BTreeMap::new();
    for (name, table) in given {
        let table = r.require(name, table)?;
        on_node.insert(name.to_string(), read_vm_node(table, dir)?);
    }
    Ok(on_node)
}

fn read_vm_node(mut r: TableReader<'_>, dir: &Path) -> Result<VmNodeConfig, ConfigError> {
    let disk = r.path("disk", dir)?;
    let tap = r.parsed("tap", parse_ifname)?;
    let bridge = r.parsed("bridge", parse_ifname)?;
    let console = r.path("console", dir)?;
    r.finish()?;
    if bridge.is_some() && tap.is_none() {
        return Err(r
            .cx
            .invalid(format!("{} needs {}", r.key("bridge"), r.key("tap"))));
    }
    Ok(VmNodeConfig {
        disk,
        tap,
        bridge,
        console,
    })
}

/// Whether every node gives the VM `key` (true) or none does (false); an error if only some do.
fn both_or_neither(
    cx: &Context<'_>,
    nodes: &[NodeConfig],
    on_node: &BTreeMap<String, VmNodeConfig>,
    key: &str,
    gives: impl Fn(&VmNodeConfig) -> bool,
) -> Result<bool, ConfigError> {
    let (with, without): (Vec<&NodeConfig>, Vec<&NodeConfig>) = nodes
        .iter()
        .partition(|n| on_node.get(&n.name).is_some_and(&gives));
    match (with.first(), without.first()) {
        (Some(with), Some(without)) => Err(cx.invalid(format!(
            "nodes.{}.{key} is given but nodes.{}.{key} is not (both nodes give a {key} or \
             neither)",
            with.name, without.name
        ))),
        _ => Ok(without.is_empty()),
    }
}

/// Reads a policy table: each key it gives overrides `base`.
fn read_policy(
    mut r: TableReader<'_>,
    base: Policy,
    nodes: &[NodeConfig],
) -> Result<Policy, ConfigError> {
    let epoch_ms = r.integer("epoch_ms", EPOCH_MS)?;
    let epoch_min_ms = r.integer("epoch_min_ms", EPOCH_MS)?;
    let epoch_max_ms = r.integer("epoch_max_ms", EPOCH_MS)?;
    let failover_timeout_ms = r.integer("failover_timeout_ms", FAILOVER_TIMEOUT_MS)?;
    let ack_timeout_ms = r.integer("ack_timeout_ms", ACK_TIMEOUT_MS)?;
    let preferred = r.string("preferred")?;
    let failback = r.parsed("failback", parse_failback)?;
    let failback_delay = r.duration("failback_delay")?;
    let resync_max_mib_s = r.integer("resync_max_mib_s", RESYNC_MAX_MIB_S)?;
    let peer_wait = r.duration("peer_wait")?;
    r.finish()?;
    if let Some(preferred) = &preferred {
        if !nodes.iter().any(|n| &n.name == preferred) {
            return Err(r.cx.invalid(format!(
                "{} \"{preferred}\" is not a node (nodes: {})",
                r.key("preferred"),
                node_names(nodes)
            )));
        }
    }
    let epochs = match (epoch_ms, epoch_min_ms, epoch_max_ms) {
        (Some(ms), None, None) => EpochBounds::fixed(ms),
        (Some(_), _, _) => {
            return Err(r.cx.invalid(format!(
                "{} gives fixed epochs: leave out {} and {}",
                r.key("epoch_ms"),
                r.key("epoch_min_ms"),
                r.key("epoch_max_ms")
            )))
        }
        (None, min, max) => {
            let bounds = EpochBounds {
                min_ms: min.unwrap_or(base.epochs.min_ms),
                max_ms: max.unwrap_or(base.epochs.max_ms),
            };
            if bounds.min_ms > bounds.max_ms {
                return Err(r.cx.invalid(format!(
                    "{} ({}) must not be longer than {} ({})",
                    r.key("epoch_min_ms"),
                    bounds.min_ms,
                    r.key("epoch_max_ms"),
                    bounds.max_ms
                )));
            }
            bounds
        }
    };
    Ok(Policy {
        epochs,
        failover_timeout_ms: failover_timeout_ms.unwrap_or(base.failover_timeout_ms),
        ack_timeout_ms: ack_timeout_ms.unwrap_or(base.ack_timeout_ms),
        preferred: preferred.unwrap_or(base.preferred),
        failback: failback.unwrap_or(base.failback),
        failback_delay: failback_delay.unwrap_or(base.failback_delay),
        resync_max_mib_s: resync_max_mib_s.unwrap_or(base.resync_max_mib_s),
        peer_wait: peer_wait.unwrap_or(base.peer_wait),
    })
}

fn node_names(nodes: &[NodeConfig]) -> String {
    join_names(nodes.iter().map(|n| n.name.as_str()))
}

fn join_names<'a>(names: impl Iterator<Item = &'a str>) -> String {
    names.collect::<Vec<_>>().join(", ")
}

/// Node and VM names: 1 to 32 of a-z, 0-9 and -.
fn check_name(name: &str) -> Result<(), String> {
    let plain = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if plain && NAME_LEN.contains(&name.len()) {
        Ok(())
    } else {
        Err(format!(
            "a name is {} to {} characters of a-z, 0-9 and -",
            NAME_LEN.start(),
            NAME_LEN.end()
        ))
    }
}

fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("\"{s}\" is not IP:PORT (a host name is not looked up)"))
}

fn parse_control(s: &str) -> Result<SocketAddr, String> {
    let addr = parse_socket_addr(s)?;
    if addr.ip().is_unspecified() || addr.port() == 0 {
        return Err(format!("\"{s}\" is not an address the peer can connect to"));
    }
    Ok(addr)
}

fn parse_replication(s: &str) -> Result<IpAddr, String> {
    match s.parse::<IpAddr>() {
        Ok(ip) if !ip.is_unspecified() => Ok(ip),
        Ok(_) => Err(format!("\"{s}\" is not an address the peer can connect to")),
        Err(_) => Err(format!("\"{s}\" is not an IP address")),
    }
}

fn parse_mem(s: &str) -> Result<u64, String> {
    let size = parse_size(s)?;
    check_mem_size(size).map_err(|e| format!("\"{s}\": {e}"))?;
    Ok(size)
}

fn parse_unicast_mac(s: &str) -> Result<[u8; 6], String> {
    let mac = parse_mac(s)?;
    // The group bit: a NIC's own address is never a multicast one.
    if mac[0] & 1 != 0 || mac == [0; 6] {
        return Err(format!("\"{s}\" is not a unicast MAC"));
    }
    Ok(mac)
}

/// An interface name Linux accepts (what `dev_valid_name` checks).
fn parse_ifname(s: &str) -> Result<String, String> {
    let fits = !s.is_empty() && s.len() <= IFNAME_MAX && s != "." && s != "..";
    if fits && !s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "\"{s}\" is not an interface name (1 to {IFNAME_MAX} characters, no '/', ':' or \
             spaces)"
        ))
    }
}

fn parse_failback(s: &str) -> Result<Failback, String> {
    match s {
        "auto" => Ok(Failback::Auto),
        "manual" => Ok(Failback::Manual),
        _ => Err(format!("\"{s}\" is neither \"auto\" nor \"manual\"")),
    }
}

/// Parses `500ms`, `30s` or `2m`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("\"{s}\" is not a duration like \"500ms\", \"30s\" or \"2m\"");
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs).ok_or_else(bad),
        _ => Err(bad()),
    }
}

/// Where an error is (the file and the scope in it), and the errors that say so.
struct Context<'a> {
    file: &'a Path,
    scope: Scope,
}

impl Context<'_> {
    fn bad(&self, key: &str, problem: impl fmt::Display) -> ConfigError {
        ConfigError::BadValue {
            file: self.file.to_path_buf(),
            scope: self.scope.clone(),
            key: key.to_string(),
            problem: problem.to_string(),
        }
    }

    fn wrong_type(&self, key: &str, expected: &str, found: &Value) -> ConfigError {
        let found = match found {
            Value::String(_) => "a string",
            Value::Integer(_) => "an integer",
            Value::Float(_) => "a float",
            Value::Boolean(_) => "a boolean",
            Value::Datetime(_) => "a date-time",
            Value::Array(_) => "an array",
            Value::Table(_) => "a table",
        };
        self.bad(key, format!("expected {expected}, found {found}"))
    }

    fn invalid(&self, problem: impl fmt::Display) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_path_buf(),
            scope: self.scope.clone(),
            problem: problem.to_string(),
        }
    }

    /// Fails unless `path` opens for reading and is not a directory.
    fn check_file(&self, key: &str, path: &Path) -> Result<(), ConfigError> {
        let opened = File::open(path).and_then(|f| f.metadata()).and_then(|m| {
            if m.is_dir() {
                Err(io::ErrorKind::IsADirectory.into())
            } else {
                Ok(())
            }
        });
        opened.map_err(|source| ConfigError::LocalFile {
            file: self.file.to_path_buf(),
            scope: self.scope.clone(),
            key: key.to_string(),
            path: path.to_path_buf(),
            source,
        })
    }
}

/// One TOML table being read. Each key is taken out as it is read, so that the keys left
/// when [`TableReader::finish`] is called are the unknown ones.
struct TableReader<'a> {
    cx: &'a Context<'a>,
    /// The table's path in the file, with a trailing dot (empty for the top or a VM's table).
    prefix: String,
    table: Table,
}

impl<'a> TableReader<'a> {
    fn new(cx: &'a Context<'a>, prefix: String, table: Table) -> Self {
        TableReader { cx, prefix, table }
    }

    /// The full path of `key` in the file (within the scope).
    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn bad(&self, key: &str, problem: impl fmt::Display) -> ConfigError {
        self.cx.bad(&self.key(key), problem)
    }

    fn take(&mut self, key: &str) -> Option<Value> {
        self.table.remove(key)
    }

    fn string(&mut self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.cx.wrong_type(&self.key(key), "a string", &other)),
        }
    }

    /// A string value turned into a `T` by `parse`, whose error says what is wrong with it.
    fn parsed<T>(
        &mut self,
        key: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        match self.string(key)? {
            None => Ok(None),
            Some(s) => parse(&s)
                .map(Some)
                .map_err(|problem| self.bad(key, problem)),
        }
    }

    fn integer<T>(&mut self, key: &str, range: RangeInclusive<T>) -> Result<Option<T>, ConfigError>
    where
        T: TryFrom<i64> + PartialOrd + fmt::Display,
    {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Integer(i)) => T::try_from(i)
                .ok()
                .filter(|v| range.contains(v))
                .map(Some)
                .ok_or_else(|| {
                    self.bad(
                        key,
                        format!("{i} is outside {}..={}", range.start(), range.end()),
                    )
                }),
            Some(other) => Err(self.cx.wrong_type(&self.key(key), "an integer", &other)),
        }
    }

    fn boolean(&mut self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Boolean(b)) => Ok(Some(b)),
            Some(other) => Err(self.cx.wrong_type(&self.key(key), "true or false", &other)),
        }
    }

    /// A duration: a string like `30s` or a whole number of seconds.
    fn duration(&mut self, key: &str) -> Result<Option<Duration>, ConfigError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => parse_duration(&s)
                .map(Some)
                .map_err(|problem| self.bad(key, problem)),
            Some(Value::Integer(i)) => u64::try_from(i)
                .map(|secs| Some(Duration::from_secs(secs)))
                .map_err(|_| self.bad(key, format!("{i} is not a number of seconds"))),
            Some(other) => Err(self.cx.wrong_type(
                &self.key(key),
                "a duration like \"30s\" or whole seconds",
                &other,
            )),
        }
    }

    fn strings(&mut self, key: &str) -> Result<Option<Vec<String>>, ConfigError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .into_iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::String(s) => Ok(s),
                    other => Err(self.cx.wrong_type(
                        &format!("{}[{i}]", self.key(key)),
                        "a string",
                        &other,
                    )),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(other) => Err(self
                .cx
                .wrong_type(&self.key(key), "an array of strings", &other)),
        }
    }

    /// A path, relative ones resolved against `dir`.
    fn path(&mut self, key: &str, dir: &Path) -> Result<Option<PathBuf>, ConfigError> {
        match self.string(key)? {
            None => Ok(None),
            Some(s) => self.resolve(key, &s, dir).map(Some),
        }
    }

    fn resolve(&self, key: &str, path: &str, dir: &Path) -> Result<PathBuf, ConfigError> {
        if path.is_empty() {
            return Err(self.bad(key, "the path is empty"));
        }
        Ok(dir.join(path))
    }

    fn table(&mut self, key: &str) -> Result<Option<TableReader<'a>>, ConfigError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Table(table)) => Ok(Some(TableReader::new(
                self.cx,
                format!("{}.", self.key(key)),
                table,
            ))),
            Some(other) => Err(self.cx.wrong_type(&self.key(key), "a table", &other)),
        }
    }

    /// Every key of this table, each of which must be a table.
    fn sub_tables(mut self) -> Result<Vec<(String, TableReader<'a>)>, ConfigError> {
        let names: Vec<String> = self.table.keys().cloned().collect();
        let mut tables = Vec::with_capacity(names.len());
        for name in names {
            if let Some(table) = self.table(&name)? {
                tables.push((name, table));
            }
        }
        Ok(tables)
    }

    /// Fails on the first key that was not read.
    fn finish(&self) -> Result<(), ConfigError> {
        match self.table.keys().next() {
            Some(key) => Err(ConfigError::UnknownKey {
                file: self.cx.file.to_path_buf(),
                scope: self.cx.scope.clone(),
                key: self.key(key),
            }),
            None => Ok(()),
        }
    }

    /// `value`, or the error that `key` is missing.
    fn require<T>(&self, key: &str, value: Option<T>) -> Result<T, ConfigError> {
        value.ok_or_else(|| ConfigError::MissingKey {
            file: self.cx.file.to_path_buf(),
            scope: self.cx.scope.clone(),
            key: self.key(key),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    const NODES: &str = r#"
[nodes.a]
control = "127.0.0.1:7701"
replication = "127.0.0.1"

[nodes.b]
control = "127.0.0.1:7702"
replication = "127.0.0.1"
"#;

    /// A config of the two nodes above and one VM "s" with the keys `vm`, and the keys `a`
    /// and `b` in its two node tables.
    fn with_vm(vm: &str, a: &str, b: &str) -> String {
        format!("{NODES}\n[[vm]]\nname = \"s\"\n{vm}\n\n[vm.nodes.a]\n{a}\n\n[vm.nodes.b]\n{b}\n")
    }

    const STENCIL: &str = "payload = \"builtin:stencil\"";

    fn load_text(dir: &TempDir, text: &str) -> (PathBuf, Result<Config, ConfigError>) {
        let path = dir.write("x.toml", text);
        let loaded = load(&path);
        (path, loaded)
    }

    fn loads(text: &str) -> Config {
        let dir = TempDir::new("config");
        let (_, loaded) = load_text(&dir, text);
        loaded.unwrap_or_else(|e| panic!("{e}"))
    }

    /// The error that loading `text` gives, without the file name it starts with.
    fn error_of(text: &str) -> String {
        let dir = TempDir::new("config");
        let (path, loaded) = load_text(&dir, text);
        without_file(&path, &loaded.expect_err("the config is refused"))
    }

    fn without_file(path: &Path, e: &ConfigError) -> String {
        let message = e.to_string();
        let prefix = format!("{}: ", path.display());
        assert!(!message.contains('\n'), "one line: {message}");
        match message.strip_prefix(&prefix) {
            Some(rest) => rest.to_string(),
            None => panic!("'{message}' does not start with the file's name"),
        }
    }

    #[test]
    fn the_example_loads() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/local-pair.toml"
        ));
        let config = load(path).unwrap_or_else(|e| panic!("{e}"));
        let names: Vec<&str> = config.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        let a = config.node("a").unwrap();
        assert_eq!(a.control, "127.0.0.1:7701".parse().unwrap());
        assert_eq!(a.socket, Path::new("/run/ftvmm/a.sock"));
        assert_eq!(config.peer("a").unwrap().name, "b");
        let vm = config.vm("stencil").unwrap();
        assert_eq!(vm.mem, 64 << 20);
        assert_eq!(vm.policy.preferred, "a");
        assert_eq!(vm.policy.failback, Failback::Auto);
        assert_eq!(vm.policy.failback_delay, Duration::from_secs(2));
        assert!(vm.on_node.values().all(|n| n.disk.is_some()));
        assert!(
            matches!(&vm.guest, GuestSpec::Payload { payload, .. } if payload == "builtin:stencil")
        );
    }

    #[test]
    fn defaults_and_file_order() {
        let text = r#"
[nodes.zed]
control = "10.0.0.2:7700"
replication = "10.0.1.2"
[nodes.alpha]
control = "10.0.0.1:7700"
replication = "10.0.1.1"
[[vm]]
name = "s"
payload = "builtin:seq"
[vm.nodes.zed]
[vm.nodes.alpha]
"#;
        let config = loads(text);
        let names: Vec<&str> = config.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["zed", "alpha"], "file order, not sorted");
        let zed = &config.nodes[0];
        assert_eq!(zed.socket, Path::new("/run/ftvmm/zed.sock"));
        assert_eq!(zed.state_dir, Path::new("/var/lib/ftvmm/zed"));
        assert_eq!(zed.metrics, None);
        let vm = &config.vms[0];
        assert_eq!((vm.mem, vm.vcpus, vm.mac), (256 << 20, 1, None));
        assert_eq!(
            vm.policy,
            Policy::defaults("zed".into()),
            "preferred: the first node"
        );
        assert_eq!(
            vm.guest,
            GuestSpec::Payload {
                payload: "builtin:seq".into(),
                args: vec![]
            }
        );
        assert_eq!(vm.on_node["alpha"], VmNodeConfig::default());
    }

    #[test]
    fn a_vm_policy_overrides_the_file_policy_key_by_key() {
        let text = format!(
            "[policy]\nepoch_ms = 20\nfailback = \"manual\"\nfailback_delay = 90\n{}\n[vm.policy]\n\
             epoch_ms = 50\npreferred = \"b\"\nfailback_delay = \"2m\"\n",
            with_vm(STENCIL, "", "")
        );
        let p = &loads(&text).vms[0].policy;
        assert_eq!(p.epochs, EpochBounds::fixed(50));
        assert_eq!(p.failback, Failback::Manual);
        assert_eq!(p.preferred, "b");
        assert_eq!(p.failback_delay, Duration::from_secs(120));
        assert_eq!(p.failover_timeout_ms, 300);
        let text = format!("[policy]\nfailback_delay = \"500ms\"\n{NODES}");
        assert!(loads(&text).vms.is_empty());
    }

    #[test]
    fn unknown_keys() {
        let text = format!("[policy]\nfailback_dealy = \"5s\"\n{NODES}");
        assert_eq!(error_of(&text), "unknown key policy.failback_dealy");
        assert_eq!(
            error_of(&format!("{NODES}\nverbose = true\n")),
            "unknown key nodes.b.verbose"
        );
        assert_eq!(
            error_of(&format!("colour = 1\n{NODES}")),
            "unknown key colour"
        );
        let text = with_vm(&format!("{STENCIL}\ndsk = \"x.img\""), "", "");
        assert_eq!(error_of(&text), "vm \"s\": unknown key dsk");
        let text = with_vm(STENCIL, "", "dsk = \"x.img\"");
        assert_eq!(error_of(&text), "vm \"s\": unknown key nodes.b.dsk");
        let text = format!("{}\n[vm.policy]\nepoch = 3\n", with_vm(STENCIL, "", ""));
        assert_eq!(error_of(&text), "vm \"s\": unknown key policy.epoch");
        let text = format!("{}\n[vm.nodes.c]\n", with_vm(STENCIL, "", ""));
        assert_eq!(
            error_of(&text),
            "vm \"s\": nodes.c is not a node (nodes: a, b)"
        );
        // A misspelt key is unknown rather than the key it should be missing.
        assert_eq!(error_of("[nodez.a]\n"), "unknown key nodez");
    }

    #[test]
    fn missing_keys() {
        assert_eq!(error_of(""), "missing key nodes");
        let text = NODES.replace("control = \"127.0.0.1:7702\"\n", "");
        assert_eq!(error_of(&text), "missing key nodes.b.control");
        let text = NODES.replace("replication = \"127.0.0.1\"\n\n", "\n");
        assert_eq!(error_of(&text), "missing key nodes.a.replication");
        let text = format!("{NODES}\n[[vm]]\n{STENCIL}\n");
        assert_eq!(error_of(&text), "vm #1: missing key name");
        let text = format!("{NODES}\n[[vm]]\nname = \"s\"\n{STENCIL}\n[vm.nodes.a]\n");
        assert_eq!(error_of(&text), "vm \"s\": missing key nodes.b");
        let text = format!("{NODES}\n[[vm]]\nname = \"s\"\n{STENCIL}\n");
        assert_eq!(error_of(&text), "vm \"s\": missing key nodes");
    }

    #[test]
    fn bad_node_values() {
        let cases = [
            ("control = \"127.0.0.1:7702\"", "control = \"pair-b:7702\"",
             "nodes.b.control: \"pair-b:7702\" is not IP:PORT (a host name is not looked up)"),
            ("control = \"127.0.0.1:7702\"", "control = 7702",
             "nodes.b.control: expected a string, found an integer"),
            ("control = \"127.0.0.1:7702\"", "control = \"0.0.0.0:7702\"",
             "nodes.b.control: \"0.0.0.0:7702\" is not an address the peer can connect to"),
            ("replication = \"127.0.0.1\"\n\n", "replication = \"127.0.0.1:7000\"\n\n",
             "nodes.a.replication: \"127.0.0.1:7000\" is not an IP address"),
            ("replication = \"127.0.0.1\"\n\n", "replication = \"127.0.0.1\"\nsocket = 3\n\n",
             "nodes.a.socket: expected a string, found an integer"),
            ("replication = \"127.0.0.1\"\n\n", "replication = \"127.0.0.1\"\nstate_dir = \"\"\n\n",
             "nodes.a.state_dir: the path is empty"),
            ("replication = \"127.0.0.1\"\n\n", "replication = \"127.0.0.1\"\nmetrics = \"0.0.0.0:9100\"\n\n",
             "nodes.a.metrics: 0.0.0.0:9100 is not a loopback address (set nodes.a.metrics_public = true to serve metrics to other hosts)"),
            ("replication = \"127.0.0.1\"\n\n", "replication = \"127.0.0.1\"\nmetrics_public = \"yes\"\n\n",
             "nodes.a.metrics_public: expected true or false, found a string"),
            ("[nodes.b]", "[nodes.B]",
             "nodes.B: a name is 1 to 32 characters of a-z, 0-9 and -"),
        ];
        for (from, to, expected) in cases {
            let text = NODES.replacen(from, to, 1);
            assert_ne!(text, NODES, "{from}");
            assert_eq!(error_of(&text), expected, "{to}");
        }
        let public = NODES.replacen(
            "replication = \"127.0.0.1\"\n\n",
            "replication = \"127.0.0.1\"\nmetrics = \"0.0.0.0:9100\"\nmetrics_public = true\n\n",
            1,
        );
        assert_eq!(
            loads(&public).nodes[0].metrics,
            Some("0.0.0.0:9100".parse().unwrap())
        );
        assert_eq!(
            error_of("[nodes]\na = 1\nb = 2\n"),
            "nodes.a: expected a table, found an integer"
        );
        let same = NODES.replace("7702", "7701");
        assert_eq!(
            error_of(&same),
            "nodes.a.control and nodes.b.control are both 127.0.0.1:7701"
        );
    }

    #[test]
    fn exactly_two_nodes() {
        let one = "[nodes.a]\ncontrol = \"127.0.0.1:1\"\nreplication = \"127.0.0.1\"\n";
        assert_eq!(
            error_of(one),
            "nodes: exactly two nodes are needed, found 1"
        );
        let three = format!("{NODES}\n[nodes.c]\n");
        assert_eq!(
            error_of(&three),
            "nodes: exactly two nodes are needed, found 3"
        );
        assert_eq!(
            error_of("nodes = 2\n"),
            "nodes: expected a table, found an integer"
        );
    }

    #[test]
    fn bad_vm_values() {
        let cases = [
            ("mem = \"257M\"",
             "mem: \"257M\": guest memory size 269484032 is outside 64M..64G or not a multiple of 2M"),
            ("mem = \"12X\"", "mem: bad size '12X': use a number with K, M or G"),
            ("mem = 256", "mem: expected a string, found an integer"),
            ("vcpus = 0", "vcpus: 0 is outside 1..=32"),
            ("vcpus = 33", "vcpus: 33 is outside 1..=32"),
            ("vcpus = \"2\"", "vcpus: expected an integer, found a string"),
            ("mac = \"52:54:00:12:34\"", "mac: bad MAC '52:54:00:12:34'"),
            ("mac = \"01:00:5e:00:00:01\"", "mac: \"01:00:5e:00:00:01\" is not a unicast MAC"),
            ("args = [\"n=1\", 2]", "args[1]: expected a string, found an integer"),
            ("args = \"n=1\"", "args: expected an array of strings, found a string"),
            ("cmdline = 1", "cmdline: expected a string, found an integer"),
            ("nodes = 1", "nodes: expected a table, found an integer"),
        ];
        for (keys, expected) in cases {
            // The VM's keys come before its node tables, so `nodes = 1` needs a VM of its own.
            let text = if keys.starts_with("nodes") {
                format!("{NODES}\n[[vm]]\nname = \"s\"\n{STENCIL}\n{keys}\n")
            } else {
                with_vm(&format!("{STENCIL}\n{keys}"), "", "")
            };
            assert_eq!(error_of(&text), format!("vm \"s\": {expected}"), "{keys}");
        }
        let text = with_vm("payload = \"builtin:\"", "", "");
        assert_eq!(
            error_of(&text),
            "vm \"s\": payload: \"builtin:\" names no builtin payload"
        );
        let text = with_vm(STENCIL, "tap = \"a-name-far-too-long\"", "");
        assert_eq!(
            error_of(&text),
            "vm \"s\": nodes.a.tap: \"a-name-far-too-long\" is not an interface name (1 to 15 \
             characters, no '/', ':' or spaces)"
        );
        let text = with_vm(STENCIL, "disk = 1", "");
        assert_eq!(
            error_of(&text),
            "vm \"s\": nodes.a.disk: expected a string, found an integer"
        );
        let text = with_vm(
            &format!("{STENCIL}\nmac = \"52:54:00:12:34:56\""),
            "tap = \"t0\"\nbridge = \"br0\"",
            "bridge = \"br0\"",
        );
        assert_eq!(
            error_of(&text),
            "vm \"s\": nodes.b.bridge needs nodes.b.tap"
        );
        assert_eq!(
            error_of(&format!("vm = 1\n{NODES}")),
            "vm: expected an array of tables ([[vm]]), found an integer"
        );
    }

    #[test]
    fn bad_policy_values() {
        let cases = [
            ("epoch_ms = 0", "policy.epoch_ms: 0 is outside 1..=10000"),
            ("epoch_ms = -5", "policy.epoch_ms: -5 is outside 1..=10000"),
            ("epoch_ms = 1.5", "policy.epoch_ms: expected an integer, found a float"),
            (
                "epoch_ms = 40\nepoch_max_ms = 100",
                "policy.epoch_ms gives fixed epochs: leave out policy.epoch_min_ms and policy.epoch_max_ms",
            ),
            (
                "epoch_min_ms = 50\nepoch_max_ms = 20",
                "policy.epoch_min_ms (50) must not be longer than policy.epoch_max_ms (20)",
            ),
            ("failover_timeout_ms = 10", "policy.failover_timeout_ms: 10 is outside 20..=600000"),
            ("ack_timeout_ms = 4000000", "policy.ack_timeout_ms: 4000000 is outside 20..=3600000"),
            ("failback = \"sometimes\"", "policy.failback: \"sometimes\" is neither \"auto\" nor \"manual\""),
            ("failback_delay = \"5x\"", "policy.failback_delay: \"5x\" is not a duration like \"500ms\", \"30s\" or \"2m\""),
            ("failback_delay = \"s\"", "policy.failback_delay: \"s\" is not a duration like \"500ms\", \"30s\" or \"2m\""),
            ("failback_delay = -1", "policy.failback_delay: -1 is not a number of seconds"),
            ("failback_delay = true", "policy.failback_delay: expected a duration like \"30s\" or whole seconds, found a boolean"),
            ("preferred = 1", "policy.preferred: expected a string, found an integer"),
        ];
        for (keys, expected) in cases {
            assert_eq!(
                error_of(&format!("[policy]\n{keys}\n{NODES}")),
                expected,
                "{keys}"
            );
            let text = format!("{}\n[vm.policy]\n{keys}\n", with_vm(STENCIL, "", ""));
            assert_eq!(error_of(&text), format!("vm \"s\": {expected}"), "{keys}");
        }
        assert_eq!(
            error_of(&format!("policy = 1\n{NODES}")),
            "policy: expected a table, found an integer"
        );
    }

    #[test]
    fn vm_names() {
        for bad in ["", "Web", "web_1", "a.b", &"x".repeat(33)] {
            let text =
                with_vm(STENCIL, "", "").replace("name = \"s\"", &format!("name = \"{bad}\""));
            assert_eq!(
                error_of(&text),
                format!("vm #1: name: \"{bad}\": a name is 1 to 32 characters of a-z, 0-9 and -")
            );
        }
        let text = with_vm(STENCIL, "", "").replace("name = \"s\"", "name = 7");
        assert_eq!(
            error_of(&text),
            "vm #1: name: expected a string, found an integer"
        );
        let text = with_vm(STENCIL, "", "")
            .replace("name = \"s\"", &format!("name = \"{}\"", "x".repeat(32)));
        assert_eq!(loads(&text).vms[0].name.len(), 32);
    }

    #[test]
    fn duplicate_vm_names() {
        let vm = with_vm(STENCIL, "", "");
        let second = &vm[NODES.len()..];
        let text = format!("{vm}{second}");
        assert_eq!(error_of(&text), "vm #2: name \"s\" is taken by vm #1");
    }

    #[test]
    fn payload_or_kernel() {
        let text = with_vm(&format!("{STENCIL}\nkernel = \"vmlinux\""), "", "");
        assert_eq!(
            error_of(&text),
            "vm \"s\": payload and kernel are both given (a VM boots one of them)"
        );
        let text = with_vm("vcpus = 2", "", "");
        assert_eq!(
            error_of(&text),
            "vm \"s\": neither payload nor kernel is given"
        );
        let text = with_vm("kernel = \"vmlinux\"\nargs = [\"x\"]", "", "");
        assert_eq!(
            error_of(&text),
            "vm \"s\": args go with payload, not kernel (a kernel takes cmdline)"
        );
        let text = with_vm(&format!("{STENCIL}\ncmdline = \"quiet\""), "", "");
        assert_eq!(
            error_of(&text),
            "vm \"s\": cmdline goes with kernel, not payload"
        );
        let text = with_vm(&format!("{STENCIL}\ninitrd = \"initrd.img\""), "", "");
        assert_eq!(
            error_of(&text),
            "vm \"s\": initrd goes with kernel, not payload"
        );
        let text = with_vm(
            "kernel = \"/boot/vmlinux\"\ninitrd = \"/boot/initrd\"\ncmdline = \"quiet\"",
            "",
            "",
        );
        assert_eq!(
            loads(&text).vms[0].guest,
            GuestSpec::Kernel {
                kernel: "/boot/vmlinux".into(),
                initrd: Some("/boot/initrd".into()),
                cmdline: Some("quiet".into())
            }
        );
    }

    #[test]
    fn nics_and_disks_on_both_nodes_or_neither() {
        let mac = format!("{STENCIL}\nmac = \"52:54:00:12:34:56\"");
        let text = with_vm(STENCIL, "tap = \"ft-a\"", "tap = \"ft-b\"");
        assert_eq!(
            error_of(&text),
            "vm \"s\": the nodes give taps but mac is not given (both nodes' NICs share one MAC)"
        );
        let text = with_vm(&mac, "", "");
        assert_eq!(
            error_of(&text),
            "vm \"s\": mac is given but no node gives a tap"
        );
        let text = with_vm(&mac, "", "tap = \"ft-b\"");
        assert_eq!(
            error_of(&text),
            "vm \"s\": nodes.b.tap is given but nodes.a.tap is not (both nodes give a tap or neither)"
        );
        let text = with_vm(STENCIL, "disk = \"a.img\"", "");
        assert_eq!(
            error_of(&text),
            "vm \"s\": nodes.a.disk is given but nodes.b.disk is not (both nodes give a disk or neither)"
        );
        let text = with_vm(&mac, "tap = \"ft-a\"\nbridge = \"br0\"", "tap = \"ft-b\"");
        let vm = &loads(&text).vms[0];
        assert_eq!(vm.mac, Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert_eq!(vm.on_node["a"].bridge.as_deref(), Some("br0"));
        assert_eq!(vm.on_node["b"].tap.as_deref(), Some("ft-b"));
    }

    #[test]
    fn preferred_must_be_a_node() {
        let text = format!("[policy]\npreferred = \"c\"\n{NODES}");
        assert_eq!(
            error_of(&text),
            "policy.preferred \"c\" is not a node (nodes: a, b)"
        );
        let text = format!(
            "{}\n[vm.policy]\npreferred = \"c\"\n",
            with_vm(STENCIL, "", "")
        );
        assert_eq!(
            error_of(&text),
            "vm \"s\": policy.preferred \"c\" is not a node (nodes: a, b)"
        );
    }

    #[test]
    fn the_ack_timeout_is_longer_than_the_failover_timeout() {
        let text = format!(
            "[policy]\nfailover_timeout_ms = 300\n{}\n[vm.policy]\nack_timeout_ms = 300\n",
            with_vm(STENCIL, "", "")
        );
        assert_eq!(
            error_of(&text),
            "vm \"s\": policy.ack_timeout_ms (300) must be longer than policy.failover_timeout_ms (300)"
        );
        let text = format!(
            "{}\n[vm.policy]\nack_timeout_ms = 301\n",
            with_vm(STENCIL, "", "")
        );
        assert_eq!(loads(&text).vms[0].policy.ack_timeout_ms, 301);
    }

    #[test]
    fn syntax_errors_give_their_line() {
        let text = format!("{NODES}\n[[vm]]\nname = \"s\n");
        let e = error_of(&text);
        assert!(e.starts_with("line 11: "), "{e}");
        let e = error_of(&format!("{NODES}\n[nodes.a]\n"));
        assert!(e.starts_with("line 10: ") && e.contains("duplicate"), "{e}");
    }

    #[test]
    fn an_unreadable_file() {
        let dir = TempDir::new("config");
        let path = dir.path().join("none.toml");
        let e = load(&path).expect_err("no file");
        assert_eq!(
            without_file(&path, &e),
            "No such file or directory (os error 2)"
        );
    }

    #[test]
    fn relative_paths_are_relative_to_the_file() {
        let dir = TempDir::new("config");
        let text = with_vm(
            "payload = \"payloads/p.elf\"",
            "disk = \"a.img\"\nconsole = \"/var/log/s.out\"",
            "disk = \"../b.img\"",
        )
        .replacen(
            "replication = \"127.0.0.1\"\n",
            "replication = \"127.0.0.1\"\nsocket = \"run/a.sock\"\nstate_dir = \"state/a\"\n",
            1,
        );
        let (_, loaded) = load_text(&dir, &text);
        let config = loaded.unwrap_or_else(|e| panic!("{e}"));
        let d = dir.path();
        assert_eq!(config.nodes[0].socket, d.join("run/a.sock"));
        assert_eq!(config.nodes[0].state_dir, d.join("state/a"));
        let vm = &config.vms[0];
        assert!(
            matches!(&vm.guest, GuestSpec::Payload { payload, .. } if Path::new(payload) == d.join("payloads/p.elf"))
        );
        assert_eq!(
            vm.on_node["a"].disk.as_deref(),
            Some(d.join("a.img").as_path())
        );
        assert_eq!(
            vm.on_node["b"].disk.as_deref(),
            Some(d.join("../b.img").as_path())
        );
        assert_eq!(
            vm.on_node["a"].console.as_deref(),
            Some(Path::new("/var/log/s.out"))
        );
    }

    #[test]
    fn check_local_wants_this_nodes_files() {
        let dir = TempDir::new("config");
        let text = with_vm(
            "payload = \"p.elf\"",
            "disk = \"a.img\"",
            "disk = \"/nope.img\"",
        );
        let (path, loaded) = load_text(&dir, &text);
        let config = loaded.unwrap_or_else(|e| panic!("{e}"));
        let e = config.check_local("a").expect_err("no payload file");
        assert_eq!(
            without_file(&path, &e),
            format!(
                "vm \"s\": payload: {}: No such file or directory (os error 2)",
                dir.path().join("p.elf").display()
            )
        );
        dir.write("p.elf", "");
        let e = config.check_local("a").expect_err("no disk");
        assert!(
            without_file(&path, &e).starts_with("vm \"s\": nodes.a.disk: "),
            "{e}"
        );
        dir.write("a.img", "");
        config.check_local("a").unwrap_or_else(|e| panic!("{e}"));
        let e = config.check_local("b").expect_err("b's disk is missing");
        assert_eq!(
            without_file(&path, &e),
            "vm \"s\": nodes.b.disk: /nope.img: No such file or directory (os error 2)"
        );
        let e = config.check_local("c").expect_err("no node c");
        assert_eq!(without_file(&path, &e), "no node \"c\" (nodes: a, b)");

        let text = with_vm("kernel = \"k\"\ninitrd = \".\"", "", "");
        let (path, loaded) = load_text(&dir, &text);
        let config = loaded.unwrap_or_else(|e| panic!("{e}"));
        dir.write("k", "");
        let e = config
            .check_local("a")
            .expect_err("the initrd is a directory");
        assert_eq!(
            without_file(&path, &e),
            format!(
                "vm \"s\": initrd: {}: is a directory",
                dir.path().join(".").display()
            )
        );
    }

    #[test]
    fn lookups_name_what_is_there() {
        let config = loads(&with_vm(STENCIL, "", ""));
        let path = &config.path;
        assert_eq!(config.peer("b").unwrap().name, "a");
        let e = config.node("c").expect_err("no node c");
        assert_eq!(without_file(path, &e), "no node \"c\" (nodes: a, b)");
        assert!(config.peer("c").is_err());
        let e = config.vm("web").expect_err("no vm web");
        assert_eq!(without_file(path, &e), "no vm \"web\" (vms: s)");
    }
}
