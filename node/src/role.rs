//! The role of one VM on one node, as a state machine whose transitions are a pure function of
//! events: what the peer's daemon says, what this node's VM process reports, timers and
//! operator commands. It returns the actions the daemon carries out, in order (persisting the
//! generation identifiers comes before anything that acts on them). Nothing here touches KVM,
//! the network or the disk, so every path is unit-tested.
//!
//! Arbitration (next): a node will need current ownership, a fencing token from a witness or
//! etcd, before it boots or takes over and while it releases output. That fits as one more
//! input (`Event::Owned`/`Event::OwnershipLost`) gating the `Boot` and takeover paths below;
//! the peer link already carries each node's view, where the token will travel.

use serde::{Deserialize, Serialize};

use crate::generation::{show, Generation, Persisted, Relation};

/// Where the VM stands on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum Role {
    /// Not running here; `why` says what it waits for.
    Stopped { why: Stopped },
    /// A VM process is booting the guest here.
    Booting,
    /// A VM process receives the peer's resync: this copy is inconsistent until the first
    /// checkpoint commits.
    Syncing,
    /// This node holds a committed checkpoint of the peer's guest and takes over if the peer
    /// dies.
    Standby,
    /// The guest runs here; `protected` while the peer's standby holds its checkpoints.
    Primary { protected: bool },
}

/// Why a VM is not running on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", content = "detail", rename_all = "kebab-case")]
pub enum Stopped {
    /// The daemon has just started and has not heard from the peer yet.
    WaitingForPeer,
    /// The peer holds the newer copy and is to run the guest; this node then resyncs from it.
    PeerHasNewer,
    /// This node's copy is inconsistent (a resync was interrupted) and only the peer's can
    /// run the guest.
    Inconsistent,
    /// Both nodes ran the guest alone since the generation named: an operator decides which
    /// copy to keep.
    SplitHistory(String),
    /// The copies share no history.
    Unrelated,
    /// The peer runs the guest from older data than this node holds.
    PeerBehind,
    /// The guest ended with this exit code.
    Exited(i32),
    /// The VM process failed; it is retried when the peer is heard from again.
    Failed(String),
    /// This node was deposed: the peer took over.
    Deposed,
}

/// What the peer's daemon says about this VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerView {
    pub role: Role,
    pub generation: Generation,
    /// The port the peer's standby VM process listens on for this node's primary.
    pub standby_port: Option<u16>,
}

/// What this node's VM process reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum WorkerEvent {
    /// The guest booted and runs alone.
    Booted,
    /// The standby process listens for the peer's primary on `port`.
    Listening { port: u16 },
    /// The standby holds a first committed checkpoint.
    Synced,
    /// This primary's standby holds a first checkpoint.
    Protected,
    /// This primary lost its standby; the guest runs on alone.
    Unprotected { reason: String },
    /// This standby took over: the guest runs here, alone.
    TookOver {
        figures: crate::status::TakeoverFigures,
    },
    /// The peer took over from this primary; it stopped and released nothing more.
    Deposed,
    /// A swap: this primary handed the guest over at a checkpoint it holds, and stands by.
    SwappedOut,
    /// A swap: this standby resumed the guest, protected at once by the old primary.
    SwappedIn,
    /// The guest ended with this code (on the primary, which told the standby).
    Exited { code: i32 },
    /// The primary continues without this standby.
    Goodbye,
    /// The VM process ended without any of the above (crash, refused handshake, ...).
    Failed { reason: String },
}

/// What the machine sees.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The peer's daemon said this (on connecting, and whenever its view changes).
    Peer(PeerView),
    /// The peer's daemon is not reachable.
    PeerGone,
    /// The daemon waited for the peer as long as it waits at start, in vain.
    PeerWaitOver,
    /// This node's VM process reported.
    Worker(WorkerEvent),
    /// The operator discards this node's copy: it holds nothing any more and takes every
    /// block from the peer.
    Discard,
}

/// What the daemon does, in this order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write the persisted state (fsynced) before anything acts on it.
    Persist,
    /// Start a VM process that boots the guest alone.
    Boot,
    /// Start a VM process that stands by for the peer's primary; its image needs every block
    /// if `full`.
    Listen { full: bool },
    /// Tell this node's primary VM process to protect the guest with the peer's standby,
    /// listening on `port`.
    Protect { port: u16 },
    /// Tell the peer what this node's view is now.
    Publish,
}

