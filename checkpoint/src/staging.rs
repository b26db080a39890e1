//! An epoch's checkpoint as it leaves the VM: the dirty pages copied aside while the guest is
//! paused, and the VM state with the output its epoch holds.

use std::collections::VecDeque;

use disk_sync::{DiskOp, EpochWrites};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm::builder::VmmState;
use vmm::cast::usize_to_u64;
use vmm::devices::GuestMemory;
use vmm::memory::{DirtyLog, Residency};
use vmm::VmOutcome;

use crate::outputs::HeldOutput;
use crate::wire::{self, PAGE_SIZE};

/// Dirty sets from this many pages (8 MiB) up are copied by several threads in the pause.
const PARALLEL_COPY_PAGES: usize = 2048;

/// Epochs whose largest dirty set a staging buffer keeps room for (about a second of 40 ms
/// epochs).
const RETAINED_EPOCHS: usize = 25;
/// Room beyond that which a buffer may keep rather than be reallocated smaller (1 MiB).
const RETAINED_SLACK: usize = 256 * PAGE_SIZE;

/// The room a staging buffer is given for a dirty set of `bytes`: a quarter more, so that a
/// dirty set still growing (a guest speeding up after pre-copy) lands in memory made ready
/// while the guest ran rather than in fresh memory faulted in during the pause.
fn room_for(bytes: usize) -> usize {
    bytes + bytes / 4
}

/// Everything of an epoch but its pages: VM state and the output not yet released.
#[derive(Debug, Serialize, Deserialize)]
pub struct CheckpointState {
    pub vmm: VmmState,
    pub output: HeldOutput,
    /// Set in the final checkpoint of a guest that ended: its vCPUs are past their last
    /// instruction (an exit port write, a fault), so a standby resuming from it must not run
    /// them but end the same way, once it has released the held output.
    pub ended: Option<VmOutcome>,
    /// Frames the guest had received (see [`crate::input`]): a standby resuming from this
    /// checkpoint delivers the logged frames from this number on again.
    pub input: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    #[error("page {0:#x} is not guest RAM")]
    NotRam(u64),
    #[error("a page copy thread panicked")]
    CopyPanicked,
    #[error("cannot encode the VM state: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    #[error("cannot decode the VM state: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    #[error("malformed disk writes: {0}")]
    DiskOps(&'static str),
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_fixed_int_encoding()
}

impl CheckpointState {
    pub fn encode(&self) -> Result<Vec<u8>, StagingError> {
        Ok(bincode::serde::encode_to_vec(self, bincode_config())?)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, StagingError> {
        let (state, used) = bincode::serde::decode_from_slice(bytes, bincode_config())?;
        if used != bytes.len() {
            return Err(StagingError::Decode(
                bincode::error::DecodeError::OtherString(format!(
                    "{} trailing bytes",
                    bytes.len() - used
                )),
            ));
        }
        Ok(state)
    }
}

/// Disk writes go in Disk frames of about this many data bytes (an op is never split), so
/// that an epoch with many writes stays well inside a frame's limit.
const DISK_FRAME_BYTES: usize = 8 << 20;
const OP_WRITE: u8 = 0;
const OP_FLUSH: u8 = 1;

/// An epoch's disk writes as the blobs of its Disk frames, in order. Each op is a kind byte,
/// then for a write its offset (u64 LE), length (u32 LE) and data: written directly, as a
/// generic serialiser would encode the data byte by byte.
pub fn encode_disk(ops: &[DiskOp]) -> Vec<Vec<u8>> {
    let mut blobs = Vec::new();
    let mut blob = Vec::new();
    for op in ops {
        if blob.len() >= DISK_FRAME_BYTES {
            blobs.push(std::mem::take(&mut blob));
        }
        match op {
            DiskOp::Write { offset, data } => {
                blob.push(OP_WRITE);
                blob.extend_from_slice(&offset.to_le_bytes());
                blob.extend_from_slice(&wire::len_field(data.len()));
                blob.extend_from_slice(data);
            }
            DiskOp::Flush => blob.push(OP_FLUSH),
        }
    }
    if !blob.is_empty() {
        blobs.push(blob);
    }
    blobs
}

/// The disk writes of one Disk frame's blob.
pub fn decode_disk(mut blob: &[u8]) -> Result<EpochWrites, StagingError> {
    fn take<'a>(blob: &mut &'a [u8], n: usize) -> Result<&'a [u8], StagingError> {
        if blob.len() < n {
            return Err(StagingError::DiskOps("truncated"));
        }
        let (head, rest) = blob.split_at(n);
        *blob = rest;
        Ok(head)
    }
    let mut ops = Vec::new();
    while let Some((&kind, rest)) = blob.split_first() {
        blob = rest;
        match kind {
            OP_WRITE => {
                let offset = u64::from_le_bytes(take(&mut blob, 8)?.try_into().unwrap_or_default());
                let len = u32::from_le_bytes(take(&mut blob, 4)?.try_into().unwrap_or_default());
                let data = take(&mut blob, len as usize)?.to_vec();
                ops.push(DiskOp::Write { offset, data });
            }
            OP_FLUSH => ops.push(DiskOp::Flush),
            _ => return Err(StagingError::DiskOps("unknown operation")),
        }
    }
    Ok(ops)
}

