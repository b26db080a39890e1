//! Primary side: [`RecordingBackend`] applies the guest's writes at once and records them in the
//! running epoch; [`EpochRecorder`] is the checkpointer's handle to seal epochs and to clear the
//! bitmap as epochs are acknowledged.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vmm::cast::usize_to_u64;
use vmm::devices::BlockBackend;

use crate::{block_span, DiskOp, DiskSyncError, EpochWrites, WriteIntentBitmap};

/// What the backend and the checkpointer share.
#[derive(Debug, Default)]
struct Shared {
    /// Successful ops of the running epoch, in order.
    running: Vec<DiskOp>,
    /// Data bytes of the running epoch's writes.
    running_bytes: usize,
    /// Blocks written by the running epoch.
    running_blocks: BTreeSet<u64>,
    /// Blocks written by each sealed epoch not yet acknowledged.
    sealed: BTreeMap<u64, BTreeSet<u64>>,
    /// Blocks of writes between their mark and their completion (with a count, as writes to one
    /// block may overlap): an acknowledgement arriving meanwhile must not clear them.
    in_flight: BTreeMap<u64, usize>,
    /// Blocks of writes that failed on this image: they may have changed part of the block here
    /// and were never sent, so no acknowledgement makes the nodes agree on them; they stay
    /// marked until a resync rewrites the bitmap.
    failed: BTreeSet<u64>,
    bitmap: Option<WriteIntentBitmap>,
    /// No peer any more (see [`EpochRecorder::stop`]): writes only mark the bitmap.
    stopped: bool,
    /// Blocks written since a resync began reading (see [`EpochRecorder::begin_resync`]).
    tracked: Option<BTreeSet<u64>>,
}

/// A lock that survives a panic elsewhere: the state is a record, consistent after each
/// critical section, and losing replication to a poisoned lock would be worse.
fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

fn blocks(span: Option<(u64, u64)>) -> impl Iterator<Item = u64> {
    span.into_iter().flat_map(|(first, last)| first..=last)
}

/// Primary side: wraps the primary's image backend. Writes and flushes go to the image at once
/// (the guest sees their result, errors included, as before) and, when they succeed, are
/// recorded in the running epoch; the bitmap (if any) is marked before each write.
///
/// With a bitmap, a write it cannot cover (past the image's end) or whose mark cannot be
/// written fails with that error and is not issued: no block changes without its mark.
pub struct RecordingBackend {
    inner: Box<dyn BlockBackend>,
    shared: Arc<Mutex<Shared>>,
}

/// The checkpointer's handle to the epoch record (clone-able, Send + Sync; shared with the
/// [`RecordingBackend`]).
#[derive(Clone)]
pub struct EpochRecorder {
    shared: Arc<Mutex<Shared>>,
}

impl RecordingBackend {
    pub fn new(
        inner: Box<dyn BlockBackend>,
        bitmap: Option<WriteIntentBitmap>,
    ) -> (RecordingBackend, EpochRecorder) {
        let shared = Arc::new(Mutex::new(Shared {
            bitmap,
            ..Shared::default()
        }));
        (
            RecordingBackend {
                inner,
                shared: shared.clone(),
            },
            EpochRecorder { shared },
        )
    }
}

impl BlockBackend for RecordingBackend {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_at(offset, buf)
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let len = usize_to_u64(buf.len());
        let span = block_span(offset, len);
        {
            let mut shared = lock(&self.shared);
            if let Some(bitmap) = shared.bitmap.as_mut() {
                bitmap.mark(offset, len).map_err(DiskSyncError::into_io)?;
            }
            for block in blocks(span) {
                *shared.in_flight.entry(block).or_insert(0) += 1;
            }
        }
        // The image write runs unlocked: the checkpointer is not held up by a slow disk.
        let result = self.inner.write_at(offset, buf);
        let mut shared = lock(&self.shared);
        for block in blocks(span) {
            if let Some(count) = shared.in_flight.get_mut(&block) {
                *count -= 1;
                if *count == 0 {
                    shared.in_flight.remove(&block);
                }
            }
        }
        if let (Ok(()), Some(tracked)) = (&result, shared.tracked.as_mut()) {
            tracked.extend(blocks(span));
        }
        match &result {
            Ok(()) if shared.stopped => {}
            Ok(()) => {
                shared.running_blocks.extend(blocks(span));
                shared.running_bytes += buf.len();
                shared.running.push(DiskOp::Write {
                    offset,
                    data: buf.to_vec(),
                });
            }
            Err(e) => {
                tracing::warn!(offset, len, error = %e, "primary disk write failed; not replicated, its blocks stay marked");
                shared.failed.extend(blocks(span));
            }
        }
        result
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()?;
        let mut shared = lock(&self.shared);
        if !shared.stopped {
            shared.running.push(DiskOp::Flush);
        }
        Ok(())
    }
}