/// One VM's role on this node, and what it persists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    pub role: Role,
    pub persisted: Persisted,
    /// Whether this node is the VM's preferred node (it runs the guest when both copies are
    /// the same).
    pub preferred: bool,
    /// The port this node's standby process listens on, once it does.
    pub standby_port: Option<u16>,
    /// The last view the peer published.
    pub peer: Option<PeerView>,
    /// The standby port this node's primary was last told to protect with.
    protecting: Option<u16>,
}

impl Machine {
    pub fn new(persisted: Persisted, preferred: bool) -> Self {
        let why = match persisted.exited {
            Some(code) => Stopped::Exited(code),
            None => Stopped::WaitingForPeer,
        };
        Self {
            role: Role::Stopped { why },
            persisted,
            preferred,
            standby_port: None,
            peer: None,
            protecting: None,
        }
    }

    /// What this node tells the peer.
    pub fn view(&self) -> PeerView {
        PeerView {
            role: self.role.clone(),
            generation: self.persisted.generation.clone(),
            standby_port: self.standby_port,
        }
    }

    /// Whether the peer runs the guest.
    fn peer_runs(&self) -> bool {
        matches!(
            self.peer.as_ref().map(|p| &p.role),
            Some(Role::Primary { .. } | Role::Booting)
        )
    }

    /// Handles `event`; returns what the daemon must do, in order.
    pub fn step(&mut self, event: Event) -> Vec<Action> {
        let before = self.view();
        let mut actions = match event {
            Event::Peer(view) => {
                self.peer = Some(view);
                self.decide()
            }
            Event::PeerGone => {
                // The replication link, not the daemons' link, says whether a pair is broken:
                // a standby takes over when its primary's link dies, not when a daemon does.
                self.peer = None;
                Vec::new()
            }
            Event::PeerWaitOver => self.peer_wait_over(),
            Event::Worker(report) => self.worker(report),
            Event::Discard => self.discard(),
        };
        if self.view() != before && !actions.contains(&Action::Publish) {
            actions.push(Action::Publish);
        }
        actions
    }

    /// Decides, from the peer's view, what a stopped VM does, and whether a primary alone can
    /// be protected by the peer's standby.
    fn decide(&mut self) -> Vec<Action> {
        let Some(peer) = self.peer.clone() else {
            return Vec::new();
        };
        match &self.role {
            Role::Primary { protected: false } => match (&peer.role, peer.standby_port) {
                (Role::Syncing, Some(port)) if self.protecting != Some(port) => {
                    self.protecting = Some(port);
                    vec![Action::Protect { port }]
                }
                _ => Vec::new(),
            },
            // The guest ended: it is not started again by itself.
            Role::Stopped {
                why: Stopped::Exited(_),
            } => Vec::new(),
            Role::Stopped { .. } => self.stopped_meets(&peer),
            _ => Vec::new(),
        }
    }

    /// A stopped VM hears from the peer: sync from the peer that runs the guest, or, when
    /// neither runs it, run it here if this copy is the newer one (or the same and this node
    /// preferred).
    fn stopped_meets(&mut self, peer: &PeerView) -> Vec<Action> {
        let local = &self.persisted.generation;
        let relation = local.relate(&peer.generation);
        if let Some(why) = refusal(relation) {
            return self.stop(why);
        }
        if self.peer_runs() {
            return match relation {
                Relation::LocalNewer | Relation::LocalNewerFull => self.stop(Stopped::PeerBehind),
                Relation::PeerNewerFull => self.listen(true),
                _ => self.listen(false),
            };
        }
        if matches!(peer.role, Role::Syncing | Role::Standby) {
            // Transitional: the peer still stands by for a primary that is gone; its own VM
            // process ends and it publishes again.
            return Vec::new();
        }
        if let Role::Stopped {
            why: Stopped::Exited(code),
        } = peer.role
        {
            // The guest ended on the pair while this node was away.
            self.persisted.exited = Some(code);
            let mut actions = vec![Action::Persist];
            actions.extend(self.stop(Stopped::Exited(code)));
            return actions;
        }
        let peer_consistent = peer.generation.consistent;
        let run_here = if !local.consistent {
            false
        } else if !peer_consistent {
            true
        } else {
            match relation {
                Relation::LocalNewer | Relation::LocalNewerFull => true,
                Relation::Same => self.preferred,
                _ => false,
            }
        };
        if run_here {
            return self.boot();
        }
        if local.consistent {
            self.stop(Stopped::PeerHasNewer)
        } else {
            self.stop(Stopped::Inconsistent)
        }
    }