/// Dirty pages copied out of guest memory: their addresses and, in the same order, their bytes.
/// The buffer is reused from epoch to epoch (see `copy_from`), so it may be longer than the
/// pages it holds: read them through `bytes`.
#[derive(Debug, Default)]
pub struct StagedPages {
    pub gpas: Vec<u64>,
    data: Vec<u8>,
}

impl StagedPages {
    /// Copies, while the guest runs (pre-copy), the next pages `pages` yields until this
    /// buffer holds `max` of them, replacing what it held, through vm-memory's volatile
    /// accessors, since the guest may write the pages meanwhile (those pages show up dirty
    /// again in the next harvest); with `zeros`, pages that are
    /// all zero are passed over, those the host never backed without even being read (a
    /// fresh standby's memory is zero already, so memory the guest never touched costs
    /// neither node anything). Returns how many pages it took from `pages`, kept or skipped:
    /// 0 once `pages` is exhausted.
    pub fn copy_running(
        &mut self,
        memory: &GuestMemory,
        pages: &mut impl Iterator<Item = u64>,
        max: usize,
        mut zeros: Option<&mut Residency>,
    ) -> Result<usize, StagingError> {
        self.gpas.clear();
        if self.data.len() < max * PAGE_SIZE {
            self.data.resize(max * PAGE_SIZE, 0);
        }
        let mut taken = 0;
        while self.gpas.len() < max {
            let Some(gpa) = pages.next() else {
                break;
            };
            taken += 1;
            if let Some(residency) = zeros.as_deref_mut() {
                if residency.never_backed(memory, gpa) {
                    continue;
                }
            }
            let at = self.gpas.len() * PAGE_SIZE;
            let dst = &mut self.data[at..at + PAGE_SIZE];
            memory
                .read_slice(dst, GuestAddress(gpa))
                .map_err(|_| StagingError::NotRam(gpa))?;
            if zeros.is_some() && is_zero(dst) {
                continue;
            }
            self.gpas.push(gpa);
        }
        Ok(taken)
    }

    /// Copies the pages `log` names while the guest is paused, replacing what this buffer
    /// held. The buffer never shrinks: a steady dirty set lands in memory that is already
    /// faulted in, so the copy in the pause is a plain memcpy, split over several threads
    /// when the set is large (the vCPUs are paused, so their cores are free).
    pub fn copy_from(&mut self, memory: &GuestMemory, log: &DirtyLog) -> Result<(), StagingError> {
        self.gpas.clear();
        self.gpas.extend(log.pages());
        let len = self.gpas.len() * PAGE_SIZE;
        if self.data.len() < len {
            self.data.resize(len, 0);
        }
        let (gpas, data) = (&self.gpas[..], &mut self.data[..len]);
        let threads = if gpas.len() < PARALLEL_COPY_PAGES {
            1
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
        };
        if threads == 1 {
            return copy_paused(memory, gpas, data);
        }
        let per = gpas.len().div_ceil(threads);
        std::thread::scope(|s| {
            let parts: Vec<_> = gpas
                .chunks(per)
                .zip(data.chunks_mut(per * PAGE_SIZE))
                .map(|(gpas, data)| s.spawn(move || copy_paused(memory, gpas, data)))
                .collect();
            parts
                .into_iter()
                .try_for_each(|p| p.join().unwrap_or(Err(StagingError::CopyPanicked)))
        })
    }

