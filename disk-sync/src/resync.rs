//! Bringing a returning node's image up to date without stopping the guest: the node running
//! it reads the blocks that may differ ([`ResyncSource`]) and the returning node writes them
//! in place, durably in batches, clearing from its bitmap the blocks it no longer needs
//! ([`ResyncTarget`]), so that an interrupted resync resumes where it stopped.
//!
//! Which blocks may differ is the union of both nodes' write-intent bitmaps since their last
//! common checkpoint (the node running alone marked every write; the other marked the writes
//! it had not seen acknowledged), or every block when the images share no history.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vmm::cast::{u64_to_usize, usize_to_u64};

use crate::{DiskSyncError, WriteIntentBitmap, BLOCK_SIZE};

/// Runs of consecutive blocks, each at most `max` blocks long: `(first block, count)`.
pub fn runs(blocks: &BTreeSet<u64>, max: u64) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &block in blocks {
        match runs.last_mut() {
            Some((first, count)) if *first + *count == block && *count < max => *count += 1,
            _ => runs.push((block, 1)),
        }
    }
    runs
}

/// The blocks of `runs`, as produced by [`runs`].
pub fn blocks_of(runs: &[(u64, u64)]) -> BTreeSet<u64> {
    runs.iter()
        .flat_map(|&(first, count)| first..first.saturating_add(count))
        .collect()
}

/// Every block of an image of `size` bytes.
pub fn all_blocks(size: u64) -> BTreeSet<u64> {
    (0..size.div_ceil(BLOCK_SIZE)).collect()
}

/// The running node's side: reads blocks of its image through a descriptor of its own, while
/// the guest writes through the VM's (both go through the same page cache).
pub struct ResyncSource {
    file: File,
    size: u64,
}

impl ResyncSource {
    pub fn open(path: &Path) -> Result<Self, DiskSyncError> {
        let file = File::open(path).map_err(|source| DiskSyncError::ReplicaOpen {
            path: path.to_owned(),
            source,
        })?;
        let size = file
            .metadata()
            .map_err(|source| DiskSyncError::ReplicaOpen {
                path: path.to_owned(),
                source,
            })?
            .len();
        Ok(Self { file, size })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes that `blocks` cover in this image (the last block may be short).
    pub fn bytes_of(&self, blocks: &BTreeSet<u64>) -> u64 {
        blocks
            .iter()
            .map(|&b| self.size.saturating_sub(b * BLOCK_SIZE).min(BLOCK_SIZE))
            .sum()
    }

    /// The bytes of `count` blocks from `first`: the image's offset of the first byte, and the
    /// data, cut at the image's end.
    pub fn read_run(&self, first: u64, count: u64) -> Result<(u64, Vec<u8>), DiskSyncError> {
        let offset = first.saturating_mul(BLOCK_SIZE);
        let end = offset
            .saturating_add(count.saturating_mul(BLOCK_SIZE))
            .min(self.size);
        if offset >= end {
            return Err(DiskSyncError::OutOfRange {
                offset,
                len: count.saturating_mul(BLOCK_SIZE),
                size: self.size,
            });
        }
        let mut data = vec![0u8; u64_to_usize(end - offset)];
        self.file
            .read_exact_at(&mut data, offset)
            .map_err(|source| DiskSyncError::ResyncRead { offset, source })?;
        Ok((offset, data))
    }
}

/// The returning node's side: its image and the bitmap of the blocks it still needs.
pub struct ResyncTarget {
    file: File,
    size: u64,
    needed: WriteIntentBitmap,
    /// Blocks written since the last [`ResyncTarget::flush`].
    written: BTreeSet<u64>,
}

impl ResyncTarget {
    /// Opens the image at `path` to be brought up to date. Its bitmap first gains `also` (for
    /// a node whose image shares no history with its peer's: every block), durably, so that
    /// what it needs survives an interruption. What it needs is then the bitmap's blocks.
    pub fn open(
        path: &Path,
        mut bitmap: WriteIntentBitmap,
        also: &BTreeSet<u64>,
    ) -> Result<Self, DiskSyncError> {
        let (file, meta) =
            crate::open_regular_file(path, false).map_err(|source| DiskSyncError::ReplicaOpen {
                path: path.to_owned(),
                source,
            })?;
        let mut needed = bitmap.blocks();
        needed.extend(also);
        bitmap.set_exactly(&needed)?;
        bitmap.sync()?;
        Ok(Self {
            file,
            size: meta.len(),
            needed: bitmap,
            written: BTreeSet::new(),
        })
    }

    /// The blocks this image still needs.
    pub fn needed(&self) -> BTreeSet<u64> {
        self.needed.blocks()
    }