    /// No peer came: a node that ran the guest last (or the preferred node of a new pair)
    /// runs it alone; any other waits, so that two nodes cut off from each other do not both
    /// start it from stale copies.
    fn peer_wait_over(&mut self) -> Vec<Action> {
        if self.peer.is_some() {
            return Vec::new();
        }
        let Role::Stopped {
            why: Stopped::WaitingForPeer,
        } = self.role
        else {
            return Vec::new();
        };
        let g = &self.persisted.generation;
        let new_pair = g.current == 0 && self.preferred;
        if g.consistent && (self.persisted.was_primary || new_pair) {
            return self.boot();
        }
        Vec::new()
    }

    fn worker(&mut self, report: WorkerEvent) -> Vec<Action> {
        match report {
            WorkerEvent::Booted => {
                self.role = Role::Primary { protected: false };
                self.decide()
            }
            WorkerEvent::Listening { port } => {
                self.standby_port = Some(port);
                Vec::new()
            }
            WorkerEvent::Synced => {
                let Some(peer) = &self.peer else {
                    // The primary's daemon is out of reach, its VM process is not: this copy
                    // holds its checkpoint all the same. Adopted when the peer is heard from.
                    self.role = Role::Standby;
                    return Vec::new();
                };
                self.persisted.generation.synced(&peer.generation);
                self.persisted.was_primary = false;
                self.role = Role::Standby;
                vec![Action::Persist]
            }
            WorkerEvent::Protected => {
                self.persisted.generation.protected();
                self.role = Role::Primary { protected: true };
                vec![Action::Persist]
            }
            WorkerEvent::Unprotected { .. } => {
                self.persisted.generation.go_alone();
                self.protecting = None;
                self.role = Role::Primary { protected: false };
                let mut actions = vec![Action::Persist];
                actions.extend(self.decide());
                actions
            }
            WorkerEvent::TookOver { .. } => {
                self.persisted.generation.go_alone();
                self.persisted.was_primary = true;
                self.standby_port = None;
                self.protecting = None;
                self.role = Role::Primary { protected: false };
                let mut actions = vec![Action::Persist];
                actions.extend(self.decide());
                actions
            }
            WorkerEvent::SwappedOut => {
                self.persisted.was_primary = false;
                self.protecting = None;
                self.role = Role::Standby;
                vec![Action::Persist]
            }
            WorkerEvent::SwappedIn => {
                self.persisted.was_primary = true;
                self.standby_port = None;
                self.role = Role::Primary { protected: true };
                vec![Action::Persist]
            }
            WorkerEvent::Deposed => {
                self.persisted.was_primary = false;
                self.protecting = None;
                let mut actions = vec![Action::Persist];
                actions.extend(self.stop(Stopped::Deposed));
                actions.extend(self.decide());
                actions
            }
            WorkerEvent::Exited { code } => {
                self.persisted.exited = Some(code);
                self.standby_port = None;
                self.protecting = None;
                let mut actions = vec![Action::Persist];
                actions.extend(self.stop(Stopped::Exited(code)));
                actions
            }
            WorkerEvent::Goodbye => {
                self.standby_port = None;
                let mut actions = self.stop(Stopped::PeerHasNewer);
                actions.extend(self.decide());
                actions
            }
            WorkerEvent::Failed { reason } => {
                self.standby_port = None;
                self.protecting = None;
                if self.role == Role::Syncing {
                    // The resync stopped half way (its primary died, most often): this copy
                    // can run nothing; it resumes when the peer runs the guest again.
                    tracing::warn!("resync interrupted: {reason}");
                    return self.stop(Stopped::Inconsistent);
                }
                self.stop(Stopped::Failed(reason))
            }
        }
    }

    fn discard(&mut self) -> Vec<Action> {
        if !matches!(self.role, Role::Stopped { .. }) {
            return Vec::new();
        }
        self.persisted.generation.discard();
        self.persisted.exited = None;
        self.persisted.was_primary = false;
        let mut actions = vec![Action::Persist];
        actions.extend(self.stop(Stopped::WaitingForPeer));
        actions.extend(self.decide());
        actions
    }

    fn stop(&mut self, why: Stopped) -> Vec<Action> {
        self.role = Role::Stopped { why };
        Vec::new()
    }