    /// Makes room, zeroed and so faulted in now, for the next epoch if it dirties about `pages`
    /// pages: called while the guest runs, it keeps the allocation's page faults (several
    /// microseconds a page on this host) out of the next pause.
    pub fn make_room(&mut self, pages: usize) {
        let room = room_for(pages * PAGE_SIZE);
        if self.data.len() < room {
            self.data.resize(room, 0);
        }
    }

    /// Gives back to the system the room beyond `bytes` (and the slack), so that a pre-copy's
    /// large batches or a burst's do not stay resident once epochs no longer need them.
    fn trim(&mut self, bytes: usize) {
        if self.data.len() > bytes + RETAINED_SLACK {
            self.data.truncate(bytes);
            self.data.shrink_to_fit();
        }
    }

    /// The staged pages' bytes, in the order of `gpas`.
    pub fn bytes(&self) -> &[u8] {
        &self.data[..self.gpas.len() * PAGE_SIZE]
    }

    /// Writes an epoch's batches of pages into `memory`, all or nothing: every address is
    /// checked before the first page is written, so a bad epoch leaves the image as it was.
    pub fn apply_batches(
        memory: &GuestMemory,
        batches: &[(Vec<u64>, Vec<u8>)],
    ) -> Result<(), StagingError> {
        for &gpa in batches.iter().flat_map(|(gpas, _)| gpas) {
            host_page(memory, gpa)?;
        }
        batches
            .iter()
            .try_for_each(|(gpas, data)| Self::apply(memory, gpas, data))
    }

    /// Writes staged pages into `memory` (a standby's image, which no VM runs on).
    pub fn apply(memory: &GuestMemory, gpas: &[u64], data: &[u8]) -> Result<(), StagingError> {
        for (&gpa, src) in gpas.iter().zip(data.chunks_exact(PAGE_SIZE)) {
            let dst = host_page(memory, gpa)?;
            // SAFETY: `dst` is a whole page of a live guest mapping that no vCPU runs on yet
            // (the standby builds its VM only at takeover); `src` is a distinct buffer.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, PAGE_SIZE) };
        }
        Ok(())
    }
}

/// How much room staging buffers keep when they go back to be copied into again: as much as
/// the largest dirty set of the last [`RETAINED_EPOCHS`] epochs, and a quarter more. A steady dirty set is then
/// copied in the pause into memory already faulted in, while memory that only a pre-copy or
/// a burst needed goes back to the system (an idle guest's primary holds no 16 MiB batch).
#[derive(Debug, Default)]
pub struct Retention {
    recent: VecDeque<usize>,
}

impl Retention {
    /// Records the dirty set of the epoch `pages` staged and trims `pages` to the room
    /// (`make_room`'s) for what recent epochs needed.
    pub fn epoch(&mut self, pages: &mut StagedPages) {
        if self.recent.len() == RETAINED_EPOCHS {
            self.recent.pop_front();
        }
        self.recent.push_back(pages.bytes().len());
        pages.trim(room_for(self.recent.iter().copied().max().unwrap_or(0)));
    }
}

/// Copies the paused guest's pages `gpas` into `data`, page by page.
fn copy_paused(memory: &GuestMemory, gpas: &[u64], data: &mut [u8]) -> Result<(), StagingError> {
    for (&gpa, dst) in gpas.iter().zip(data.chunks_exact_mut(PAGE_SIZE)) {
        let src = host_page(memory, gpa)?;
        // SAFETY: `src` is a whole page of a live guest mapping (checked by `host_page`), `dst`
        // a distinct buffer of the same size; the vCPUs and device workers are paused, so
        // nothing writes the page during the copy.
        unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), PAGE_SIZE) };
    }
    Ok(())
}

/// Whether `page` holds only zero bytes.
fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: every bit pattern is a valid u64; align_to only reinterprets the aligned
        // middle of the slice.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// The host address of the guest page at `gpa`, checked to lie wholly in RAM.
