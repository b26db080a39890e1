//! Page encodings compared on the same page streams: the dirty pages of a stencil run,
//! recorded epoch by epoch, fed to lz4 alone (the protocol before delta compression), Remus's
//! XOR + run length encoding, QEMU's XBZRLE, XOR + lz4 without the byte planes, and ftvmm's
//! scheme (`checkpoint::delta`), each with a page cache of its own, of the product's size and
//! policy. The comparison encoders are the bench's only: the product does not use them.
//!
//! ftvmm's and lz4's figures are whole frames (header, epoch, addresses, page forms); XOR+RLE
//! and XBZRLE count only their encoded page bytes, without addresses or per-page headers, which
//! favours them slightly (about 8 bytes a page).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use checkpoint::delta::{self, PageCache};
use checkpoint::hot::HotPages;
use checkpoint::staging::StagedPages;
use checkpoint::wire::{self, PAGE_SIZE};
use vmm::VmOutcome;

use super::{build, Capture, Figure, Row};
use crate::run::Error;

/// Epochs recorded: the last ones of the run, the first of them only filling the caches.
const RECORDED_EPOCHS: usize = 10;
/// Pages per frame, as the primary's sender batches them.
const BATCH_PAGES: usize = 256;

/// One epoch's dirty pages as a checkpoint would copy them.
struct Epoch {
    number: u64,
    gpas: Vec<u64>,
    data: Vec<u8>,
}

/// Runs the stencil of `config` with dirty logging harvested every `period`, as the replicated
/// run does (pages written last epoch kept writable, so the harvest is what a checkpoint
/// copies), copying each epoch's dirty pages in a pause; keeps the last [`RECORDED_EPOCHS`].
fn record(config: &vmm::VmConfig, period: Duration) -> Result<Vec<Epoch>, Error> {
    let mut vmm = build("stencil", config, Box::new(Capture::default()), None, None)?;
    vmm.set_dirty_logging(true)?;
    vmm.harvest_dirty()?;
    vmm.start()?;
    let mut hot = HotPages::default();
    let mut epochs = VecDeque::new();
    let mut next = Instant::now() + period;
    let mut number = 0;
    while vmm.outcome().is_none() {
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        next += period;
        vmm.pause();
        let log = vmm.harvest_dirty_rearming(|log| hot.rearm(log, usize::MAX))?;
        let mut staged = StagedPages::default();
        let copied = staged.copy_from(vmm.memory(), &log);
        vmm.resume();
        copied?;
        number += 1;
        if epochs.len() == RECORDED_EPOCHS {
            epochs.pop_front();
        }
        let data = staged.bytes().to_vec();
        epochs.push_back(Epoch {
            number,
            gpas: staged.gpas,
            data,
        });
    }
    match vmm.wait() {
        VmOutcome::Exited(0) => Ok(epochs.into()),
        other => Err(format!("recorded stencil ended with {other:?}").into()),
    }
}

/// The encodings compared, in the order of the row's figures.
#[derive(Clone, Copy)]
enum Scheme {
    Lz4,
    XorRle,
    Xbzrle,
    XorLz4,
    Ftvmm,
}

impl Scheme {
    const ALL: [Scheme; 5] = [
        Scheme::Lz4,
        Scheme::XorRle,
        Scheme::Xbzrle,
        Scheme::XorLz4,
        Scheme::Ftvmm,
    ];

    fn id(self) -> &'static str {
        match self {
            Scheme::Lz4 => "lz4",
            Scheme::XorRle => "xor_rle",
            Scheme::Xbzrle => "xbzrle",
            Scheme::XorLz4 => "xor_lz4",
            Scheme::Ftvmm => "ftvmm",
        }
    }

    /// Wire bytes for one batch of `epoch` (pages `gpas`, bytes `data`), against `cache`.
    fn batch_bytes(self, cache: &PageCache, epoch: u64, gpas: &[u64], data: &[u8]) -> usize {
        let pages = gpas.iter().zip(data.chunks_exact(PAGE_SIZE));
        match self {
            Scheme::Lz4 => wire::encode_pages(epoch, gpas, data, true).0.len(),
            Scheme::Ftvmm => delta::encode_batch(cache, epoch, gpas, data, true).0.len(),
            Scheme::XorRle => pages
                .map(|(&gpa, page)| cache.send(epoch, gpa, page, |base| xor_rle_len(base, page)))
                .sum(),
            Scheme::Xbzrle => pages
                .map(|(&gpa, page)| cache.send(epoch, gpa, page, |base| xbzrle_len(base, page)))
                .sum(),
            Scheme::XorLz4 => {
                let mut bodies = data.to_vec();
                let forms: Vec<delta::PageForm> = pages
                    .enumerate()
                    .map(|(i, (&gpa, page))| {
                        let body = &mut bodies[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
                        cache.send(epoch, gpa, page, |base| xor_if_it_pays(base, page, body))
                    })
                    .collect();
                wire::encode_page_deltas(epoch, gpas, &forms, &bodies, true)
                    .0
                    .len()
            }
        }
    }
}

