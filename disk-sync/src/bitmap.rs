//! The persistent write-intent bitmap, and [`MarkingBackend`] for a node running alone.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vmm::cast::{u64_to_usize, usize_to_u64};
use vmm::devices::BlockBackend;

use crate::{block_span, DiskSyncError};

/// Granularity of the write-intent bitmap: one bit covers this many bytes of the image. Coarse
/// enough that the bitmap stays small (2 KiB of file per GiB of image) and most marks find their
/// bit already set (no file write); fine enough that a resync copies little that did not change.
pub const BLOCK_SIZE: u64 = 64 * 1024;

/// Where the bitmap of `image` lives: beside it, as `<image>.ftvmm-bitmap`, so that it is found
/// from the image's path alone after a crash.
pub fn bitmap_path(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(".ftvmm-bitmap");
    PathBuf::from(name)
}

/// Persistent write-intent bitmap: one bit per [`BLOCK_SIZE`] block of the image, in the file
/// [`bitmap_path`]`(image)`, so that after a crash the blocks that may differ between the nodes
/// are known. Bit `b % 8` of byte `b / 8` stands for block `b`; the file is exactly
/// `ceil(blocks / 8)` bytes.
///
/// Durability: bits are written with `pwrite` and never fsynced. That is enough for the failure
/// this guards against in the replication path, the VMM process dying (killed, crashed): the
/// bits are in the kernel's page cache before the data write they cover is issued, and the
/// kernel writes them back whatever happens to the process. A *host* crash or power loss could
/// lose a mark whose data write reached the disk; covering that would need an fsync of the
/// bitmap before each newly marked block's data write, which this does not pay for.
#[derive(Debug)]
pub struct WriteIntentBitmap {
    path: PathBuf,
    file: File,
    image_size: u64,
    blocks: u64,
    bits: Vec<u8>,
}

