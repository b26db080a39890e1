//! Delta compression of dirty pages: a page the standby already holds goes as its difference
//! from that copy, word by word, byte planes shuffled so that lz4 finds the bytes that did not
//! change, kept by a bounded cache on the primary of what it last sent of each page.
//!
//! Why this scheme (measured on the stencil's page streams by `ftvmm bench`, the
//! `wire_per_dirty_*` rows): a page of doubles barely compresses as it is, but an update of a
//! double keeps its sign, exponent and top mantissa bits, so the difference of each 8-byte
//! word from the last copy has zero high bytes. Gathered into 8 planes (byte k of every word,
//! as blosc's shuffle does) those zero bytes form long runs that lz4 takes whole, where the
//! words as they are interleave them with the changed low bytes (Remus's XOR + run length
//! encoding and QEMU's XBZRLE only skip runs of unchanged bytes, and a double rarely keeps a
//! whole 4-byte word or a long run of bytes). The difference, zigzag-coded so that a small
//! decrease is as short as a small increase, beats the XOR: an update that carries into a
//! higher bit flips every bit below it in the XOR but changes the difference little (5-14 %
//! fewer wire bytes on the stencil's streams). The shuffle keeps a delta at exactly a page,
//! so a batch's decompressed size is still its page count times the page size.

use std::sync::{Mutex, MutexGuard};

use vm_memory::{Bytes, GuestAddress};
use vmm::devices::GuestMemory;

use crate::wire::{self, PAGE_SIZE};

/// Why a delta could not be resolved against the standby's memory.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error("delta for page {0:#x}, which is not guest RAM")]
    NotRam(u64),
}

/// How one page of a batch travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageForm {
    /// The page's bytes as they are.
    Whole,
    /// The page's difference from the copy the standby holds, in byte planes (see
    /// [`encode_delta`]).
    Delta,
}

impl PageForm {
    /// The byte that stands for this form on the wire.
    pub fn byte(self) -> u8 {
        match self {
            PageForm::Whole => 0,
            PageForm::Delta => 1,
        }
    }

    /// The form a wire byte stands for, if any.
    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            0 => Some(PageForm::Whole),
            1 => Some(PageForm::Delta),
            _ => None,
        }
    }
}

/// 8-byte words per page: each plane of a delta holds one byte of each.
const WORDS: usize = PAGE_SIZE / 8;

/// Writes into `out` the delta from page `base` to `page` as 8 planes: plane k (bytes
/// `k * WORDS ..`) holds byte k (little-endian) of each 8-byte word's zigzag-coded difference
/// (`page - base` as little-endian integers, wrapping), in word order.
pub fn encode_delta(base: &[u8], page: &[u8], out: &mut [u8]) {
    let (base, page) = (words(base), words(page));
    let planes = planes_mut(out);
    for (i, (b, p)) in base.iter().zip(page).enumerate() {
        let d = u64::from_le_bytes(*p).wrapping_sub(u64::from_le_bytes(*b));
        for (plane, byte) in planes.iter_mut().zip(zigzag(d).to_le_bytes()) {
            plane[i] = byte;
        }
    }
}

/// Writes into `out` the page that `delta` (from [`encode_delta`]) turns `base` into.
pub fn decode_delta(base: &[u8], delta: &[u8], out: &mut [u8]) {
    let planes = planes(delta);
    let (base, out) = (words(base), out.as_chunks_mut::<8>().0);
    for (i, (b, o)) in base.iter().zip(out).enumerate() {
        let d = unzigzag(u64::from_le_bytes(planes.map(|plane| plane[i])));
        *o = u64::from_le_bytes(*b).wrapping_add(d).to_le_bytes();
    }
}

/// A wrapping difference as a number whose size is that of the difference either way: 0, -1,
/// 1, -2 ... become 0, 1, 2, 3 ... (the low bit is the sign).
fn zigzag(d: u64) -> u64 {
    (d << 1) ^ (d >> 63).wrapping_neg()
}

fn unzigzag(z: u64) -> u64 {
    (z >> 1) ^ (z & 1).wrapping_neg()
}