/// Writes into `body` the plain XOR of `base` and `page` where it has more zero bytes than
/// the page (the rule ftvmm's encoder uses), leaving the page there otherwise; says which.
fn xor_if_it_pays(base: Option<&[u8]>, page: &[u8], body: &mut [u8]) -> delta::PageForm {
    let Some(base) = base else {
        return delta::PageForm::Whole;
    };
    let xor: Vec<u8> = base.iter().zip(page).map(|(b, p)| b ^ p).collect();
    let zeros = |bytes: &[u8]| bytes.iter().filter(|&&b| b == 0).count();
    if zeros(&xor) > zeros(page) {
        body.copy_from_slice(&xor);
        delta::PageForm::Delta
    } else {
        delta::PageForm::Whole
    }
}

/// Remus's checkpoint compression (Xen's xc_compression.c): a page not cached goes whole
/// behind a marker byte; a cached one as runs of 4-byte words, each run a header byte (a flag
/// and up to 127 words) followed, for a run of changed words, by the new words; an unchanged
/// page is one byte.
fn xor_rle_len(base: Option<&[u8]>, page: &[u8]) -> usize {
    let Some(base) = base else {
        return PAGE_SIZE + 1;
    };
    let changed: Vec<bool> = base
        .chunks_exact(4)
        .zip(page.chunks_exact(4))
        .map(|(b, p)| b != p)
        .collect();
    if !changed.contains(&true) {
        return 1;
    }
    let mut len = 0;
    for run in changed.chunk_by(|a, b| a == b) {
        for part in run.chunks(127) {
            len += 1 + if part[0] { 4 * part.len() } else { 0 };
        }
    }
    len
}

/// QEMU's XBZRLE (migration/xbzrle.c) as QEMU sends it: a zero page as a flag (one byte here),
/// a page not cached whole; a cached one as pairs of a ULEB128 length of unchanged bytes and a
/// ULEB128 length of changed bytes followed by those bytes (a trailing unchanged run is not
/// encoded, an unchanged page not sent); an encoding longer than the page goes whole.
fn xbzrle_len(base: Option<&[u8]>, page: &[u8]) -> usize {
    if page.iter().all(|&b| b == 0) {
        return 1;
    }
    let Some(base) = base else {
        return PAGE_SIZE;
    };
    let uleb = |n: usize| (usize::BITS - n.max(1).leading_zeros()).div_ceil(7) as usize;
    let same: Vec<bool> = base.iter().zip(page).map(|(b, p)| b == p).collect();
    let runs: Vec<&[bool]> = same.chunk_by(|a, b| a == b).collect();
    let mut len = 0;
    let mut i = 0;
    while i < runs.len() {
        let zero_run = if runs[i][0] { runs[i].len() } else { 0 };
        i += usize::from(runs[i][0]);
        let Some(changed) = runs.get(i) else { break };
        len += uleb(zero_run) + uleb(changed.len()) + changed.len();
        i += 1;
    }
    if len > PAGE_SIZE {
        PAGE_SIZE
    } else {
        len
    }
}

/// Each scheme's wire bytes over the recorded epochs but the first (which only fills the
/// caches), with the dirty bytes they carried and the time ftvmm's encoder took.
struct Totals {
    wire: Vec<usize>,
    dirty: usize,
    ftvmm_time: Duration,
}