fn host_page(memory: &GuestMemory, gpa: u64) -> Result<*mut u8, StagingError> {
    let addr = GuestAddress(gpa);
    if !gpa.is_multiple_of(usize_to_u64(PAGE_SIZE))
        || memory
            .checked_offset(addr, PAGE_SIZE - 1)
            .is_none_or(|end| memory.find_region(end).is_none())
    {
        return Err(StagingError::NotRam(gpa));
    }
    memory
        .get_host_address(addr)
        .map_err(|_| StagingError::NotRam(gpa))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::cast::u64_to_usize;
    use vmm::memory::create_guest_memory;

    #[test]
    fn disk_writes_round_trip_in_frames_of_bounded_size() {
        let big = vec![7u8; DISK_FRAME_BYTES / 2 + 1];
        let ops = vec![
            DiskOp::Write {
                offset: 512,
                data: vec![1, 2, 3],
            },
            DiskOp::Flush,
            DiskOp::Write {
                offset: 1 << 40,
                data: big.clone(),
            },
            DiskOp::Write {
                offset: 0,
                data: big,
            },
            DiskOp::Flush,
        ];
        let blobs = encode_disk(&ops);
        assert_eq!(blobs.len(), 2, "a new frame once one holds the bound");
        let decoded: Vec<DiskOp> = blobs.iter().flat_map(|b| decode_disk(b).unwrap()).collect();
        assert_eq!(decoded, ops);
        assert!(encode_disk(&[]).is_empty());
        let first = &blobs[0];
        for cut in [1, 9, 13, first.len() - 1] {
            assert!(
                matches!(
                    decode_disk(&first[..cut]),
                    Err(StagingError::DiskOps("truncated"))
                ),
                "cut at {cut}"
            );
        }
        assert!(decode_disk(&[9]).is_err(), "unknown kind");
    }

    #[test]
    fn staging_buffers_keep_room_for_recent_epochs_only() {
        let staged = |pages: usize| StagedPages {
            gpas: vec![0; pages],
            data: vec![0; 4096 * PAGE_SIZE],
        };
        let mut retention = Retention::default();
        // A pre-copy batch's 16 MiB come back as an idle epoch's: trimmed to that epoch.
        let mut idle = staged(2);
        retention.epoch(&mut idle);
        assert_eq!(idle.data.len(), room_for(2 * PAGE_SIZE));
        // A 4096-page epoch among small ones keeps its room while it is recent.
        let mut burst = staged(4096);
        retention.epoch(&mut burst);
        for _ in 1..RETAINED_EPOCHS {
            let mut small = staged(1);
            retention.epoch(&mut small);
            assert_eq!(small.data.len(), 4096 * PAGE_SIZE);
        }
        let mut later = staged(1);
        retention.epoch(&mut later);
        assert_eq!(
            later.data.len(),
            room_for(PAGE_SIZE),
            "the burst is out of the window"
        );
        // Within the slack a buffer is left as it is.
        let mut near = StagedPages {
            gpas: vec![0; 1],
            data: vec![0; PAGE_SIZE + RETAINED_SLACK],
        };
        retention.epoch(&mut near);
        assert_eq!(near.data.len(), PAGE_SIZE + RETAINED_SLACK);
    }

    #[test]
    fn room_made_while_the_guest_runs_takes_the_next_dirty_set_and_survives_retention() {
        let memory = create_guest_memory(64 << 20).unwrap();
        let mut pages = StagedPages::default();
        pages.make_room(200);
        let (room, at) = (pages.data.len(), pages.data.as_ptr());
        assert!(room >= 250 * PAGE_SIZE, "a quarter more than asked");
        let mut log = DirtyLog::all(&memory);
        log = log.select(|gpa| gpa < 240 * 4096);
        pages.copy_from(&memory, &log).unwrap();
        assert_eq!(pages.gpas.len(), 240);
        assert_eq!(
            (pages.data.len(), pages.data.as_ptr()),
            (room, at),
            "the pause copied into the room made before it"
        );
        // Back from the sender after that epoch, the buffer keeps its room for the next.
        Retention::default().epoch(&mut pages);
        pages.make_room(240);
        assert_eq!(pages.data.len(), room_for(240 * PAGE_SIZE));
    }

    #[test]
    fn staged_pages_reach_another_image_exactly() {
        let src = create_guest_memory(64 << 20).unwrap();
        for (fill, gpa) in (1u8..).zip([0u64, 4096, 12 << 20, (64 << 20) - 4096]) {
            src.write_slice(&[fill; 4096], GuestAddress(gpa)).unwrap();
        }
        let mut log = DirtyLog::default();
        let mut bits = vec![0u64; (64 << 20) / 4096 / 64];
        for gpa in [0u64, 4096, 12 << 20, (64 << 20) - 4096] {
            let page = u64_to_usize(gpa / 4096);
            bits[page / 64] |= 1 << (page % 64);
        }
        log.add_region(GuestAddress(0), 64 << 20, bits);
        let mut paused = StagedPages::default();
        paused.copy_from(&src, &log).unwrap();
        // Running, in batches of 3 pages: the first batch ends at the third page.
        let (mut running, mut pages) = (StagedPages::default(), log.pages());
        let mut batches = Vec::new();
        while running.copy_running(&src, &mut pages, 3, None).unwrap() > 0 {
            batches.push((running.gpas.clone(), running.bytes().to_vec()));
        }
        assert_eq!(batches.len(), 2);
        assert_eq!(paused.gpas.len(), 4);
        let images = [
            vec![(paused.gpas.clone(), paused.bytes().to_vec())],
            batches,
        ];
        for (i, staged) in images.iter().enumerate() {
            let dst = create_guest_memory(64 << 20).unwrap();
            for (gpas, bytes) in staged {
                StagedPages::apply(&dst, gpas, bytes).unwrap();
            }
            let mut a = vec![0u8; 64 << 20];
            let mut b = vec![0u8; 64 << 20];
            src.read_slice(&mut a, GuestAddress(0)).unwrap();
            dst.read_slice(&mut b, GuestAddress(0)).unwrap();
            assert!(a == b, "images differ (copy {i})");
        }
    }

    #[test]
    fn a_first_copy_skips_pages_the_guest_never_wrote() {
        let src = create_guest_memory(64 << 20).unwrap();
        src.write_slice(&[7; 4096], GuestAddress(8 << 20)).unwrap();
        // A page written back to zero is zero all the same: a fresh standby has it.
        src.write_slice(&[0; 4096], GuestAddress(9 << 20)).unwrap();
        let log = DirtyLog::all(&src);
        let (mut staged, mut pages) = (StagedPages::default(), log.pages());
        let mut residency = Residency::open();
        assert!(
            !residency.never_backed(&src, 8 << 20),
            "a written page is backed"
        );
        assert!(
            residency.never_backed(&src, 10 << 20),
            "an untouched page is not"
        );
        let mut kept = Vec::new();
        let mut taken = 0;
        loop {
            let n = staged
                .copy_running(&src, &mut pages, 1024, Some(&mut residency))
                .unwrap();
            if n == 0 {
                break;
            }
            taken += n;
            kept.extend_from_slice(&staged.gpas);
        }
        assert_eq!(taken, (64 << 20) / 4096, "every page looked at");
        assert_eq!(kept, vec![8 << 20]);
        assert_eq!(staged.bytes().len(), 0, "the last call found nothing");
    }

    #[test]
    fn large_dirty_sets_are_copied_by_several_threads_exactly() {
        let pages = PARALLEL_COPY_PAGES + 1000;
        let src = create_guest_memory(64 << 20).unwrap();
        let mut bits = vec![0u64; (64 << 20) / 4096 / 64];
        let fill = |i: usize| u8::try_from(i % 251).unwrap() + 1;
        // Every other page, so that the threads' shares are scattered.
        for i in 0..pages {
            let page = 2 * i + 1;
            src.write_slice(&[fill(i); 4096], GuestAddress(usize_to_u64(page) * 4096))
                .unwrap();
            bits[page / 64] |= 1 << (page % 64);
        }
        let mut log = DirtyLog::default();
        log.add_region(GuestAddress(0), 64 << 20, bits);
        let mut staged = StagedPages::default();
        staged.copy_from(&src, &log).unwrap();
        assert_eq!(staged.gpas.len(), pages);
        for (i, page) in staged.bytes().chunks_exact(4096).enumerate() {
            assert!(page.iter().all(|&b| b == fill(i)), "page {i}");
        }
        // A smaller set reuses the buffer and exposes only its own pages.
        let mut few = DirtyLog::default();
        let mut bits = vec![0u64; (64 << 20) / 4096 / 64];
        bits[0] = 0b10;
        few.add_region(GuestAddress(0), 64 << 20, bits);
        staged.copy_from(&src, &few).unwrap();
        assert_eq!(staged.bytes(), &[1u8; 4096][..]);
    }

    #[test]
    fn pages_outside_ram_are_refused() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let page = [0u8; 4096];
        assert!(StagedPages::apply(&mem, &[64 << 20], &page).is_err());
        assert!(StagedPages::apply(&mem, &[100], &page).is_err());
    }
}
