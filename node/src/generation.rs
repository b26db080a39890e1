//! Generation identifiers, as DRBD keeps them: which committed state of a VM a node's copy
//! holds. Persisted and fsynced on every role change, they decide, when the nodes meet, whose
//! copy is newer and whether the other can catch up from the write-intent bitmaps alone, and
//! they expose histories that cannot be ordered (both nodes ran the guest alone) instead of
//! letting one silently overwrite the other.
//!
//! - `current`: the state this copy holds; both nodes of a protected pair share it.
//! - `bitmap`: set while this node runs the guest without its peer: the generation both last
//!   held, since which the bitmap marks every write.
//! - `history`: earlier generations, newest first.
//!
//! A node that goes on alone (its standby lost, or it took over) moves `current` to `bitmap`
//! and takes a new `current`; a standby that completes a resync adopts its primary's
//! `current`, and the primary, now protected, retires its `bitmap` to `history`.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Earlier generations kept.
const HISTORY: usize = 8;

/// One node's generation identifiers for one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    /// The state this node's copy holds; 0 for a copy that holds none yet (a new image).
    pub current: u64,
    pub bitmap: Option<u64>,
    pub history: Vec<u64>,
    /// False while a resync writes the image: it is neither the old state nor the new.
    pub consistent: bool,
}

impl Default for Generation {
    /// A new node's copy: nothing yet (and nothing to lose: it is consistent).
    fn default() -> Self {
        Self {
            current: 0,
            bitmap: None,
            history: Vec::new(),
            consistent: true,
        }
    }
}

/// How two nodes' copies of a VM relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    /// The same committed state (or both hold none yet).
    Same,
    /// This node's copy is newer; the peer catches up from both bitmaps.
    LocalNewer,
    /// The peer's copy is newer; this node catches up from both bitmaps.
    PeerNewer,
    /// This node's copy is newer, but its bitmap does not reach back to the peer's state:
    /// the peer needs every block.
    LocalNewerFull,
    /// The peer's copy is newer and this node needs every block.
    PeerNewerFull,
    /// Both ran the guest alone since generation `common`: neither is newer.
    Split { common: u64 },
    /// No generation in common: the images are unrelated.
    Unrelated,
}

impl Relation {
    /// Whether this node holds the newer copy.
    pub fn local_newer(self) -> bool {
        matches!(self, Relation::LocalNewer | Relation::LocalNewerFull)
    }

    /// Whether the peer holds the newer copy.
    pub fn peer_newer(self) -> bool {
        matches!(self, Relation::PeerNewer | Relation::PeerNewerFull)
    }
}

/// A new generation identifier: random, never 0.
pub fn new_id() -> u64 {
    let mut bytes = [0u8; 8];
    loop {
        // Best effort: getrandom(2) fills the buffer from the kernel's pool.
        // SAFETY: the pointer and length describe `bytes`, which lives across the call.
        let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
        let id = u64::from_le_bytes(bytes);
        if n == 8 && id != 0 {
            return id;
        }
    }
}

/// A generation identifier as status shows it.
pub fn show(id: u64) -> String {
    format!("{id:016x}")
}

impl Generation {
    /// How this node's copy (`self`) relates to the peer's.
    pub fn relate(&self, peer: &Generation) -> Relation {
        let (local, remote) = (self.current, peer.current);
        if local == remote {
            return Relation::Same;
        }
        if local == 0 {
            return Relation::PeerNewerFull;
        }
        if remote == 0 {
            return Relation::LocalNewerFull;
        }
        match (self.bitmap, peer.bitmap) {
            (Some(b), _) if b == remote => return Relation::LocalNewer,
            (_, Some(b)) if b == local => return Relation::PeerNewer,
            (Some(a), Some(b)) if a == b => return Relation::Split { common: a },
            _ => {}
        }
        let knows = |g: &Generation, id: u64| g.bitmap == Some(id) || g.history.contains(&id);
        match (knows(self, remote), knows(peer, local)) {
            (true, false) => Relation::LocalNewerFull,
            (false, true) => Relation::PeerNewerFull,
            // Histories that meet somewhere but cannot be ordered: both went their own way.
            _ => match self.ids().find(|&id| peer.ids().any(|p| p == id)) {
                Some(common) => Relation::Split { common },
                None => Relation::Unrelated,
            },
        }
    }

    /// Every generation this copy knows, newest first.
    fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        std::iter::once(self.current)
            .chain(self.bitmap)
            .chain(self.history.iter().copied())
            .filter(|&id| id != 0)
    }

    /// This node goes on running the guest without its peer (from a cold boot, a lost
    /// standby, or a takeover): the state both last held becomes the bitmap's base. A node
    /// already alone keeps its generations; a copy that held nothing starts its first.
    pub fn go_alone(&mut self) {
        if self.bitmap.is_some() {
            return;
        }
        if self.current != 0 {
            self.bitmap = Some(self.current);
        }
        self.current = new_id();
    }

    /// This node's standby holds a first checkpoint: the pair is in step again, and the
    /// bitmap's base goes to the history.
    pub fn protected(&mut self) {
        if let Some(base) = self.bitmap.take() {
            self.remember(base);
        }
    }

    /// A resync from the peer begins: until it completes this copy is inconsistent.
    pub fn begin_sync(&mut self) {
        self.consistent = false;
    }

    /// This node holds the first checkpoint of a primary whose copy is `peer`: it now holds
    /// the same state.
    pub fn synced(&mut self, peer: &Generation) {
        if self.current != 0 && self.current != peer.current {
            self.remember(self.current);
        }
        self.current = peer.current;
        self.bitmap = None;
        self.consistent = true;
    }

    /// The operator discards this copy: it holds nothing any more and takes every block from
    /// the peer.
    pub fn discard(&mut self) {
        *self = Generation::default();
    }

    fn remember(&mut self, id: u64) {
        self.history.retain(|&h| h != id);
        self.history.insert(0, id);
        self.history.truncate(HISTORY);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} is not a valid state file: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// What a node persists per VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Persisted {
    pub generation: Generation,
    /// The guest ended with this exit code: it is not started again by itself.
    pub exited: Option<i32>,
    /// This node ran the guest last (it may boot it alone when its peer does not come).
    pub was_primary: bool,
}