impl EpochRecorder {
    /// Ends the running epoch as `epoch`: returns its ops in order (and remembers which blocks
    /// it touched, for [`acked`](Self::acked)). Call it with the guest paused, as the
    /// checkpointer does: a write still in flight lands in the next epoch.
    pub fn seal(&self, epoch: u64) -> EpochWrites {
        let mut shared = lock(&self.shared);
        let ops = std::mem::take(&mut shared.running);
        shared.running_bytes = 0;
        let touched = std::mem::take(&mut shared.running_blocks);
        if !touched.is_empty() {
            shared.sealed.entry(epoch).or_default().extend(touched);
        }
        ops
    }

    /// Data bytes written in the running epoch: what its checkpoint will carry.
    pub fn running_bytes(&self) -> usize {
        lock(&self.shared).running_bytes
    }

    /// Checkpoint `epoch` is on both nodes: blocks written only in epochs <= epoch leave the
    /// bitmap (blocks also written by later sealed epochs or by the running epoch stay set, as
    /// do blocks of writes in flight or that failed here, and bits this recorder did not set,
    /// such as those loaded from before a crash, which are a resync's to clear).
    ///
    /// On error the bits stay set (the safe side) and are not retried.
    pub fn acked(&self, epoch: u64) -> Result<(), DiskSyncError> {
        let mut guard = lock(&self.shared);
        let shared = &mut *guard;
        let later = match epoch.checked_add(1) {
            Some(next) => shared.sealed.split_off(&next),
            None => BTreeMap::new(),
        };
        let done = std::mem::replace(&mut shared.sealed, later);
        let mut clear: BTreeSet<u64> = done.into_values().flatten().collect();
        let Some(bitmap) = shared.bitmap.as_mut() else {
            return Ok(());
        };
        clear.retain(|block| {
            !shared.running_blocks.contains(block)
                && !shared.in_flight.contains_key(block)
                && !shared.failed.contains(block)
                && !shared.sealed.values().any(|later| later.contains(block))
        });
        bitmap.clear(&clear)
    }

    /// A resync to a returning peer begins (the recorder is stopped: the guest runs alone):
    /// returns the blocks the bitmap marks, and tracks from now on the blocks the guest writes,
    /// which the resync must send again (see [`EpochRecorder::start_recording`]).
    pub fn begin_resync(&self) -> BTreeSet<u64> {
        let mut shared = lock(&self.shared);
        shared.tracked = Some(BTreeSet::new());
        shared
            .bitmap
            .as_ref()
            .map(WriteIntentBitmap::blocks)
            .unwrap_or_default()
    }

    /// Every write is recorded in the running epoch again, from now on; returns the blocks
    /// written since [`EpochRecorder::begin_resync`], whose content the resync must send once
    /// more (a write after this call is also in the first epoch, applied after the resync).
    pub fn start_recording(&self) -> BTreeSet<u64> {
        let mut shared = lock(&self.shared);
        shared.stopped = false;
        shared.tracked.take().unwrap_or_default()
    }

    /// The peer holds `blocks` durably as this image has them: their bits leave the bitmap,
    /// but for blocks written since (tracked, in an epoch, in flight, or failed here), whose
    /// newer content the peer does not have yet.
    pub fn synced(&self, blocks: &BTreeSet<u64>) -> Result<(), DiskSyncError> {
        let mut guard = lock(&self.shared);
        let shared = &mut *guard;
        let clear: BTreeSet<u64> = blocks
            .iter()
            .copied()
            .filter(|block| {
                !shared.tracked.as_ref().is_some_and(|t| t.contains(block))
                    && !shared.running_blocks.contains(block)
                    && !shared.in_flight.contains_key(block)
                    && !shared.failed.contains(block)
                    && !shared.sealed.values().any(|s| s.contains(block))
            })
            .collect();
        match shared.bitmap.as_mut() {
            Some(bitmap) => bitmap.clear(&clear),
            None => Ok(()),
        }
    }

