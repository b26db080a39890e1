//! What a node says about itself and its VMs: the JSON of `ftvmm status --json` and of the
//! control socket (a contract: field names do not change), its text rendering for people,
//! and its Prometheus rendering for the metrics endpoint.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One node's view: its peer and each VM it knows.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct NodeStatus {
    pub node: String,
    /// The daemon's process id (drills stop or kill it by pid).
    #[serde(default)]
    pub pid: Option<u32>,
    pub peer: PeerStatus,
    pub vms: Vec<VmStatus>,
}

/// The other node, as this one hears it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PeerStatus {
    pub name: String,
    pub connected: bool,
    /// Since the last message from the peer; none if it was never heard.
    pub last_heard_ms: Option<u64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct VmStatus {
    pub name: String,
    /// This node's role for the VM.
    pub role: Role,
    /// Whether a standby holds every acknowledged checkpoint, so that the guest survives this
    /// node's loss.
    pub protected: bool,
    /// Why the VM is not protected: "no peer", "syncing 47 %", "peer slow", "peer refused: ...",
    /// "split history: ...", "unrelated images: ..." or free text.
    pub why: Option<String>,
    pub epoch: u64,
    pub epochs_per_s: f64,
    /// Age of the last acknowledgement from the standby.
    pub last_ack_age_ms: Option<u64>,
    pub dirty_mib_s: f64,
    pub wire_mib_s: f64,
    /// While a node is being brought in sync.
    pub resync: Option<Resync>,
    pub generation: Generation,
    pub peer_role: Option<Role>,
    /// A command the operator may run, e.g. `ftvmm swap stencil --config ... --name a`.
    pub hint: Option<String>,
    /// The highest checkpoint the standby acknowledged (on a primary) or committed (on a
    /// standby).
    #[serde(default)]
    pub acked: u64,
    /// The VM process's id, while one runs.
    #[serde(default)]
    pub pid: Option<u32>,
    /// The last takeover on this node, if any.
    #[serde(default)]
    pub last_takeover: Option<TakeoverFigures>,
    /// On a primary: the lengths the epoch policy chose for the recent epochs, and why
    /// epochs ended (counts by reason: output, dirty, bytes, amortized, max, exit, swap).
    #[serde(default)]
    pub epoch_ms_p50: Option<f64>,
    #[serde(default)]
    pub epoch_ms_p99: Option<f64>,
    #[serde(default)]
    pub epoch_ends: std::collections::BTreeMap<String, u64>,
}

/// What a takeover cost, as the node that took over measured it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TakeoverFigures {
    /// The checkpoint it resumed from.
    pub epoch: u64,
    /// From the primary's last word to the decision that it was dead.
    pub detection_ms: f64,
    /// From the decision to the guest running here (drain, decode, build, start).
    pub restore_ms: f64,
    /// Output of the last checkpoint this node released itself (the primary may have too).
    pub held_frames: u64,
    pub held_console_bytes: u64,
    /// Why the primary was judged dead.
    pub reason: String,
}

/// A node's role for one VM.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Standby,
    Syncing,
    Stopped,
}

impl Role {
    /// Every role, in the order metrics list them.
    pub const ALL: [Role; 4] = [Role::Primary, Role::Standby, Role::Syncing, Role::Stopped];

    /// The name status gives the role (as its JSON does).
    pub fn name(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Standby => "standby",
            Role::Syncing => "syncing",
            Role::Stopped => "stopped",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The progress of a resynchronisation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Resync {
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub rate_mib_s: f64,
    pub eta_s: Option<f64>,
    pub percent: f64,
}

/// The VM's generation identifiers on this node (DRBD's scheme).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Generation {
    pub current: String,
    pub bitmap: Option<String>,
    pub history: Vec<String>,
    /// Whether this node's image is a complete committed state.
    pub consistent: bool,
}

/// How many characters of a generation identifier the text shows, as `git log --oneline`
/// does for hashes.
const SHORT_ID: usize = 8;

/// Status for people, in the manner of `drbdadm status`: a line per VM, then indented lines
/// about its peer, generations, resync, why it is not protected and what to do.
pub fn render_text(s: &NodeStatus) -> String {
    Text(s).to_string()
}

struct Text<'a>(&'a NodeStatus);