/// A page as its 8-byte words.
fn words(page: &[u8]) -> &[[u8; 8]; WORDS] {
    let (words, _) = page.as_chunks::<8>();
    words
        .first_chunk::<WORDS>()
        .unwrap_or_else(|| panic!("a page of {} bytes", page.len()))
}

fn planes(delta: &[u8]) -> [&[u8; WORDS]; 8] {
    let (planes, _) = delta.as_chunks::<WORDS>();
    std::array::from_fn(|k| &planes[k])
}

fn planes_mut(out: &mut [u8]) -> &mut [[u8; WORDS]] {
    let (planes, _) = out.as_chunks_mut::<WORDS>();
    assert_eq!(planes.len(), 8, "a delta is a page");
    planes
}

/// Turns the delta pages of a received batch into the pages they stand for, in place, against
/// the copies in `memory` (the standby's committed image, which is what the primary's cache
/// holds for every page it sends as a delta: epochs commit in order, each before the next
/// one's pages are read).
pub fn resolve(
    memory: &GuestMemory,
    gpas: &[u64],
    forms: &[PageForm],
    data: &mut [u8],
) -> Result<(), DeltaError> {
    let mut base = vec![0u8; PAGE_SIZE];
    let mut plain = vec![0u8; PAGE_SIZE];
    let pages = gpas.iter().zip(forms).zip(data.chunks_exact_mut(PAGE_SIZE));
    for ((&gpa, form), body) in pages {
        if *form == PageForm::Delta {
            memory
                .read_slice(&mut base, GuestAddress(gpa))
                .map_err(|_| DeltaError::NotRam(gpa))?;
            decode_delta(&base, body, &mut plain);
            body.copy_from_slice(&plain);
        }
    }
    Ok(())
}

/// Bytes of pages the primary's cache holds at most (XBZRLE's default cache size in QEMU):
/// enough for the working set of a guest that rewrites tens of MiB per epoch, a small part of
/// a large guest's primary. Pages are held only once sent in an epoch, so an idle guest's
/// cache holds the few pages it dirties.
pub const CACHE_BYTES: usize = 64 << 20;

/// One page's place in the cache.
#[derive(Default)]
struct Slot {
    gpa: u64,
    /// The epoch that last sent this page.
    sent: u64,
    /// What was last sent of page `gpa`; None: the slot is free.
    page: Option<Box<[u8]>>,
    /// Sends of page `gpa` still to go whole, uncached (see [`RESTING_SENDS`]): meanwhile
    /// `page` is not what the standby holds.
    resting: u8,
}

/// What the primary last sent of each of up to `capacity` pages, for one standby connection
/// (a new connection starts with a new, empty cache, so a delta's base is always a page that
/// standby received). Direct-mapped by page number, as XBZRLE's cache is indexed by address:
/// a contiguous working set up to the capacity never evicts itself, and a lookup is one
/// lock of one slot, so the sender's workers share the cache without contention (an epoch
/// names each page once). A page whose slot holds another page takes it over only when that
/// page was not sent in this or the previous epoch, so that a working set larger than the
/// cache keeps a part of itself instead of evicting everything in turn.
pub struct PageCache {
    slots: Box<[Mutex<Slot>]>,
}

/// What a page says of whether deltas pay: its delta has at least an eighth of a page more
/// zero bytes than the page itself (`Yes`), not (`No`: fresh data, whose delta is as random as
/// the page; or a page that repeats one word, a fill, which lz4 takes whole as well as its
/// delta, for less work on both nodes), or nothing (`Unknown`: no copy cached yet, or a page
/// mostly zero itself, such as a grid's cold region, which compresses either way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Paid {
    Yes,
    No,
    Unknown,
}

/// Sends for which a page whose delta did not pay (fresh data: a network stream's buffers, a
/// random fill) goes whole without being cached or tried, as `wire::Packing` rests lz4 after
/// a miss: caching and trying cost a copy, a delta and two counts of the page on cores a busy
/// guest leaves few of (they halved a replicated TCP stream here), for nothing.
const RESTING_SENDS: u8 = 15;

impl PageCache {
    /// A cache of at most `bytes` of pages (0: none, every page goes whole). Pages are only
    /// allocated as they are cached.
    pub fn new(bytes: usize) -> Self {
        let slots = (0..bytes / PAGE_SIZE).map(|_| Mutex::default()).collect();
        Self { slots }
    }