    fn boot(&mut self) -> Vec<Action> {
        self.persisted.generation.go_alone();
        self.persisted.was_primary = true;
        self.persisted.exited = None;
        self.role = Role::Booting;
        vec![Action::Persist, Action::Boot]
    }

    fn listen(&mut self, full: bool) -> Vec<Action> {
        // A copy already inconsistent is mid-resync: its bitmap names what it still needs,
        // every block included if it started from nothing, so nothing done is sent again.
        let full = full && self.persisted.generation.consistent;
        self.persisted.generation.begin_sync();
        self.persisted.was_primary = false;
        self.role = Role::Syncing;
        self.standby_port = None;
        vec![Action::Persist, Action::Listen { full }]
    }

    /// Why this VM is not protected, for status; None when it is.
    pub fn why_unprotected(&self) -> Option<String> {
        Some(match &self.role {
            Role::Primary { protected: true } | Role::Standby => return None,
            Role::Primary { protected: false } => match self.peer.as_ref().map(|p| &p.role) {
                None => "no peer".into(),
                Some(Role::Syncing) => "peer syncing".into(),
                Some(Role::Stopped {
                    why: why @ (Stopped::SplitHistory(_) | Stopped::Unrelated | Stopped::PeerBehind),
                }) => format!("peer refused: {}", stopped_why(why)),
                Some(_) => "the peer is not a standby yet".into(),
            },
            Role::Booting => "booting".into(),
            Role::Syncing => "syncing".into(),
            Role::Stopped { why } => stopped_why(why),
        })
    }
}

/// Why a stopped VM is stopped, as status says it.
fn stopped_why(why: &Stopped) -> String {
    match why {
        Stopped::WaitingForPeer => "waiting for the peer".into(),
        Stopped::PeerHasNewer => "the peer holds the newer copy".into(),
        Stopped::Inconsistent => "this copy is inconsistent (a resync was interrupted)".into(),
        Stopped::SplitHistory(common) => {
            format!("split history: both nodes ran the guest alone since generation {common}")
        }
        Stopped::Unrelated => "unrelated images: the copies share no history".into(),
        Stopped::PeerBehind => {
            "the peer runs the guest from older data than this node holds".into()
        }
        Stopped::Exited(code) => format!("the guest exited with {code}"),
        Stopped::Failed(reason) => format!("the VM process failed: {reason}"),
        Stopped::Deposed => "deposed: the peer took over".into(),
    }
}