impl fmt::Display for Text<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        let peer = peer_state(&s.peer);
        writeln!(f, "node {} peer {} {peer}", s.node, s.peer.name)?;
        if s.vms.is_empty() {
            writeln!(f, "no VMs")?;
        }
        // Names padded to one width, so that the roles of several VMs line up.
        let width = s.vms.iter().map(|vm| vm.name.len()).max().unwrap_or(0);
        for vm in &s.vms {
            let protected = if vm.protected {
                "protected"
            } else {
                "unprotected"
            };
            write!(
                f,
                "{:width$} role:{} {protected} epoch:{}",
                vm.name, vm.role, vm.epoch
            )?;
            if vm.role != Role::Stopped {
                let last_ack = vm.last_ack_age_ms.map_or_else(|| "-".to_string(), millis);
                write!(
                    f,
                    " ({:.1}/s) last-ack:{last_ack} dirty:{:.1}MiB/s wire:{:.1}MiB/s",
                    vm.epochs_per_s, vm.dirty_mib_s, vm.wire_mib_s
                )?;
            }
            writeln!(f)?;

            write!(f, "  peer {} {peer}", s.peer.name)?;
            if let Some(role) = vm.peer_role {
                write!(f, " role:{role}")?;
            }
            writeln!(f)?;
            let g = &vm.generation;
            let bitmap = g
                .bitmap
                .as_deref()
                .map_or_else(|| "-".to_string(), short_id);
            let consistent = if g.consistent {
                "consistent"
            } else {
                "inconsistent"
            };
            writeln!(
                f,
                "  generation current:{} bitmap:{bitmap} {consistent}",
                short_id(&g.current)
            )?;
            if let Some(r) = &vm.resync {
                write!(
                    f,
                    "  resync: {:.1} % {:.1}/{:.1} MiB at {:.1} MiB/s",
                    r.percent,
                    mib(r.done_bytes),
                    mib(r.total_bytes),
                    r.rate_mib_s
                )?;
                if let Some(eta) = r.eta_s {
                    write!(f, ", eta {eta:.1} s")?;
                }
                writeln!(f)?;
            }
            if let (Some(p50), Some(p99)) = (vm.epoch_ms_p50, vm.epoch_ms_p99) {
                let ends: Vec<String> = vm
                    .epoch_ends
                    .iter()
                    .filter(|(_, n)| **n > 0)
                    .map(|(why, n)| format!("{why} {n}"))
                    .collect();
                writeln!(
                    f,
                    "  epochs: p50 {p50:.0}ms p99 {p99:.0}ms; ended by {}",
                    if ends.is_empty() {
                        "-".into()
                    } else {
                        ends.join(", ")
                    }
                )?;
            }
            if let Some(why) = &vm.why {
                writeln!(f, "  not protected: {}", one_line(why))?;
            }
            if let Some(hint) = &vm.hint {
                writeln!(f, "  hint: {}", one_line(hint))?;
            }
        }
        Ok(())
    }
}

fn peer_state(p: &PeerStatus) -> String {
    match (p.connected, p.last_heard_ms) {
        (true, _) => "connected".to_string(),
        (false, Some(ms)) => format!("disconnected last-heard:{}", millis(ms)),
        (false, None) => "disconnected last-heard:never".to_string(),
    }
}

/// `3ms` below a second, `4.2s` above.
fn millis(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else {
        format!("{}.{}s", ms / 1000, ms % 1000 / 100)
    }
}

fn mib(bytes: u64) -> f64 {
    // f64 holds byte counts exactly up to 2^53 (8 PiB): far beyond any disk here.
    bytes as f64 / f64::from(1u32 << 20)
}

fn short_id(id: &str) -> String {
    match id.char_indices().nth(SHORT_ID) {
        Some((end, _)) => format!("{}…", &id[..end]),
        None => id.to_string(),
    }
}