impl WriteIntentBitmap {
    /// Opens (creating, sized for `image_size`) the bitmap file; existing bits are kept
    /// (loaded). A file sized for another image is refused rather than trusted.
    pub fn open(path: &Path, image_size: u64) -> Result<Self, DiskSyncError> {
        let open_err = |source: io::Error| DiskSyncError::BitmapOpen {
            path: path.to_owned(),
            source,
        };
        let blocks = image_size.div_ceil(BLOCK_SIZE);
        let expected = blocks.div_ceil(8);
        let expected_len = usize::try_from(expected).map_err(|_| {
            open_err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "image too large for an in-memory bitmap",
            ))
        })?;
        let (file, meta) = crate::open_regular_file(path, true).map_err(open_err)?;
        let len = meta.len();
        let mut bits = vec![0u8; expected_len];
        if len == 0 {
            // New (or created by a run that died before sizing it): all clear.
            file.set_len(expected).map_err(open_err)?;
        } else if len != expected {
            return Err(DiskSyncError::BitmapSize {
                path: path.to_owned(),
                len,
                expected,
                image_size,
            });
        } else {
            file.read_exact_at(&mut bits, 0).map_err(open_err)?;
        }
        Ok(WriteIntentBitmap {
            path: path.to_owned(),
            file,
            image_size,
            blocks,
            bits,
        })
    }

    /// Sets the bits of every block overlapping `offset..offset+len` and writes the changed
    /// bytes to the file (pwrite) BEFORE returning, so the mark is in the file before the data
    /// write it covers is issued. Already-set blocks cost no file write. A range outside the
    /// image is refused (nothing is marked), and so should its write be.
    pub fn mark(&mut self, offset: u64, len: u64) -> Result<(), DiskSyncError> {
        let out_of_range = DiskSyncError::OutOfRange {
            offset,
            len,
            size: self.image_size,
        };
        match offset.checked_add(len) {
            Some(end) if end <= self.image_size => {}
            _ => return Err(out_of_range),
        }
        let Some((first, last)) = block_span(offset, len) else {
            return Ok(());
        };
        self.update(first..=last, true)
    }

    /// Replaces the set with exactly `blocks` and writes the whole bitmap (for a resync that
    /// has established which blocks still differ).
    pub fn set_exactly(&mut self, blocks: &BTreeSet<u64>) -> Result<(), DiskSyncError> {
        let mut bits = vec![0u8; self.bits.len()];
        for &block in blocks {
            if block >= self.blocks {
                return Err(DiskSyncError::OutOfRange {
                    offset: block.saturating_mul(BLOCK_SIZE),
                    len: BLOCK_SIZE,
                    size: self.image_size,
                });
            }
            // In range: block / 8 < bits.len(), which is a usize.
            bits[u64_to_usize(block / 8)] |= 1 << (block % 8);
        }
        self.write_bytes(0, &bits)
    }

    /// Makes the bits written so far durable (for a resync target, whose bits name what it
    /// still needs and must survive a host crash).
    pub fn sync(&self) -> Result<(), DiskSyncError> {
        self.file
            .sync_data()
            .map_err(|source| DiskSyncError::BitmapWrite {
                path: self.path.clone(),
                offset: 0,
                source,
            })
    }

    /// Block indices currently set.
    pub fn blocks(&self) -> BTreeSet<u64> {
        let mut set = BTreeSet::new();
        for (i, &byte) in self.bits.iter().enumerate() {
            if byte == 0 {
                continue;
            }
            for bit in 0..8 {
                let block = usize_to_u64(i) * 8 + bit;
                if byte & (1 << bit) != 0 && block < self.blocks {
                    set.insert(block);
                }
            }
        }
        set
    }

    /// Clears `blocks` (those past the end are ignored), writing only the changed bytes.
    pub(crate) fn clear(&mut self, blocks: &BTreeSet<u64>) -> Result<(), DiskSyncError> {
        self.update(blocks.iter().copied(), false)
    }

    /// Sets or clears `blocks` (past the end ignored) and writes the span of changed bytes.
    /// Memory is updated only once the file write succeeded, so a bit is never set in memory
    /// (which would make a later mark skip its write) without being in the file.
    fn update(
        &mut self,
        blocks: impl IntoIterator<Item = u64>,
        set: bool,
    ) -> Result<(), DiskSyncError> {
        let mut changed: BTreeMap<usize, u8> = BTreeMap::new();
        for block in blocks {
            if block >= self.blocks {
                continue;
            }
            let index = u64_to_usize(block / 8);
            let mask = 1u8 << (block % 8);
            let byte = changed.entry(index).or_insert(self.bits[index]);
            if set {
                *byte |= mask;
            } else {
                *byte &= !mask;
            }
        }
        changed.retain(|&index, byte| *byte != self.bits[index]);
        let (Some((&lo, _)), Some((&hi, _))) =
            (changed.first_key_value(), changed.last_key_value())
        else {
            return Ok(());
        };
        let mut span = self.bits[lo..=hi].to_vec();
        for (index, byte) in changed {
            span[index - lo] = byte;
        }
        self.write_bytes(lo, &span)
    }

    /// Writes `bytes` at byte `at` of the file, then (on success) into memory.
    fn write_bytes(&mut self, at: usize, bytes: &[u8]) -> Result<(), DiskSyncError> {
        self.file
            .write_all_at(bytes, usize_to_u64(at))
            .map_err(|source| DiskSyncError::BitmapWrite {
                path: self.path.clone(),
                offset: usize_to_u64(at),
                source,
            })?;
        self.bits[at..at + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }
}

/// After a takeover: wraps the image backend of the node now running the guest alone so every
/// write marks the bitmap first (there is no peer to hold them, so every write is a block a
/// later failback must resync).
pub struct MarkingBackend {
    inner: Box<dyn BlockBackend>,
    bitmap: WriteIntentBitmap,
}

impl MarkingBackend {
    pub fn new(inner: Box<dyn BlockBackend>, bitmap: WriteIntentBitmap) -> Self {
        MarkingBackend { inner, bitmap }
    }
}