    /// Writes `data` at `offset` (block-aligned, inside the image), not yet durably.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskSyncError> {
        let len = usize_to_u64(data.len());
        let aligned = offset.is_multiple_of(BLOCK_SIZE);
        match offset.checked_add(len) {
            Some(end) if aligned && end <= self.size => {}
            _ => {
                return Err(DiskSyncError::OutOfRange {
                    offset,
                    len,
                    size: self.size,
                })
            }
        }
        self.file
            .write_all_at(data, offset)
            .map_err(|source| DiskSyncError::StandbyWrite { offset, source })?;
        if let Some((first, last)) = crate::block_span(offset, len) {
            self.written.extend(first..=last);
        }
        Ok(())
    }

    /// Makes what was written durable, then clears it from the bitmap (durably too); returns
    /// the blocks that this made durable, for the source to clear from its own bitmap.
    pub fn flush(&mut self) -> Result<BTreeSet<u64>, DiskSyncError> {
        if self.written.is_empty() {
            return Ok(BTreeSet::new());
        }
        self.file.sync_data().map_err(DiskSyncError::StandbySync)?;
        let done = std::mem::take(&mut self.written);
        self.needed.clear(&done)?;
        self.needed.sync()?;
        Ok(done)
    }

    /// The bitmap, for the node once it is a standby (it marks what a takeover writes).
    pub fn into_bitmap(self) -> WriteIntentBitmap {
        self.needed
    }

    /// Bytes written since the last flush.
    pub fn pending_bytes(&self) -> u64 {
        usize_to_u64(self.written.len()) * BLOCK_SIZE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitmap_path;
    use crate::testutil::TempDir;

    fn set(blocks: &[u64]) -> BTreeSet<u64> {
        blocks.iter().copied().collect()
    }

    #[test]
    fn runs_join_consecutive_blocks_up_to_a_length() {
        assert_eq!(
            runs(&set(&[1, 2, 3, 7, 8, 20]), 16),
            vec![(1, 3), (7, 2), (20, 1)]
        );
        assert_eq!(
            runs(&set(&[0, 1, 2, 3, 4]), 2),
            vec![(0, 2), (2, 2), (4, 1)]
        );
        assert_eq!(blocks_of(&runs(&set(&[5, 6, 9]), 16)), set(&[5, 6, 9]));
        assert_eq!(all_blocks(3 * BLOCK_SIZE + 1), set(&[0, 1, 2, 3]));
    }

    #[test]
    fn a_resync_copies_blocks_and_an_interrupted_one_still_needs_the_rest() {
        let dir = TempDir::new("resync");
        let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
        let size = 4 * BLOCK_SIZE + 100;
        let mut content = vec![0u8; u64_to_usize(size)];
        for (i, b) in content.iter_mut().enumerate() {
            *b = (i % 251).to_le_bytes()[0];
        }
        std::fs::write(&src, &content).unwrap();
        std::fs::write(&dst, vec![0u8; content.len()]).unwrap();

        let source = ResyncSource::open(&src).unwrap();
        let bitmap = WriteIntentBitmap::open(&bitmap_path(&dst), size).unwrap();
        let mut target = ResyncTarget::open(&dst, bitmap, &all_blocks(size)).unwrap();
        assert_eq!(target.needed(), set(&[0, 1, 2, 3, 4]));
        assert_eq!(source.bytes_of(&target.needed()), size);
        // Blocks 0-1 arrive and are made durable; then the target dies.
        let (offset, data) = source.read_run(0, 2).unwrap();
        target.write(offset, &data).unwrap();
        assert_eq!(target.flush().unwrap(), set(&[0, 1]));
        drop(target);

        // Reopened, it needs only the rest; the last block is short.
        let bitmap = WriteIntentBitmap::open(&bitmap_path(&dst), size).unwrap();
        let mut target = ResyncTarget::open(&dst, bitmap, &BTreeSet::new()).unwrap();
        assert_eq!(target.needed(), set(&[2, 3, 4]));
        for (first, count) in runs(&target.needed(), 2) {
            let (offset, data) = source.read_run(first, count).unwrap();
            target.write(offset, &data).unwrap();
        }
        assert_eq!(target.flush().unwrap(), set(&[2, 3, 4]));
        assert!(target.needed().is_empty());
        assert_eq!(std::fs::read(&dst).unwrap(), content);
    }

    #[test]
    fn writes_outside_the_image_or_unaligned_are_refused() {
        let dir = TempDir::new("resync-range");
        let dst = dir.path().join("dst.img");
        std::fs::write(&dst, vec![0u8; u64_to_usize(2 * BLOCK_SIZE)]).unwrap();
        let bitmap = WriteIntentBitmap::open(&bitmap_path(&dst), 2 * BLOCK_SIZE).unwrap();
        let mut target = ResyncTarget::open(&dst, bitmap, &BTreeSet::new()).unwrap();
        assert!(target.write(2 * BLOCK_SIZE, b"x").is_err());
        assert!(target.write(1, b"x").is_err());
        assert!(target.write(BLOCK_SIZE, &[1; 10]).is_ok());
    }
}