/// Free text from elsewhere on one line, so that it cannot break the layout.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A sample's value.
enum Number {
    Count(u64),
    Real(f64),
}

impl fmt::Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Number::Count(n) => write!(f, "{n}"),
            // The text format's spellings of the values Rust writes as inf and NaN.
            Number::Real(x) if x.is_nan() => f.write_str("NaN"),
            Number::Real(x) if x.is_infinite() => {
                f.write_str(if *x > 0.0 { "+Inf" } else { "-Inf" })
            }
            Number::Real(x) => write!(f, "{x}"),
        }
    }
}

fn flag(b: bool) -> Number {
    Number::Count(u64::from(b))
}

fn per_mib(mib_s: f64) -> Number {
    Number::Real(mib_s * f64::from(1u32 << 20))
}

/// The per-VM gauges, each a function of the VM's status; none where it has no value.
type VmGauge = (&'static str, &'static str, fn(&VmStatus) -> Option<Number>);

const VM_GAUGES: &[VmGauge] = &[
    (
        "ftvmm_vm_protected",
        "Whether a standby holds every acknowledged checkpoint of the VM (1) or not (0).",
        |vm| Some(flag(vm.protected)),
    ),
    (
        "ftvmm_vm_epoch",
        "The VM's current checkpoint epoch.",
        |vm| Some(Number::Count(vm.epoch)),
    ),
    (
        "ftvmm_vm_epochs_per_second",
        "Checkpoints per second.",
        |vm| Some(Number::Real(vm.epochs_per_s)),
    ),
    (
        "ftvmm_vm_last_ack_age_seconds",
        "Age of the standby's last acknowledgement.",
        |vm| {
            vm.last_ack_age_ms
                .map(|ms| Number::Real(ms as f64 / 1000.0))
        },
    ),
    (
        "ftvmm_vm_dirty_bytes_per_second",
        "Guest memory dirtied per second.",
        |vm| Some(per_mib(vm.dirty_mib_s)),
    ),
    (
        "ftvmm_vm_wire_bytes_per_second",
        "Checkpoint bytes sent to the standby per second.",
        |vm| Some(per_mib(vm.wire_mib_s)),
    ),
    (
        "ftvmm_vm_resync_done_bytes",
        "Bytes of the running resynchronisation done.",
        |vm| vm.resync.as_ref().map(|r| Number::Count(r.done_bytes)),
    ),
    (
        "ftvmm_vm_resync_total_bytes",
        "Bytes the running resynchronisation copies in all.",
        |vm| vm.resync.as_ref().map(|r| Number::Count(r.total_bytes)),
    ),
];

/// Status in the Prometheus text format (0.0.4): every series a gauge labelled with the node
/// and the VM (or the peer).
pub fn render_prometheus(s: &NodeStatus) -> String {
    Prometheus(s).to_string()
}

struct Prometheus<'a>(&'a NodeStatus);

impl fmt::Display for Prometheus<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        let node = label_value(&s.node);
        let vm_labels: Vec<String> = s
            .vms
            .iter()
            .map(|vm| format!("node=\"{node}\",vm=\"{}\"", label_value(&vm.name)))
            .collect();

        let role = "ftvmm_vm_role";
        header(
            f,
            role,
            "This node's role for the VM: 1 for the role it has, 0 for the others.",
        )?;
        for (vm, labels) in s.vms.iter().zip(&vm_labels) {
            for r in Role::ALL {
                let value = flag(vm.role == r);
                writeln!(f, "{role}{{{labels},role=\"{r}\"}} {value}")?;
            }
        }
        for (name, help, value) in VM_GAUGES {
            header(f, name, help)?;
            for (vm, labels) in s.vms.iter().zip(&vm_labels) {
                if let Some(value) = value(vm) {
                    writeln!(f, "{name}{{{labels}}} {value}")?;
                }
            }
        }
        let connected = "ftvmm_peer_connected";
        header(
            f,
            connected,
            "Whether this node hears its peer (1) or not (0).",
        )?;
        let peer = label_value(&s.peer.name);
        let value = flag(s.peer.connected);
        writeln!(f, "{connected}{{node=\"{node}\",peer=\"{peer}\"}} {value}")
    }
}

