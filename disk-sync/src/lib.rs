//! Epoch-coupled disk replication: the primary applies the guest's writes to its own image at
//! once and records them in the running epoch ([`RecordingBackend`]); the sealed epoch travels
//! with its checkpoint, and the standby applies it to its image ([`Replica`]) only when that
//! epoch commits, durably, before acknowledging it. So at takeover the standby's disk and memory
//! are from the same epoch.
//!
//! Each node also keeps a persistent [`WriteIntentBitmap`] of the blocks written since the last
//! epoch both nodes hold, so that after a crash or a takeover ([`MarkingBackend`]) a resync can
//! move only the blocks that may differ.
//!
//! Like `netbuf`, this crate plugs into `vmm` from above through the [`BlockBackend`] trait
//! that `vmm` defines; `vmm` never imports it.

mod bitmap;
mod record;
mod replica;
pub mod resync;

use std::io;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use bitmap::{bitmap_path, MarkingBackend, WriteIntentBitmap, BLOCK_SIZE};
pub use record::{EpochRecorder, RecordingBackend};
pub use replica::Replica;
#[doc(no_inline)]
pub use vmm::devices::BlockBackend;

/// One guest disk operation as it travels in its epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskOp {
    /// `data` written at byte `offset` of the image.
    Write { offset: u64, data: Vec<u8> },
    /// The guest asked for every earlier write to be durable. The standby makes each applied
    /// epoch durable anyway; the flush is kept so the epoch is the guest's exact sequence.
    Flush,
}

/// The disk operations of one sealed epoch, in the order the guest issued them.
pub type EpochWrites = Vec<DiskOp>;

/// What can go wrong replicating a disk. Each message is one line naming the offset or file,
/// because these errors end protection and are what an operator reads.
#[derive(Debug, thiserror::Error)]
pub enum DiskSyncError {
    /// The standby could not write an epoch's data (ENOSPC, EIO, ...).
    #[error("standby disk write at {offset:#x}: {source}")]
    StandbyWrite {
        offset: u64,
        #[source]
        source: io::Error,
    },
    /// An operation (from a malformed epoch, or a write the bitmap cannot cover) reaches past
    /// the end of the image.
    #[error("disk write {offset:#x}+{len} lies outside the {size:#x}-byte image")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// The standby could not make an applied epoch durable.
    #[error("fdatasync of standby disk failed: {0}")]
    StandbySync(#[source] io::Error),
    /// The standby's image cannot be opened read-write, or is not a regular file.
    #[error("cannot open standby disk {path}: {source}")]
    ReplicaOpen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The write-intent bitmap file cannot be opened, created or read.
    #[error("cannot open write-intent bitmap {path}: {source}")]
    BitmapOpen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The bitmap file exists but was made for an image of another size: its bits cannot be
    /// trusted to name the right blocks.
    #[error(
        "write-intent bitmap {path} is {len} bytes, but a {image_size}-byte image needs {expected}"
    )]
    BitmapSize {
        path: PathBuf,
        len: u64,
        expected: u64,
        image_size: u64,
    },
    /// Reading a block to resync from the running node's image failed.
    #[error("resync read at {offset:#x}: {source}")]
    ResyncRead {
        offset: u64,
        #[source]
        source: io::Error,
    },
    /// Writing bits to the bitmap file failed.
    #[error("write to write-intent bitmap {path} at byte {offset}: {source}")]
    BitmapWrite {
        path: PathBuf,
        offset: u64,
        #[source]
        source: io::Error,
    },
}

impl DiskSyncError {
    /// As an `io::Error` for the guest's request (a write refused because its bitmap mark could
    /// not be made), keeping the OS error where there is one.
    fn into_io(self) -> io::Error {
        let kind = match &self {
            DiskSyncError::StandbyWrite { source, .. }
            | DiskSyncError::StandbySync(source)
            | DiskSyncError::ReplicaOpen { source, .. }
            | DiskSyncError::BitmapOpen { source, .. }
            | DiskSyncError::BitmapWrite { source, .. }
            | DiskSyncError::ResyncRead { source, .. } => source.kind(),
            DiskSyncError::OutOfRange { .. } => io::ErrorKind::InvalidInput,
            DiskSyncError::BitmapSize { .. } => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, self)
    }
}

/// The blocks of `BLOCK_SIZE` that `offset..offset+len` overlaps, as an inclusive range of
/// block indices; `None` for an empty range (it touches no block).
/// Opens `path` read-write (creating it if `create`, never truncating); it must be a regular
/// file, whose size then means something.
fn open_regular_file(
    path: &std::path::Path,
    create: bool,
) -> io::Result<(std::fs::File, std::fs::Metadata)> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok((file, meta))
}

fn block_span(offset: u64, len: u64) -> Option<(u64, u64)> {
    if len == 0 {
        return None;
    }
    let last_byte = offset.saturating_add(len - 1);
    Some((offset / BLOCK_SIZE, last_byte / BLOCK_SIZE))
}

#[cfg(test)]
mod testutil {
    use std::io;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use vmm::cast::{u64_to_usize, usize_to_u64};
    use vmm::devices::BlockBackend;

    /// A directory under the system temp dir, removed (with its contents) on drop.
    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new(name: &str) -> TempDir {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!(
                "disk-sync-test-{}-{}-{}",
                std::process::id(),
                name,
                n
            ));
            std::fs::create_dir_all(&path).expect("create temp dir");
            TempDir(path)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// An in-memory image whose bytes the test can still see after handing the backend away.
    pub struct MemBackend {
        pub bytes: Arc<Mutex<Vec<u8>>>,
        pub flushes: Arc<AtomicUsize>,
    }

    impl MemBackend {
        pub fn new(size: usize) -> MemBackend {
            MemBackend {
                bytes: Arc::new(Mutex::new(vec![0; size])),
                flushes: Arc::new(AtomicUsize::new(0)),
            }
        }
    }

    impl BlockBackend for MemBackend {
        fn size(&self) -> u64 {
            usize_to_u64(self.bytes.lock().unwrap().len())
        }
        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            let bytes = self.bytes.lock().unwrap();
            let start = u64_to_usize(offset);
            buf.copy_from_slice(&bytes[start..start + buf.len()]);
            Ok(())
        }
        fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
            let mut bytes = self.bytes.lock().unwrap();
            let start = u64_to_usize(offset);
            bytes[start..start + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&mut self) -> io::Result<()> {
            self.flushes.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }
}