/// The relations no node may resolve by itself.
fn refusal(relation: Relation) -> Option<Stopped> {
    match relation {
        Relation::Split { common } => Some(Stopped::SplitHistory(show(common))),
        Relation::Unrelated => Some(Stopped::Unrelated),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gen(current: u64, bitmap: Option<u64>) -> Generation {
        Generation {
            current,
            bitmap,
            history: Vec::new(),
            consistent: true,
        }
    }

    fn persisted(g: Generation, was_primary: bool) -> Persisted {
        Persisted {
            generation: g,
            exited: None,
            was_primary,
        }
    }

    fn view(role: Role, g: Generation, port: Option<u16>) -> Event {
        Event::Peer(PeerView {
            role,
            generation: g,
            standby_port: port,
        })
    }

    fn took_over() -> WorkerEvent {
        WorkerEvent::TookOver {
            figures: crate::status::TakeoverFigures {
                epoch: 7,
                detection_ms: 1.0,
                restore_ms: 1.0,
                held_frames: 0,
                held_console_bytes: 0,
                reason: "test".into(),
            },
        }
    }

    const STOPPED: Role = Role::Stopped {
        why: Stopped::WaitingForPeer,
    };

    #[test]
    fn a_new_pair_boots_on_the_preferred_node_and_the_other_syncs_every_block() {
        let mut a = Machine::new(Persisted::default(), true);
        let mut b = Machine::new(Persisted::default(), false);
        assert_eq!(
            a.step(view(STOPPED, Generation::default(), None)),
            vec![Action::Persist, Action::Boot, Action::Publish]
        );
        assert_eq!(a.role, Role::Booting);
        assert_ne!(a.persisted.generation.current, 0);
        // b, told the same, waits for a.
        b.step(view(STOPPED, Generation::default(), None));
        assert_eq!(
            b.role,
            Role::Stopped {
                why: Stopped::PeerHasNewer
            }
        );
        a.step(Event::Worker(WorkerEvent::Booted));
        assert_eq!(a.role, Role::Primary { protected: false });
        // b hears that a runs it: it needs every block.
        assert_eq!(
            b.step(Event::Peer(a.view())),
            vec![
                Action::Persist,
                Action::Listen { full: true },
                Action::Publish
            ]
        );
        assert!(!b.persisted.generation.consistent);
        b.step(Event::Worker(WorkerEvent::Listening { port: 4000 }));
        assert_eq!(
            a.step(Event::Peer(b.view())),
            vec![Action::Protect { port: 4000 }]
        );
        // A repeated view does not protect twice.
        assert!(a.step(Event::Peer(b.view())).is_empty());
        assert_eq!(
            b.step(Event::Worker(WorkerEvent::Synced)),
            vec![Action::Persist, Action::Publish]
        );
        assert_eq!(
            a.step(Event::Worker(WorkerEvent::Protected)),
            vec![Action::Persist, Action::Publish]
        );
        assert_eq!(b.role, Role::Standby);
        assert_eq!(
            a.persisted.generation.relate(&b.persisted.generation),
            Relation::Same
        );
        assert!(b.persisted.generation.consistent);
        assert_eq!(a.why_unprotected(), None);
    }

    /// A protected pair: a primary, b its standby, both at generation 7.
    fn protected_pair() -> (Machine, Machine) {
        let mut a = Machine::new(persisted(gen(7, None), true), true);
        let mut b = Machine::new(persisted(gen(7, None), false), false);
        a.role = Role::Primary { protected: true };
        b.role = Role::Standby;
        a.peer = Some(b.view());
        b.peer = Some(a.view());
        (a, b)
    }

    #[test]
    fn a_standby_that_took_over_resyncs_the_returning_node_from_both_bitmaps() {
        let (_a, mut b) = protected_pair();
        b.step(Event::PeerGone);
        assert_eq!(
            b.step(Event::Worker(took_over())),
            vec![Action::Persist, Action::Publish]
        );
        assert_eq!(b.persisted.generation.bitmap, Some(7));
        assert!(b.persisted.was_primary);
        // a restarts from its state file: it was primary at generation 7.
        let mut a = Machine::new(persisted(gen(7, None), true), true);
        assert_eq!(
            a.step(Event::Peer(b.view())),
            vec![
                Action::Persist,
                Action::Listen { full: false },
                Action::Publish
            ]
        );
        a.step(Event::Worker(WorkerEvent::Listening { port: 5000 }));
        assert_eq!(
            b.step(Event::Peer(a.view())),
            vec![Action::Protect { port: 5000 }]
        );
    }

    #[test]
    fn a_sync_interrupted_by_the_primarys_death_leaves_a_node_that_never_runs_the_guest() {
        let mut b = Machine::new(persisted(gen(7, Some(5)), true), false);
        b.role = Role::Primary { protected: false };
        let mut a = Machine::new(persisted(gen(5, None), false), true);
        a.step(Event::Peer(b.view()));
        assert_eq!(a.role, Role::Syncing);
        a.step(Event::Worker(WorkerEvent::Failed {
            reason: "the primary was lost before its first checkpoint".into(),
        }));
        assert_eq!(
            a.role,
            Role::Stopped {
                why: Stopped::Inconsistent
            }
        );
        // a's daemon restarts: its copy is inconsistent, b's daemon is gone for good.
        let mut a = Machine::new(a.persisted.clone(), true);
        assert!(!a.persisted.generation.consistent);
        assert!(a.step(Event::PeerWaitOver).is_empty());
        // b comes back stopped, not running the guest: b boots it, a waits for it.
        let mut b = Machine::new(b.persisted.clone(), false);
        a.step(view(STOPPED, b.persisted.generation.clone(), None));
        assert_eq!(
            a.role,
            Role::Stopped {
                why: Stopped::Inconsistent
            }
        );
        assert_eq!(
            b.step(Event::Peer(a.view())),
            vec![Action::Persist, Action::Boot, Action::Publish]
        );
        // Once b runs it, a resumes its resync: from its bitmap, without starting over.
        b.step(Event::Worker(WorkerEvent::Booted));
        assert_eq!(
            a.step(Event::Peer(b.view())),
            vec![
                Action::Persist,
                Action::Listen { full: false },
                Action::Publish
            ]
        );
    }

    #[test]
    fn histories_that_cannot_be_ordered_are_refused_until_a_copy_is_discarded() {
        let mut a = Machine::new(persisted(gen(8, Some(7)), true), true);
        let b_gen = gen(9, Some(7));
        assert!(a
            .step(view(
                Role::Primary { protected: false },
                b_gen.clone(),
                None
            ))
            .iter()
            .all(|a| *a == Action::Publish));
        assert!(matches!(
            a.role,
            Role::Stopped {
                why: Stopped::SplitHistory(_)
            }
        ));
        assert!(a.why_unprotected().unwrap().starts_with("split history"));
        // The operator keeps b's copy: a discards its own and takes every block.
        assert_eq!(
            a.step(Event::Discard),
            vec![
                Action::Persist,
                Action::Persist,
                Action::Listen { full: true },
                Action::Publish
            ]
        );
    }

    #[test]
    fn unrelated_copies_are_refused() {
        let mut a = Machine::new(persisted(gen(3, None), true), true);
        a.step(view(STOPPED, gen(4, None), None));
        assert_eq!(
            a.role,
            Role::Stopped {
                why: Stopped::Unrelated
            }
        );
    }

    #[test]
    fn a_lost_standby_makes_the_primary_go_on_alone_and_protect_again_later() {
        let (mut a, mut b) = protected_pair();
        assert_eq!(
            a.step(Event::Worker(WorkerEvent::Unprotected {
                reason: "silent".into()
            })),
            vec![Action::Persist, Action::Publish]
        );
        assert_eq!(a.persisted.generation.bitmap, Some(7));
        // b, told goodbye, knows a runs the guest: it resyncs from both bitmaps at once.
        assert_eq!(
            b.step(Event::Worker(WorkerEvent::Goodbye)),
            vec![
                Action::Persist,
                Action::Listen { full: false },
                Action::Publish
            ]
        );
        assert!(b.step(Event::Peer(a.view())).is_empty());
    }

    #[test]
    fn a_node_waits_for_its_peer_unless_it_ran_the_guest_last() {
        let mut standby = Machine::new(persisted(gen(7, None), false), false);
        assert!(standby.step(Event::PeerWaitOver).is_empty());
        let mut primary = Machine::new(persisted(gen(7, None), true), false);
        assert_eq!(
            primary.step(Event::PeerWaitOver),
            vec![Action::Persist, Action::Boot, Action::Publish]
        );
        let mut new_preferred = Machine::new(Persisted::default(), true);
        assert_eq!(new_preferred.step(Event::PeerWaitOver)[1], Action::Boot);
    }

    #[test]
    fn a_guest_that_exited_is_not_started_again() {
        let (mut a, mut b) = protected_pair();
        a.step(Event::Worker(WorkerEvent::Exited { code: 0 }));
        b.step(Event::Worker(WorkerEvent::Exited { code: 0 }));
        assert_eq!(a.persisted.exited, Some(0));
        assert!(a.step(Event::Peer(b.view())).is_empty());
        let mut a = Machine::new(a.persisted.clone(), true);
        assert_eq!(
            a.role,
            Role::Stopped {
                why: Stopped::Exited(0)
            }
        );
        assert!(a.step(Event::PeerWaitOver).is_empty());
        assert!(a.step(Event::Peer(b.view())).is_empty());
    }

    #[test]
    fn a_node_that_missed_the_guests_end_learns_it_from_its_peer() {
        let mut a = Machine::new(persisted(gen(7, None), false), false);
        let b = Role::Stopped {
            why: Stopped::Exited(3),
        };
        a.step(view(b, gen(7, None), None));
        assert_eq!(a.persisted.exited, Some(3));
    }

    #[test]
    fn the_peer_running_older_data_is_refused() {
        let mut a = Machine::new(persisted(gen(9, Some(7)), true), true);
        a.step(view(Role::Primary { protected: false }, gen(7, None), None));
        assert_eq!(
            a.role,
            Role::Stopped {
                why: Stopped::PeerBehind
            }
        );
    }

    #[test]
    fn a_deposed_primary_resyncs_from_the_node_that_took_over() {
        let (mut a, mut b) = protected_pair();
        b.step(Event::Worker(took_over()));
        let actions = a.step(Event::Worker(WorkerEvent::Deposed));
        assert_eq!(actions[0], Action::Persist);
        assert_eq!(
            a.step(Event::Peer(b.view())),
            vec![
                Action::Persist,
                Action::Listen { full: false },
                Action::Publish
            ]
        );
    }
}