fn header(f: &mut fmt::Formatter<'_>, name: &str, help: &str) -> fmt::Result {
    writeln!(f, "# HELP {name} {help}\n# TYPE {name} gauge")
}

/// A label value escaped as the text format wants: backslash, double quote and newline.
fn label_value(v: &str) -> String {
    let mut escaped = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            c => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    fn primary() -> VmStatus {
        VmStatus {
            name: "stencil".into(),
            role: Role::Primary,
            protected: true,
            why: None,
            epoch: 1234,
            epochs_per_s: 24.94,
            last_ack_age_ms: Some(3),
            dirty_mib_s: 12.3,
            wire_mib_s: 4.1,
            resync: None,
            generation: Generation {
                current: "3f2a9c01d4e5b677".into(),
                bitmap: None,
                history: vec!["1b2c3d4e5f607182".into()],
                consistent: true,
            },
            peer_role: Some(Role::Standby),
            hint: None,
            acked: 0,
            pid: None,
            last_takeover: None,
            epoch_ms_p50: Some(40.2),
            epoch_ms_p99: Some(61.7),
            epoch_ends: [
                ("max".to_string(), 1200),
                ("output".to_string(), 34),
                ("dirty".to_string(), 0),
            ]
            .into(),
        }
    }

    fn syncing_standby() -> VmStatus {
        VmStatus {
            name: "web".into(),
            role: Role::Syncing,
            protected: false,
            why: Some("syncing 47 %".into()),
            epoch: 0,
            epochs_per_s: 0.0,
            last_ack_age_ms: None,
            dirty_mib_s: 0.0,
            wire_mib_s: 85.2,
            resync: Some(Resync {
                done_bytes: 120 << 20,
                total_bytes: 256 << 20,
                rate_mib_s: 85.2,
                eta_s: Some(1.6),
                percent: 47.0,
            }),
            generation: Generation {
                current: "77aa".into(),
                bitmap: Some("3f2a9c01d4e5b677".into()),
                history: vec![],
                consistent: false,
            },
            peer_role: Some(Role::Primary),
            hint: None,
            acked: 0,
            pid: None,
            last_takeover: None,
            epoch_ms_p50: None,
            epoch_ms_p99: None,
            epoch_ends: Default::default(),
        }
    }

    fn stopped_split() -> VmStatus {
        VmStatus {
            name: "db".into(),
            role: Role::Stopped,
            protected: false,
            why: Some("split history: both nodes ran the guest after 3f2a9c01".into()),
            epoch: 88,
            epochs_per_s: 0.0,
            last_ack_age_ms: None,
            dirty_mib_s: 0.0,
            wire_mib_s: 0.0,
            resync: None,
            generation: Generation {
                current: "c0ffee0000000001".into(),
                bitmap: None,
                history: vec!["3f2a9c01d4e5b677".into()],
                consistent: true,
            },
            peer_role: Some(Role::Stopped),
            hint: Some("ftvmm discard db --config /etc/ftvmm/pair.toml --name b".into()),
            acked: 0,
            pid: None,
            last_takeover: None,
            epoch_ms_p50: None,
            epoch_ms_p99: None,
            epoch_ends: Default::default(),
        }
    }

    fn node(vms: Vec<VmStatus>) -> NodeStatus {
        NodeStatus {
            node: "a".into(),
            pid: None,
            peer: PeerStatus {
                name: "b".into(),
                connected: true,
                last_heard_ms: Some(12),
            },
            vms,
        }
    }

    #[test]
    fn json_round_trip() {
        let s = node(vec![primary(), syncing_standby(), stopped_split()]);
        let json = serde_json::to_string(&s).unwrap();
        let back: NodeStatus = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn the_json_contract() {
        let v = serde_json::to_value(node(vec![primary(), syncing_standby()])).unwrap();
        assert_eq!(v["node"], "a");
        assert_eq!(
            v["peer"],
            serde_json::json!({"name": "b", "connected": true, "last_heard_ms": 12})
        );
        let vm = &v["vms"][0];
        let keys: BTreeSet<&str> = vm.as_object().unwrap().keys().map(String::as_str).collect();
        let expected: BTreeSet<&str> = [
            "name",
            "role",
            "protected",
            "why",
            "epoch",
            "epochs_per_s",
            "last_ack_age_ms",
            "dirty_mib_s",
            "wire_mib_s",
            "resync",
            "generation",
            "peer_role",
            "hint",
            "acked",
            "pid",
            "last_takeover",
            "epoch_ms_p50",
            "epoch_ms_p99",
            "epoch_ends",
        ]
        .into();
        assert_eq!(keys, expected);
        assert_eq!(vm["name"], "stencil");
        assert_eq!(vm["role"], "primary");
        assert_eq!(vm["protected"], true);
        assert_eq!(vm["epoch"], 1234);
        assert_eq!(vm["why"], serde_json::Value::Null);
        assert_eq!(vm["peer_role"], "standby");
        assert_eq!(
            vm["generation"],
            serde_json::json!({
                "current": "3f2a9c01d4e5b677", "bitmap": null,
                "history": ["1b2c3d4e5f607182"], "consistent": true
            })
        );
        let syncing = &v["vms"][1];
        assert_eq!(syncing["role"], "syncing");
        assert_eq!(
            syncing["resync"],
            serde_json::json!({
                "done_bytes": 120u64 << 20, "total_bytes": 256u64 << 20,
                "rate_mib_s": 85.2, "eta_s": 1.6, "percent": 47.0
            })
        );
        let roles: Vec<serde_json::Value> = Role::ALL
            .iter()
            .map(|r| serde_json::to_value(r).unwrap())
            .collect();
        assert_eq!(roles, ["primary", "standby", "syncing", "stopped"]);
    }

    #[test]
    fn text_of_a_protected_primary() {
        assert_eq!(
            render_text(&node(vec![primary()])),
            "node a peer b connected\n\
             stencil role:primary protected epoch:1234 (24.9/s) last-ack:3ms dirty:12.3MiB/s wire:4.1MiB/s\n\
             \x20 peer b connected role:standby\n\
             \x20 generation current:3f2a9c01… bitmap:- consistent\n\
             \x20 epochs: p50 40ms p99 62ms; ended by max 1200, output 34\n"
        );
    }

    #[test]
    fn text_of_a_syncing_standby() {
        let mut s = node(vec![syncing_standby()]);
        s.peer.connected = false;
        s.peer.last_heard_ms = Some(4250);
        assert_eq!(
            render_text(&s),
            "node a peer b disconnected last-heard:4.2s\n\
             web role:syncing unprotected epoch:0 (0.0/s) last-ack:- dirty:0.0MiB/s wire:85.2MiB/s\n\
             \x20 peer b disconnected last-heard:4.2s role:primary\n\
             \x20 generation current:77aa bitmap:3f2a9c01… inconsistent\n\
             \x20 resync: 47.0 % 120.0/256.0 MiB at 85.2 MiB/s, eta 1.6 s\n\
             \x20 not protected: syncing 47 %\n"
        );
    }

    #[test]
    fn text_of_a_stopped_vm_with_a_split_history() {
        let mut s = node(vec![primary(), stopped_split()]);
        s.peer.connected = false;
        s.peer.last_heard_ms = None;
        let text = render_text(&s);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "node a peer b disconnected last-heard:never");
        assert!(lines[1].starts_with("stencil role:primary"), "{text}");
        assert_eq!(
            lines[5], "db      role:stopped unprotected epoch:88",
            "names aligned"
        );
        assert_eq!(
            lines[6],
            "  peer b disconnected last-heard:never role:stopped"
        );
        assert_eq!(
            lines[7],
            "  generation current:c0ffee00… bitmap:- consistent"
        );
        assert_eq!(
            lines[8],
            "  not protected: split history: both nodes ran the guest after 3f2a9c01"
        );
        assert_eq!(
            lines[9],
            "  hint: ftvmm discard db --config /etc/ftvmm/pair.toml --name b"
        );
        assert_eq!(lines.len(), 10);
        assert!(!text.contains('\x1b'), "no escapes");
        let empty = render_text(&node(vec![]));
        assert_eq!(empty, "node a peer b connected\nno VMs\n");
    }

    #[test]
    fn prometheus_text_format() {
        let mut s = node(vec![primary(), syncing_standby(), stopped_split()]);
        s.vms[2].name = "odd\"name\\\n".into();
        let text = render_prometheus(&s);
        let mut help = BTreeMap::<String, usize>::new();
        let mut kind = BTreeMap::<String, usize>::new();
        let mut samples = BTreeMap::<String, String>::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, _) = rest.split_once(' ').expect("HELP name text");
                *help.entry(name.into()).or_default() += 1;
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                assert!(rest.ends_with(" gauge"), "{line}");
                *kind
                    .entry(rest.trim_end_matches(" gauge").into())
                    .or_default() += 1;
            } else {
                // name{labels} value, the value a number.
                let (series, value) = line.rsplit_once(' ').expect("series value");
                let (name, labels) = series.split_once('{').expect("labels");
                assert!(labels.ends_with('}'), "{line}");
                assert!(
                    name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                    "{line}"
                );
                assert!(value.parse::<f64>().is_ok(), "{line}");
                assert!(help.contains_key(name), "HELP before the samples: {line}");
                samples.insert(series.to_string(), value.to_string());
            }
        }
        assert_eq!(help, kind, "every metric has HELP and TYPE");
        assert!(help.values().all(|&n| n == 1), "once each: {help:?}");
        assert_eq!(help.len(), 10);
        let get = |series: &str| samples.get(series).map(String::as_str);
        let stencil = "node=\"a\",vm=\"stencil\"";
        assert_eq!(get(&format!("ftvmm_vm_protected{{{stencil}}}")), Some("1"));
        assert_eq!(
            get(&format!("ftvmm_vm_role{{{stencil},role=\"primary\"}}")),
            Some("1")
        );
        assert_eq!(
            get(&format!("ftvmm_vm_role{{{stencil},role=\"standby\"}}")),
            Some("0")
        );
        assert_eq!(get(&format!("ftvmm_vm_epoch{{{stencil}}}")), Some("1234"));
        assert_eq!(
            get(&format!("ftvmm_vm_last_ack_age_seconds{{{stencil}}}")),
            Some("0.003")
        );
        assert_eq!(
            get(&format!("ftvmm_vm_dirty_bytes_per_second{{{stencil}}}")),
            Some((12.3 * 1048576.0f64).to_string().as_str())
        );
        assert_eq!(
            get(&format!("ftvmm_vm_resync_done_bytes{{{stencil}}}")),
            None
        );
        let web = "node=\"a\",vm=\"web\"";
        assert_eq!(
            get(&format!("ftvmm_vm_resync_total_bytes{{{web}}}")),
            Some("268435456")
        );
        assert_eq!(
            get(&format!("ftvmm_vm_role{{{web},role=\"syncing\"}}")),
            Some("1")
        );
        let odd = "node=\"a\",vm=\"odd\\\"name\\\\\\n\"";
        assert_eq!(
            get(&format!("ftvmm_vm_role{{{odd},role=\"stopped\"}}")),
            Some("1")
        );
        assert_eq!(
            get("ftvmm_peer_connected{node=\"a\",peer=\"b\"}"),
            Some("1")
        );
    }

    #[test]
    fn prometheus_spells_infinities_its_way() {
        assert_eq!(Number::Real(f64::INFINITY).to_string(), "+Inf");
        assert_eq!(Number::Real(f64::NEG_INFINITY).to_string(), "-Inf");
        assert_eq!(Number::Real(f64::NAN).to_string(), "NaN");
        assert_eq!(Number::Real(0.5).to_string(), "0.5");
    }
}