    fn slot(&self, gpa: u64) -> Option<MutexGuard<'_, Slot>> {
        let count = vmm::cast::usize_to_u64(self.slots.len());
        let index = (gpa / vmm::cast::usize_to_u64(PAGE_SIZE)).checked_rem(count)?;
        let slot = &self.slots[vmm::cast::u64_to_usize(index)];
        Some(slot.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Records that `page` is sent as page `gpa` in `epoch`, handing `encode` the copy of it
    /// the standby holds, if the cache has it, to encode the page against before it is
    /// replaced. A page not cached is taken in if its slot is free or stale, unless `epoch` is
    /// 0 (the pre-copy: most of memory, sent once).
    pub fn send<R>(
        &self,
        epoch: u64,
        gpa: u64,
        page: &[u8],
        encode: impl FnOnce(Option<&[u8]>) -> R,
    ) -> R {
        self.send_or_rest(epoch, gpa, page, |base| (encode(base), false))
    }

    /// As [`Self::send`], with `encode` also saying whether the page rests from now on (see
    /// [`RESTING_SENDS`]): for its next sends it goes whole, neither tried nor cached, but for
    /// the last, which caches it again so that the send after it tries a delta once more.
    fn send_or_rest<R>(
        &self,
        epoch: u64,
        gpa: u64,
        page: &[u8],
        encode: impl FnOnce(Option<&[u8]>) -> (R, bool),
    ) -> R {
        let Some(mut slot) = self.slot(gpa) else {
            return encode(None).0;
        };
        let slot = &mut *slot;
        let hit = slot.page.is_some() && slot.gpa == gpa;
        let stale = slot.page.is_none() || slot.sent.saturating_add(1) < epoch;
        if hit && slot.resting > 0 {
            slot.resting -= 1;
            slot.sent = epoch;
            if slot.resting == 0 {
                if let Some(cached) = slot.page.as_deref_mut() {
                    cached.copy_from_slice(page);
                }
            }
            return encode(None).0;
        }
        if hit {
            let (result, rests) = encode(slot.page.as_deref());
            if let Some(cached) = slot.page.as_deref_mut() {
                cached.copy_from_slice(page);
            }
            slot.sent = epoch;
            if rests {
                slot.resting = RESTING_SENDS;
            }
            return result;
        }
        let (result, _) = encode(None);
        if epoch > 0 && stale {
            match slot.page.as_deref_mut() {
                Some(cached) => cached.copy_from_slice(page),
                None => slot.page = Some(page.into()),
            }
            slot.gpa = gpa;
            slot.sent = epoch;
            slot.resting = 0;
        }
        result
    }

    /// Encodes `page`, sent as page `gpa` in `epoch`, as [`Self::judge`] says (writing its
    /// delta into `out` if it goes as one), and what the page says of whether deltas pay (see
    /// [`Paid`]); a page whose delta did not pay rests.
    fn encode_cached(&self, epoch: u64, gpa: u64, page: &[u8], out: &mut [u8]) -> (PageForm, Paid) {
        self.send_or_rest(epoch, gpa, page, |base| {
            let judged = Self::judge(base, page, out);
            (judged, judged.1 == Paid::No)
        })
    }

    /// How `page` goes against `base`, the standby's copy if cached: [`PageForm::Delta`],
    /// its delta written into `out`, when the delta has more zero bytes than the page (what
    /// lz4 gains from most in either: a page that became zero, or changed whole, goes as it
    /// is), else [`PageForm::Whole`]; and whether deltas pay for it.
    fn judge(base: Option<&[u8]>, page: &[u8], out: &mut [u8]) -> (PageForm, Paid) {
        let Some(base) = base else {
            return (PageForm::Whole, Paid::Unknown);
        };
        let page_zeros = zero_bytes(page);
        if page_zeros < PAGE_SIZE / 2 && repeats_itself(page) {
            return (PageForm::Whole, Paid::No);
        }
        encode_delta(base, page, out);
        let delta_zeros = zero_bytes(out);
        let form = if delta_zeros > page_zeros {
            PageForm::Delta
        } else {
            PageForm::Whole
        };
        let paid = if page_zeros >= PAGE_SIZE / 2 {
            Paid::Unknown
        } else if delta_zeros >= page_zeros + PAGE_SIZE / 8 {
            Paid::Yes
        } else {
            Paid::No
        };
        (form, paid)
    }

    /// Bytes of pages the cache holds.
    pub fn held_bytes(&self) -> usize {
        let held = |slot: &Mutex<Slot>| {
            let slot = slot.lock().unwrap_or_else(|e| e.into_inner());
            slot.page.as_ref().map_or(0, |p| p.len())
        };
        self.slots.iter().map(held).sum()
    }
}

fn zero_bytes(bytes: &[u8]) -> usize {
    bytes.iter().filter(|&&b| b == 0).count()
}

/// Whether at least half of `page`'s 8-byte words repeat the word before them (a fill, or a
/// network stream's buffers of one repeated byte): lz4 takes such a page whole in a few
/// matches, so a delta would only add work.
fn repeats_itself(page: &[u8]) -> bool {
    let repeats = words(page).windows(2).filter(|w| w[0] == w[1]).count();
    repeats >= WORDS / 2
}

/// A batch whose pages are at least one in this many deltas tries lz4 even when
/// `wire::Packing` rests it.
const DELTA_BATCH_SHARE: usize = 8;

/// The frame for a batch of staged pages (`bytes` holds `gpas.len()` pages) sent in `epoch`:
/// each page encoded against `cache`; a batch without deltas is a plain `Pages` frame, lz4-
/// compressed if `compress` and that pays, one with deltas a `PageDeltas` frame, whose lz4 is
/// tried also when `compress` is not if [`DELTA_BATCH_SHARE`] says the batch is of deltas (lz4
/// is what the byte planes are for). Returns the frame and whether it is compressed.
pub fn encode_batch(
    cache: &PageCache,
    epoch: u64,
    gpas: &[u64],
    bytes: &[u8],
    compress: bool,
) -> (Vec<u8>, bool) {
    let pages = gpas.iter().zip(bytes.chunks_exact(PAGE_SIZE));
    let mut forms = Vec::with_capacity(gpas.len());
    // The bodies, made from the staged pages only once a delta turns up.
    let mut bodies: Option<Vec<u8>> = None;
    let mut delta = vec![0u8; PAGE_SIZE];
    let mut deltas = 0;
    for (i, (&gpa, page)) in pages.enumerate() {
        let (form, _) = cache.encode_cached(epoch, gpa, page, &mut delta);
        if form == PageForm::Delta {
            deltas += 1;
            let bodies = bodies.get_or_insert_with(|| bytes.to_vec());
            bodies[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].copy_from_slice(&delta);
        }
        forms.push(form);
    }
    match bodies {
        Some(bodies) => {
            // Not for a batch of fresh data with a few deltas among it.
            let compress = compress || deltas * DELTA_BATCH_SHARE >= gpas.len();
            wire::encode_page_deltas(epoch, gpas, &forms, &bodies, compress)
        }
        None => wire::encode_pages(epoch, gpas, bytes, compress),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl PageCache {
        /// Encodes `page` as the sender does, but never puts it to rest: the rules of `judge`
        /// and of the cache alone.
        fn encode(&self, epoch: u64, gpa: u64, page: &[u8], out: &mut [u8]) -> PageForm {
            self.send(epoch, gpa, page, |base| Self::judge(base, page, out).0)
        }
    }

    /// Deterministic pseudo-random bytes (xorshift64).
    fn noise(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[0]
            })
            .collect()
    }