impl Persisted {
    /// Reads the state file at `path`; a missing file is a new node's default.
    pub fn load(path: &Path) -> Result<Self, StateError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| StateError::Parse {
                path: path.to_owned(),
                source,
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(StateError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Writes the state file durably: a temporary file, fsynced, renamed over the old one,
    /// and the directory fsynced, so that after a crash the file is the old state or the new.
    pub fn store(&self, path: &Path) -> Result<(), StateError> {
        let write_err = |source| StateError::Write {
            path: path.to_owned(),
            source,
        };
        let tmp = path.with_extension("tmp");
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| write_err(io::Error::other(e)))?;
        let mut file = File::create(&tmp).map_err(write_err)?;
        file.write_all(&bytes).map_err(write_err)?;
        file.sync_all().map_err(write_err)?;
        std::fs::rename(&tmp, path).map_err(write_err)?;
        if let Some(dir) = path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(write_err)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generation(current: u64, bitmap: Option<u64>, history: &[u64]) -> Generation {
        Generation {
            current,
            bitmap,
            history: history.to_vec(),
            consistent: true,
        }
    }

    #[test]
    fn a_node_that_went_on_alone_is_newer_than_the_one_it_left() {
        let mut a = generation(7, None, &[]);
        let b = a.clone();
        assert_eq!(a.relate(&b), Relation::Same);
        a.go_alone();
        assert_eq!(a.bitmap, Some(7));
        assert_ne!(a.current, 7);
        assert_eq!(a.relate(&b), Relation::LocalNewer);
        assert_eq!(b.relate(&a), Relation::PeerNewer);
        // Going alone twice changes nothing: the bitmap still reaches back to 7.
        let once = a.clone();
        a.go_alone();
        assert_eq!(a, once);
    }

    #[test]
    fn a_resync_makes_the_pair_the_same_again() {
        let mut a = generation(7, None, &[]);
        let mut b = a.clone();
        a.go_alone();
        b.begin_sync();
        assert!(!b.consistent);
        b.synced(&a);
        a.protected();
        assert!(b.consistent);
        assert_eq!(a.relate(&b), Relation::Same);
        assert_eq!(a.history, vec![7]);
        assert_eq!(b.history, vec![7]);
    }

    #[test]
    fn both_nodes_alone_since_one_generation_is_a_split() {
        let base = generation(7, None, &[3]);
        let (mut a, mut b) = (base.clone(), base);
        a.go_alone();
        b.go_alone();
        assert_eq!(a.relate(&b), Relation::Split { common: 7 });
        assert_eq!(b.relate(&a), Relation::Split { common: 7 });
    }

    #[test]
    fn a_newer_copy_whose_bitmap_does_not_reach_back_needs_a_full_resync() {
        // a went alone from 7, was protected again (7 retired to history) by some other
        // node, then alone again from 9: b, still at 7, needs every block.
        let a = generation(11, Some(9), &[7]);
        let b = generation(7, None, &[]);
        assert_eq!(a.relate(&b), Relation::LocalNewerFull);
        assert_eq!(b.relate(&a), Relation::PeerNewerFull);
    }

    #[test]
    fn new_and_unrelated_copies() {
        let new = Generation::default();
        let a = generation(5, None, &[2]);
        assert_eq!(new.relate(&a), Relation::PeerNewerFull);
        assert_eq!(a.relate(&new), Relation::LocalNewerFull);
        assert_eq!(new.relate(&Generation::default()), Relation::Same);
        let other = generation(6, Some(4), &[1]);
        assert_eq!(a.relate(&other), Relation::Unrelated);
        // Histories that meet at 2 but went their own ways since.
        let a2 = generation(10, Some(8), &[2]);
        let b2 = generation(11, Some(9), &[2]);
        assert_eq!(a2.relate(&b2), Relation::Split { common: 2 });
        let mut discarded = other;
        discarded.discard();
        assert_eq!(discarded.relate(&a), Relation::PeerNewerFull);
    }

    #[test]
    fn a_first_boot_starts_a_generation_without_a_bitmap() {
        let mut g = Generation::default();
        g.go_alone();
        assert_ne!(g.current, 0);
        assert_eq!(g.bitmap, None);
    }

    #[test]
    fn history_is_bounded_and_keeps_the_newest() {
        let mut g = generation(1, None, &[]);
        for id in 2..20 {
            g.remember(id);
        }
        assert_eq!(g.history.len(), HISTORY);
        assert_eq!(g.history[0], 19);
    }

    #[test]
    fn the_state_file_round_trips_and_a_missing_one_is_a_new_node() {
        let dir = std::env::temp_dir().join(format!("ftvmm-gen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vm.state");
        assert_eq!(Persisted::load(&path).unwrap(), Persisted::default());
        let state = Persisted {
            generation: generation(9, Some(8), &[7]),
            exited: Some(3),
            was_primary: true,
        };
        state.store(&path).unwrap();
        assert_eq!(Persisted::load(&path).unwrap(), state);
        std::fs::write(&path, b"{").unwrap();
        let err = Persisted::load(&path).unwrap_err().to_string();
        assert!(err.contains("is not a valid state file"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