impl BlockBackend for MarkingBackend {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_at(offset, buf)
    }

    /// Marks, then writes: a write whose mark cannot be made is not issued (the guest gets the
    /// error), so no block changes unrecorded.
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.bitmap
            .mark(offset, usize_to_u64(buf.len()))
            .map_err(DiskSyncError::into_io)?;
        self.inner.write_at(offset, buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{MemBackend, TempDir};

    fn set(blocks: &[u64]) -> BTreeSet<u64> {
        blocks.iter().copied().collect()
    }

    #[test]
    fn bitmap_path_appends_suffix() {
        assert_eq!(
            bitmap_path(Path::new("/images/disk.raw")),
            PathBuf::from("/images/disk.raw.ftvmm-bitmap")
        );
    }

    #[test]
    fn mark_sets_blocks_overlapping_the_range() {
        let dir = TempDir::new("mark");
        let path = dir.path().join("img.ftvmm-bitmap");
        let mut bm = WriteIntentBitmap::open(&path, 40 * BLOCK_SIZE).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 5);
        assert!(bm.blocks().is_empty());

        // Straddles the 0/1 boundary by one byte each side.
        bm.mark(BLOCK_SIZE - 1, 2).unwrap();
        assert_eq!(bm.blocks(), set(&[0, 1]));
        // Exactly one block, aligned.
        bm.mark(9 * BLOCK_SIZE, BLOCK_SIZE).unwrap();
        assert_eq!(bm.blocks(), set(&[0, 1, 9]));
        // Last byte of the image; zero length touches nothing.
        bm.mark(40 * BLOCK_SIZE - 1, 1).unwrap();
        bm.mark(20 * BLOCK_SIZE, 0).unwrap();
        assert_eq!(bm.blocks(), set(&[0, 1, 9, 39]));
        // Outside the image: refused, nothing marked.
        let err = bm.mark(40 * BLOCK_SIZE - 1, 2).unwrap_err();
        assert_eq!(
            err.to_string(),
            "disk write 0x27ffff+2 lies outside the 0x280000-byte image"
        );
        assert!(bm.mark(u64::MAX, 2).is_err());
        assert_eq!(bm.blocks(), set(&[0, 1, 9, 39]));
        assert_eq!(std::fs::read(&path).unwrap(), vec![0b11, 0b10, 0, 0, 0x80]);
    }

    #[test]
    fn reopen_loads_bits_and_set_exactly_replaces_them() {
        let dir = TempDir::new("reopen");
        let path = dir.path().join("img.ftvmm-bitmap");
        let size = 100 * BLOCK_SIZE + 512; // a partial last block still has a bit
        {
            let mut bm = WriteIntentBitmap::open(&path, size).unwrap();
            bm.mark(3 * BLOCK_SIZE + 7, 10).unwrap();
            bm.mark(100 * BLOCK_SIZE, 512).unwrap();
        }
        let mut bm = WriteIntentBitmap::open(&path, size).unwrap();
        assert_eq!(bm.blocks(), set(&[3, 100]));

        bm.set_exactly(&set(&[5, 64])).unwrap();
        assert_eq!(bm.blocks(), set(&[5, 64]));
        assert!(bm.set_exactly(&set(&[101])).is_err());
        drop(bm);
        let bm = WriteIntentBitmap::open(&path, size).unwrap();
        assert_eq!(bm.blocks(), set(&[5, 64]));

        // A bitmap made for another image size is refused.
        let err = WriteIntentBitmap::open(&path, 8 * BLOCK_SIZE).unwrap_err();
        assert!(
            matches!(
                err,
                DiskSyncError::BitmapSize {
                    len: 13,
                    expected: 1,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn marking_backend_marks_before_writing() {
        let dir = TempDir::new("marking");
        let path = dir.path().join("img.ftvmm-bitmap");
        let mem = MemBackend::new(u64_to_usize(8 * BLOCK_SIZE));
        let bytes = mem.bytes.clone();
        let bm = WriteIntentBitmap::open(&path, 8 * BLOCK_SIZE).unwrap();
        let mut backend = MarkingBackend::new(Box::new(mem), bm);
        backend.write_at(2 * BLOCK_SIZE + 1, b"abc").unwrap();
        assert_eq!(
            &bytes.lock().unwrap()[u64_to_usize(2 * BLOCK_SIZE) + 1..][..3],
            b"abc"
        );
        assert_eq!(std::fs::read(&path).unwrap(), vec![0b100]);
        // A write the bitmap cannot cover is not issued.
        let err = backend.write_at(8 * BLOCK_SIZE, b"x").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