    /// A page of doubles of random mantissas, as a computation writes them.
    fn doubles(scale: f64) -> Vec<u8> {
        let mantissas = noise(77, WORDS * 2);
        mantissas
            .chunks(2)
            .flat_map(|m| {
                let r = f64::from(u16::from_le_bytes([m[0], m[1]])) / 65536.0;
                (scale * (1.0 + r) * (1.0 + r / 3.0)).to_le_bytes()
            })
            .collect()
    }

    fn test_memory() -> GuestMemory {
        vmm::memory::create_guest_memory(64 << 20).unwrap()
    }

    fn round_trip(base: &[u8], page: &[u8]) -> Vec<u8> {
        let mut delta = vec![0u8; PAGE_SIZE];
        encode_delta(base, page, &mut delta);
        let mut back = vec![0u8; PAGE_SIZE];
        decode_delta(base, &delta, &mut back);
        assert_eq!(back, page);
        delta
    }

    #[test]
    fn deltas_round_trip() {
        let (zero, random) = (vec![0u8; PAGE_SIZE], noise(1, PAGE_SIZE));
        let mut one_byte = random.clone();
        one_byte[4000] ^= 0x10;
        let cases = [
            (&zero, &random),
            (&random, &zero),
            (&zero, &zero),
            (&random, &random),
            (&random, &one_byte),
            (&random, &noise(2, PAGE_SIZE)),
            (&doubles(1.0), &doubles(1.000_001)),
        ];
        for (base, page) in cases {
            round_trip(base, page);
        }
        assert!(round_trip(&random, &random).iter().all(|&b| b == 0));
        let one = round_trip(&random, &one_byte);
        // Byte 4000 is byte 0 of word 500: plane 0, position 500, the difference +-0x10
        // zigzag-coded.
        assert_eq!(one.iter().filter(|&&b| b != 0).count(), 1);
        assert!([0x20, 0x1f].contains(&one[500]), "{:#x}", one[500]);
        // A carry into a higher byte flips every bit below it, but the difference is small.
        let (mut before, mut after) = (zero.clone(), zero.clone());
        before[..8].copy_from_slice(&0x00ff_ffffu64.to_le_bytes());
        after[..8].copy_from_slice(&0x0100_0000u64.to_le_bytes());
        let carried = round_trip(&before, &after);
        assert_eq!(carried.iter().filter(|&&b| b != 0).count(), 1);
        assert_eq!((carried[0], zigzag(u64::MAX)), (2, 1), "+1 is 2, -1 is 1");
        // Nearby doubles share their high bytes: the top planes are zero.
        let near = round_trip(&doubles(1.0), &doubles(1.000_001));
        assert!(near[6 * WORDS..].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_cached_page_goes_as_a_delta_only_where_that_pays() {
        let cache = PageCache::new(16 * PAGE_SIZE);
        let mut out = vec![0u8; PAGE_SIZE];
        let (a, b) = (doubles(1.0), doubles(1.000_001));
        // The pre-copy caches nothing; an epoch's page goes whole the first time.
        assert_eq!(cache.encode(0, 0x1000, &a, &mut out), PageForm::Whole);
        assert_eq!(cache.held_bytes(), 0);
        assert_eq!(cache.encode(1, 0x1000, &a, &mut out), PageForm::Whole);
        assert_eq!(cache.held_bytes(), PAGE_SIZE);
        assert_eq!(cache.encode(2, 0x1000, &b, &mut out), PageForm::Delta);
        let mut back = vec![0u8; PAGE_SIZE];
        decode_delta(&a, &out, &mut back);
        assert_eq!(back, b);
        // The cache now holds b: an unchanged page is an all-zero delta.
        assert_eq!(cache.encode(3, 0x1000, &b, &mut out), PageForm::Delta);
        assert!(out.iter().all(|&x| x == 0));
        // A page that became zero, or changed whole, goes as it is.
        let zero = vec![0u8; PAGE_SIZE];
        assert_eq!(cache.encode(4, 0x1000, &zero, &mut out), PageForm::Whole);
        assert_eq!(
            cache.encode(5, 0x1000, &noise(3, PAGE_SIZE), &mut out),
            PageForm::Whole
        );
        // ... and still replaces the cached copy.
        let noisy = noise(3, PAGE_SIZE);
        let mut one_byte = noisy.clone();
        one_byte[7] ^= 1;
        assert_eq!(
            cache.encode(6, 0x1000, &one_byte, &mut out),
            PageForm::Delta
        );
        decode_delta(&noisy, &out, &mut back);
        assert_eq!(back, one_byte);
    }

    #[test]
    fn a_page_of_fresh_data_rests_then_is_cached_again_before_its_next_try() {
        let cache = PageCache::new(64 * PAGE_SIZE);
        let gpas: Vec<u64> = (0..4).map(|p| p * 0x1000).collect();
        let fresh = |seed| noise(seed, 4 * PAGE_SIZE);
        let is_deltas = |frame: &[u8]| {
            matches!(
                wire::FrameReader::new(frame).read_message(),
                Ok(wire::Message::PageDeltas { .. })
            )
        };
        // Epoch 1 caches the pages; fresh data over them in epoch 2 does not pay (whatever
        // form each page took: a random delta may have a few more zero bytes).
        encode_batch(&cache, 1, &gpas, &fresh(1), true);
        encode_batch(&cache, 2, &gpas, &fresh(2), true);
        // Resting, they go whole: unchanged pages tried would be all-zero deltas.
        let kept = fresh(3);
        let last_rest = 2 + u64::from(RESTING_SENDS);
        for epoch in 3..=last_rest {
            let (frame, _) = encode_batch(&cache, epoch, &gpas, &kept, true);
            assert!(!is_deltas(&frame), "epoch {epoch} tried deltas");
        }
        // The last resting send cached them again: now they are deltas against that copy.
        let (frame, _) = encode_batch(&cache, last_rest + 1, &gpas, &kept, true);
        assert!(is_deltas(&frame));
    }

    #[test]
    fn a_page_that_repeats_one_word_goes_whole_and_rests() {
        let cache = PageCache::new(16 * PAGE_SIZE);
        let mut out = vec![0u8; PAGE_SIZE];
        // A stream's buffer of one repeated byte, then the next bytes of that stream.
        let (fill, next) = (vec![b'x'; PAGE_SIZE], vec![b'y'; PAGE_SIZE]);
        assert!(repeats_itself(&fill) && !repeats_itself(&doubles(1.0)));
        assert!(!repeats_itself(&noise(5, PAGE_SIZE)));
        cache.encode(1, 0x1000, &fill, &mut out);
        // Cached, its delta would be all zero, but lz4 takes the page whole as well.
        assert_eq!(
            cache.encode_cached(2, 0x1000, &next, &mut out),
            (PageForm::Whole, Paid::No)
        );
        // A mostly zero page is no fill: it says nothing of deltas.
        let mut sparse = vec![0u8; PAGE_SIZE];
        sparse[..8].copy_from_slice(&1.5f64.to_le_bytes());
        assert_eq!(
            PageCache::judge(Some(&fill), &sparse, &mut out),
            (PageForm::Whole, Paid::Unknown)
        );
    }

    #[test]
    fn a_slot_is_taken_over_only_from_a_stale_page() {
        // Two slots: pages 0 and 2 share slot 0.
        let cache = PageCache::new(2 * PAGE_SIZE);
        let (page, mut out) = (doubles(2.0), vec![0u8; PAGE_SIZE]);
        let (p0, p2) = (0, 2 * 0x1000);
        cache.encode(1, p0, &page, &mut out);
        // Page 0 was sent in this epoch or the last: page 2 does not evict it.
        cache.encode(1, p2, &page, &mut out);
        cache.encode(2, p2, &page, &mut out);
        assert_eq!(cache.encode(2, p0, &page, &mut out), PageForm::Delta);
        // Unsent for two epochs, page 0 gives way to page 2.
        assert_eq!(cache.encode(4, p2, &page, &mut out), PageForm::Whole);
        assert_eq!(cache.encode(5, p2, &page, &mut out), PageForm::Delta);
        assert_eq!(cache.encode(5, p0, &page, &mut out), PageForm::Whole);
        assert_eq!(cache.held_bytes(), PAGE_SIZE);
        // A cache of no bytes holds nothing and sends everything whole.
        let none = PageCache::new(0);
        for epoch in 1..3 {
            assert_eq!(none.encode(epoch, p0, &page, &mut out), PageForm::Whole);
        }
        assert_eq!(none.held_bytes(), 0);
    }

    #[test]
    fn a_standby_resolves_deltas_against_its_memory() {
        let memory = test_memory();
        let (base, page) = (doubles(3.0), doubles(3.5));
        memory.write_slice(&base, GuestAddress(0x2000)).unwrap();
        let mut delta = vec![0u8; PAGE_SIZE];
        encode_delta(&base, &page, &mut delta);
        let whole = noise(4, PAGE_SIZE);
        let mut data = [delta.clone(), whole.clone()].concat();
        let forms = [PageForm::Delta, PageForm::Whole];
        resolve(&memory, &[0x2000, 0x5000], &forms, &mut data).unwrap();
        assert_eq!(data, [page, whole].concat());
        // A delta for a page beyond memory has no base.
        let got = resolve(&memory, &[1 << 40], &[PageForm::Delta], &mut delta);
        assert!(
            matches!(got, Err(DeltaError::NotRam(0x100_0000_0000))),
            "{got:?}"
        );
    }

    #[test]
    fn a_batch_frame_decodes_to_its_pages_against_the_standby_copy() {
        let cache = PageCache::new(64 * PAGE_SIZE);
        let gpas: Vec<u64> = (0..8u64).map(|i| i << 12).collect();
        let old: Vec<u8> = (0..8).flat_map(|i| doubles(1.0 + f64::from(i))).collect();
        let new: Vec<u8> = (0..8)
            .flat_map(|i| doubles((1.0 + f64::from(i)) * 1.000_001))
            .collect();
        let read = |frame: &[u8]| wire::FrameReader::new(frame).read_message().unwrap();
        let (first, _) = encode_batch(&cache, 1, &gpas, &old, true);
        assert!(matches!(read(&first), wire::Message::Pages { data, .. } if data == old));
        let (second, packed) = encode_batch(&cache, 2, &gpas, &new, false);
        assert!(packed, "deltas are compressed");
        assert!(
            second.len() * 2 < first.len(),
            "{} / {}",
            second.len(),
            first.len()
        );
        let wire::Message::PageDeltas {
            gpas: got,
            forms,
            mut data,
            ..
        } = read(&second)
        else {
            panic!("not deltas");
        };
        assert!(got == gpas && forms.iter().all(|&f| f == PageForm::Delta));
        let memory = test_memory();
        memory.write_slice(&old, GuestAddress(0)).unwrap();
        resolve(&memory, &gpas, &forms, &mut data).unwrap();
        assert_eq!(data, new);
    }

    #[test]
    fn forms_have_one_byte_each() {
        for form in [PageForm::Whole, PageForm::Delta] {
            assert_eq!(PageForm::from_byte(form.byte()), Some(form));
        }
        assert_eq!(PageForm::from_byte(2), None);
    }

    /// Encode speed of a delta (difference + shuffle) and of the whole batch path with lz4, printed
    /// with `cargo test --release -p checkpoint delta_speed -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn delta_speed() {
        let pages = 4096;
        let bases: Vec<u8> = (0..pages).flat_map(|i| doubles(1.0 + i as f64)).collect();
        let news: Vec<u8> = (0..pages)
            .flat_map(|i| doubles((1.0 + i as f64) * 1.000_001))
            .collect();
        let mut out = vec![0u8; PAGE_SIZE];
        let start = std::time::Instant::now();
        for (b, n) in bases.chunks(PAGE_SIZE).zip(news.chunks(PAGE_SIZE)) {
            encode_delta(b, n, &mut out);
        }
        let mib = (pages * PAGE_SIZE) as f64 / f64::from(1 << 20);
        println!(
            "xor + shuffle: {:.0} MiB/s",
            mib / start.elapsed().as_secs_f64()
        );
        let cache = PageCache::new(pages * PAGE_SIZE);
        let gpas: Vec<u64> = (0..pages as u64).map(|i| i << 12).collect();
        for (g, b) in gpas.chunks(256).zip(bases.chunks(256 * PAGE_SIZE)) {
            encode_batch(&cache, 1, g, b, true);
        }
        let start = std::time::Instant::now();
        let mut wire = 0;
        for (g, b) in gpas.chunks(256).zip(news.chunks(256 * PAGE_SIZE)) {
            wire += encode_batch(&cache, 2, g, b, true).0.len();
        }
        println!(
            "batches with the cache: {:.0} MiB/s, {:.3} wire bytes per byte",
            mib / start.elapsed().as_secs_f64(),
            wire as f64 / (pages * PAGE_SIZE) as f64
        );
    }
}