    /// The node runs on without a peer: nothing more is recorded (so nothing piles up) and
    /// what was recorded is dropped; every block written since the last acknowledged epoch,
    /// and from now on, stays marked in the bitmap for a later resync.
    pub fn stop(&self) {
        let mut shared = lock(&self.shared);
        shared.stopped = true;
        shared.tracked = None;
        shared.running = Vec::new();
        shared.running_bytes = 0;
        shared.sealed.clear();
        shared.running_blocks.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::Ordering;

    use vmm::cast::u64_to_usize;
    use vmm::devices::virtio::blk::RawFileBackend;

    use super::*;
    use crate::testutil::{MemBackend, TempDir};
    use crate::{bitmap_path, BLOCK_SIZE};

    fn set(blocks: &[u64]) -> BTreeSet<u64> {
        blocks.iter().copied().collect()
    }

    #[test]
    fn a_stopped_recorder_records_nothing_and_keeps_marking() {
        let dir = TempDir::new("stop");
        let image = dir.path().join("img");
        let size = 4 * BLOCK_SIZE;
        let bitmap = WriteIntentBitmap::open(&bitmap_path(&image), size).unwrap();
        let (mut backend, recorder) =
            RecordingBackend::new(Box::new(MemBackend::new(u64_to_usize(size))), Some(bitmap));
        backend.write_at(0, &[1; 512]).unwrap();
        recorder.seal(1);
        recorder.stop();
        backend.write_at(2 * BLOCK_SIZE, &[2; 512]).unwrap();
        backend.flush().unwrap();
        assert!(recorder.seal(2).is_empty());
        recorder.acked(2).unwrap();
        let reopened = WriteIntentBitmap::open(&bitmap_path(&image), size).unwrap();
        assert_eq!(
            reopened.blocks(),
            set(&[0, 2]),
            "unacknowledged and later writes stay marked"
        );
    }

    #[test]
    fn a_resync_keeps_the_bits_of_blocks_written_since_it_read_them() {
        let dir = TempDir::new("resync-bits");
        let image = dir.path().join("img");
        let size = 8 * BLOCK_SIZE;
        let bitmap = WriteIntentBitmap::open(&bitmap_path(&image), size).unwrap();
        let (mut backend, recorder) =
            RecordingBackend::new(Box::new(MemBackend::new(u64_to_usize(size))), Some(bitmap));
        recorder.stop();
        backend.write_at(0, &[1; 512]).unwrap();
        backend.write_at(BLOCK_SIZE, &[1; 512]).unwrap();
        // The resync reads blocks 0 and 1; meanwhile the guest writes block 1 again.
        assert_eq!(recorder.begin_resync(), set(&[0, 1]));
        backend.write_at(BLOCK_SIZE, &[2; 512]).unwrap();
        recorder.synced(&set(&[0, 1])).unwrap();
        let bits = || {
            WriteIntentBitmap::open(&bitmap_path(&image), size)
                .unwrap()
                .blocks()
        };
        assert_eq!(
            bits(),
            set(&[1]),
            "block 1's newer content is not on the peer"
        );
        // The catch-up pass sends block 1 again; a write after it is in the first epoch.
        assert_eq!(recorder.start_recording(), set(&[1]));
        backend.write_at(2 * BLOCK_SIZE, &[3; 512]).unwrap();
        recorder.synced(&set(&[1, 2])).unwrap();
        assert_eq!(
            bits(),
            set(&[2]),
            "block 2 waits for its epoch's acknowledgement"
        );
        assert_eq!(recorder.seal(1), vec![write(2 * BLOCK_SIZE, &[3; 512])]);
        recorder.acked(1).unwrap();
        assert!(bits().is_empty());
    }

    fn write(offset: u64, data: &[u8]) -> DiskOp {
        DiskOp::Write {
            offset,
            data: data.to_vec(),
        }
    }

    fn image(dir: &TempDir, size: u64) -> PathBuf {
        let path = dir.path().join("disk.raw");
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        path
    }

    #[test]
    fn writes_reach_the_image_at_once_and_seal_returns_them_in_order() {
        let dir = TempDir::new("record");
        let path = image(&dir, 1 << 20);
        let inner = RawFileBackend::open(&path).unwrap();
        let (mut backend, recorder) = RecordingBackend::new(Box::new(inner), None);
        assert_eq!(backend.size(), 1 << 20);

        backend.write_at(4096, b"hello").unwrap();
        // On the image before any seal.
        let file = std::fs::File::open(&path).unwrap();
        let mut buf = [0u8; 5];
        file.read_exact_at(&mut buf, 4096).unwrap();
        assert_eq!(&buf, b"hello");
        backend.read_at(4096, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");

        backend.flush().unwrap();
        backend.write_at(0, b"xy").unwrap();
        assert_eq!(
            recorder.seal(1),
            vec![write(4096, b"hello"), DiskOp::Flush, write(0, b"xy")]
        );

        // The next seal holds only what came after.
        backend.write_at(512, b"later").unwrap();
        assert_eq!(recorder.seal(2), vec![write(512, b"later")]);
        assert_eq!(recorder.seal(3), vec![]);
    }

    /// Fails every write and flush, as a full or broken disk would.
    struct FailingBackend;

    impl BlockBackend for FailingBackend {
        fn size(&self) -> u64 {
            16 * BLOCK_SIZE
        }
        fn read_at(&mut self, _offset: u64, _buf: &mut [u8]) -> io::Result<()> {
            Ok(())
        }
        fn write_at(&mut self, _offset: u64, _buf: &[u8]) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(EIO))
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(EIO))
        }
    }

    /// EIO on Linux.
    const EIO: i32 = 5;

    #[test]
    fn failed_writes_are_returned_and_not_recorded() {
        let dir = TempDir::new("failing");
        let bm = WriteIntentBitmap::open(&dir.path().join("bm"), 16 * BLOCK_SIZE).unwrap();
        let (mut backend, recorder) = RecordingBackend::new(Box::new(FailingBackend), Some(bm));
        let err = backend.write_at(BLOCK_SIZE, b"data").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(EIO));
        assert_eq!(backend.flush().unwrap_err().raw_os_error(), Some(EIO));
        assert_eq!(recorder.seal(1), vec![]);
        // The failed write may have changed block 1 here alone: it stays marked.
        recorder.acked(1).unwrap();
        let bm = WriteIntentBitmap::open(&dir.path().join("bm"), 16 * BLOCK_SIZE).unwrap();
        assert_eq!(bm.blocks(), set(&[1]));
    }

    #[test]
    fn acked_clears_only_blocks_no_later_epoch_wrote() {
        let dir = TempDir::new("acked");
        let size = 16 * BLOCK_SIZE;
        let path = image(&dir, size);
        let bm_path = bitmap_path(&path);
        let bm = WriteIntentBitmap::open(&bm_path, size).unwrap();
        let mem = MemBackend::new(u64_to_usize(size));
        let flushes = mem.flushes.clone();
        let (mut backend, recorder) = RecordingBackend::new(Box::new(mem), Some(bm));
        let on_disk = || WriteIntentBitmap::open(&bm_path, size).unwrap().blocks();

        // Epoch 1: blocks 0, 1 (straddling), 5.
        backend.write_at(BLOCK_SIZE - 1, b"ab").unwrap();
        backend.write_at(5 * BLOCK_SIZE, b"c").unwrap();
        recorder.seal(1);
        // Epoch 2: blocks 1 (again) and 7.
        backend.write_at(BLOCK_SIZE + 100, b"d").unwrap();
        backend.write_at(7 * BLOCK_SIZE, b"e").unwrap();
        backend.flush().unwrap();
        recorder.seal(2);
        // Running epoch 3: block 5 (again) and 9.
        backend.write_at(5 * BLOCK_SIZE + 9, b"f").unwrap();
        backend.write_at(9 * BLOCK_SIZE, b"g").unwrap();
        assert_eq!(flushes.load(Ordering::Relaxed), 1);
        assert_eq!(on_disk(), set(&[0, 1, 5, 7, 9]));

        // Epoch 1 on both nodes: 0 leaves; 1 (epoch 2) and 5 (running) stay.
        recorder.acked(1).unwrap();
        assert_eq!(on_disk(), set(&[1, 5, 7, 9]));
        // Epoch 2: 1 and 7 leave.
        recorder.acked(2).unwrap();
        assert_eq!(on_disk(), set(&[5, 9]));
        recorder.seal(3);
        recorder.acked(3).unwrap();
        assert_eq!(on_disk(), set(&[]));
    }

    #[test]
    fn acked_keeps_a_block_written_in_epoch_n_and_n_plus_1() {
        let dir = TempDir::new("acked-n1");
        let size = 4 * BLOCK_SIZE;
        let bm_path = dir.path().join("bm");
        let bm = WriteIntentBitmap::open(&bm_path, size).unwrap();
        let (mut backend, recorder) =
            RecordingBackend::new(Box::new(MemBackend::new(u64_to_usize(size))), Some(bm));
        backend.write_at(2 * BLOCK_SIZE, b"n").unwrap();
        backend.write_at(0, b"n").unwrap();
        recorder.seal(10);
        backend.write_at(2 * BLOCK_SIZE + 1, b"n+1").unwrap();
        recorder.seal(11);
        recorder.acked(10).unwrap();
        let blocks = WriteIntentBitmap::open(&bm_path, size).unwrap().blocks();
        assert_eq!(blocks, set(&[2]));
        recorder.acked(11).unwrap();
        let blocks = WriteIntentBitmap::open(&bm_path, size).unwrap().blocks();
        assert_eq!(blocks, set(&[]));
    }

    /// Records, at each write, whether the bitmap file already holds the write's block.
    struct ProbeBackend {
        bitmap_file: PathBuf,
        seen: Arc<Mutex<Vec<bool>>>,
    }

    impl BlockBackend for ProbeBackend {
        fn size(&self) -> u64 {
            64 * BLOCK_SIZE
        }
        fn read_at(&mut self, _offset: u64, _buf: &mut [u8]) -> io::Result<()> {
            Ok(())
        }
        fn write_at(&mut self, offset: u64, _buf: &[u8]) -> io::Result<()> {
            let bits = std::fs::read(&self.bitmap_file)?;
            let block = u64_to_usize(offset / BLOCK_SIZE);
            let marked = bits[block / 8] & (1 << (block % 8)) != 0;
            self.seen.lock().unwrap().push(marked);
            Ok(())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn probe(dir: &Path) -> (ProbeBackend, Arc<Mutex<Vec<bool>>>, WriteIntentBitmap) {
        let bitmap_file = dir.join("bm");
        let bm = WriteIntentBitmap::open(&bitmap_file, 64 * BLOCK_SIZE).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let backend = ProbeBackend {
            bitmap_file,
            seen: seen.clone(),
        };
        (backend, seen, bm)
    }

    #[test]
    fn mark_is_in_the_file_before_the_write_is_issued() {
        let dir = TempDir::new("probe");
        let (inner, seen, bm) = probe(dir.path());
        let (mut backend, recorder) = RecordingBackend::new(Box::new(inner), Some(bm));
        backend.write_at(3 * BLOCK_SIZE, b"a").unwrap();
        backend.write_at(17 * BLOCK_SIZE + 5, b"b").unwrap();
        recorder.seal(1);
        recorder.acked(1).unwrap();
        // Cleared, then marked again by a new write.
        backend.write_at(3 * BLOCK_SIZE, b"c").unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![true, true, true]);

        let dir = TempDir::new("probe-marking");
        let (inner, seen, bm) = probe(dir.path());
        let mut backend = crate::MarkingBackend::new(Box::new(inner), bm);
        backend.write_at(40 * BLOCK_SIZE, b"a").unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![true]);
    }

    #[test]
    fn recorder_is_send_and_sync() {
        fn check<T: Send + Sync + Clone>() {}
        fn check_send<T: Send>() {}
        check::<EpochRecorder>();
        check_send::<RecordingBackend>();
    }
}