fn encode_all(epochs: &[Epoch], cache_bytes: usize) -> Totals {
    let mut totals = Totals {
        wire: vec![0; Scheme::ALL.len()],
        dirty: 0,
        ftvmm_time: Duration::ZERO,
    };
    for (scheme, wire) in Scheme::ALL.into_iter().zip(&mut totals.wire) {
        let cache = PageCache::new(cache_bytes);
        for (i, epoch) in epochs.iter().enumerate() {
            let start = Instant::now();
            let batches = epoch.gpas.chunks(BATCH_PAGES);
            let bytes: usize = batches
                .zip(epoch.data.chunks(BATCH_PAGES * PAGE_SIZE))
                .map(|(gpas, data)| scheme.batch_bytes(&cache, epoch.number, gpas, data))
                .sum();
            if i > 0 {
                *wire += bytes;
                if matches!(scheme, Scheme::Ftvmm) {
                    totals.ftvmm_time += start.elapsed();
                }
            }
        }
    }
    totals.dirty = epochs.iter().skip(1).map(|e| e.data.len()).sum();
    totals
}

/// The rows of the stencil run `config` (working set `size` MiB), harvested every `period`.
pub(super) fn rows(
    config: &vmm::VmConfig,
    size: usize,
    period: Duration,
    rows: &mut Vec<Row>,
) -> Result<(), Error> {
    let epochs = record(config, period)?;
    let cache_bytes = delta::CACHE_BYTES.min(vmm::cast::u64_to_usize(config.mem_size));
    let totals = encode_all(&epochs, cache_bytes);
    let dirty = totals.dirty.max(1) as f64;
    let per_dirty: Vec<f64> = totals.wire.iter().map(|&w| w as f64 / dirty).collect();
    let mib_per_epoch = dirty / (epochs.len().max(2) - 1) as f64 / f64::from(1 << 20);
    rows.push(Row {
        what: format!(
            "wire bytes per dirty byte on the same page streams ({} epochs of the stencil, \
             {mib_per_epoch:.1} MiB dirty each): lz4 / XOR+RLE (Remus) / XBZRLE (QEMU) / \
             XOR+lz4 / ftvmm (difference, byte planes, lz4)",
            epochs.len().saturating_sub(1)
        ),
        figures: Scheme::ALL
            .iter()
            .zip(&per_dirty)
            .map(|(s, &v)| Figure::ratio(format!("wire_per_dirty_{size}mib_{}", s.id()), v))
            .collect(),
        target: if size == 16 { "ftvmm <= 0.5" } else { "-" },
    });
    let (xor_rle, ftvmm) = (per_dirty[1], per_dirty[4]);
    rows.push(Row::new(
        format!("ftvmm's wire bytes over XOR+RLE's, same streams, {mib_per_epoch:.1} MiB/epoch"),
        Figure::ratio(
            format!("ftvmm_over_xor_rle_{size}mib"),
            ftvmm / xor_rle.max(1e-9),
        ),
        "<= 0.8",
    ));
    rows.push(Row::new(
        format!(
            "ftvmm's encoder (cache, difference, byte planes, lz4) on one thread, {mib_per_epoch:.1} \
             MiB/epoch"
        ),
        Figure::new(
            format!("delta_encode_mib_s_{size}mib"),
            dirty / f64::from(1 << 20) / totals.ftvmm_time.as_secs_f64().max(1e-9),
            "MiB/s",
            0,
        ),
        "-",
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remus_and_xbzrle_sizes() {
        let base = vec![7u8; PAGE_SIZE];
        let mut page = base.clone();
        assert_eq!(xor_rle_len(None, &page), PAGE_SIZE + 1);
        assert_eq!(xor_rle_len(Some(&base), &page), 1);
        assert_eq!(xbzrle_len(Some(&base), &page), 0);
        page[100] = 0;
        // Words 0-24 unchanged (one run), word 25 changed, words 26-1023 unchanged (8 runs).
        assert_eq!(xor_rle_len(Some(&base), &page), 1 + 5 + 8);
        // 100 unchanged bytes (a 1-byte ULEB128), 1 changed (1 + 1), the rest not encoded.
        assert_eq!(xbzrle_len(Some(&base), &page), 1 + 1 + 1);
        let changed = vec![8u8; PAGE_SIZE];
        assert_eq!(xbzrle_len(Some(&base), &changed), PAGE_SIZE);
        assert_eq!(xbzrle_len(None, &vec![0; PAGE_SIZE]), 1);
    }
}
