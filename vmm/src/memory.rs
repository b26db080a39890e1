//! Guest RAM: its layout around the MMIO hole and its creation with a VMM-side dirty bitmap.

use std::fs::File;
use std::os::unix::fs::FileExt;

use guest_abi::{HIGH_RAM_START, LOW_RAM_END};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::cast::{u64_to_usize, usize_to_u64};
use crate::devices::GuestMemory;

/// Smallest guest RAM ftvmm accepts.
pub const MIN_MEM_SIZE: u64 = 64 << 20;
/// Largest guest RAM ftvmm accepts.
pub const MAX_MEM_SIZE: u64 = 64 << 30;
/// Guest page size used for dirty tracking.
pub const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size {0} is outside 64M..64G or not a multiple of 2M")]
    BadSize(u64),
    #[error("cannot allocate {size} bytes of guest memory: {source}")]
    Allocate {
        size: u64,
        source: vm_memory::mmap::FromRangesError,
    },
}

/// The RAM ranges of a guest with `mem_size` bytes: low RAM from 0 up to the MMIO hole, the
/// rest above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(GuestAddress, u64)> {
    let low = mem_size.min(LOW_RAM_END);
    let mut ranges = vec![(GuestAddress(0), low)];
    if mem_size > low {
        ranges.push((GuestAddress(HIGH_RAM_START), mem_size - low));
    }
    ranges
}

/// Checks a requested guest memory size.
pub fn check_mem_size(mem_size: u64) -> Result<(), MemoryError> {
    if !(MIN_MEM_SIZE..=MAX_MEM_SIZE).contains(&mem_size) || !mem_size.is_multiple_of(2 << 20) {
        return Err(MemoryError::BadSize(mem_size));
    }
    Ok(())
}

/// Parses a size like `64M`, `2G`, `1048576`, `512k` (binary units): guest RAM in `--mem` and
/// in a node's config.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, unit) = t
        .find(|c: char| !c.is_ascii_digit())
        .map_or((t, ""), |i| t.split_at(i));
    let shift = match unit
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        _ => return Err(format!("bad size '{s}': use a number with K, M or G")),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("bad size '{s}': use a number with K, M or G"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

/// Allocates zeroed guest RAM whose writes through vm-memory are recorded in a page bitmap.
pub fn create_guest_memory(mem_size: u64) -> Result<GuestMemory, MemoryError> {
    check_mem_size(mem_size)?;
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(mem_size)
        .into_iter()
        .map(|(a, s)| (a, u64_to_usize(s)))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Allocate {
        size: mem_size,
        source,
    })
}

/// Which guest pages the host never backed: neither in RAM nor swapped out, so they read as
/// zero (guest RAM is private anonymous memory). From /proc/self/pagemap, a window of
/// entries at a time, so that a first copy of a large guest passes over what it never
/// touched without reading it.
pub struct Residency {
    /// None when the pagemap cannot be read: every page then counts as backed.
    pagemap: Option<File>,
    /// Host page number of `entries[0]`.
    first: u64,
    entries: Vec<u64>,
}

/// Pagemap entries read at a time (32 KiB, 16 MiB of guest memory).
const PAGEMAP_WINDOW: usize = 4096;
const PAGEMAP_PRESENT: u64 = 1 << 63;
const PAGEMAP_SWAPPED: u64 = 1 << 62;

impl Residency {
    pub fn open() -> Self {
        Self {
            pagemap: File::open("/proc/self/pagemap").ok(),
            first: 0,
            entries: Vec::new(),
        }
    }

    /// Whether the page at `gpa` of `memory` was never backed (false when unsure).
    pub fn never_backed(&mut self, memory: &GuestMemory, gpa: u64) -> bool {
        let Some(host) = memory
            .get_host_address(GuestAddress(gpa))
            .ok()
            .map(|p| usize_to_u64(p as usize))
        else {
            return false;
        };
        let page = host / PAGE_SIZE;
        let cached = page
            .checked_sub(self.first)
            .map(u64_to_usize)
            .filter(|&i| i < self.entries.len());
        let index = match cached {
            Some(i) => i,
            None => {
                if !self.load(page) {
                    return false;
                }
                0
            }
        };
        self.entries[index] & (PAGEMAP_PRESENT | PAGEMAP_SWAPPED) == 0
    }

    /// Reads the window of entries from host page `page` on.
    fn load(&mut self, page: u64) -> bool {
        let Some(file) = &self.pagemap else {
            return false;
        };
        let mut raw = vec![0u8; PAGEMAP_WINDOW * 8];
        let Ok(n) = file.read_at(&mut raw, page * 8) else {
            return false;
        };
        self.first = page;
        self.entries = raw[..n - n % 8]
            .as_chunks::<8>()
            .0
            .iter()
            .map(|e| u64::from_le_bytes(*e))
            .collect();
        !self.entries.is_empty()
    }
}

/// The pages written in one interval: a bitmap (one bit per 4 KiB page) per RAM region.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtyLog {
    regions: Vec<DirtyRegion>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct DirtyRegion {
    start: GuestAddress,
    len: u64,
    bits: Vec<u64>,
}

impl DirtyLog {
    /// Adds a region of `len` bytes at `start` whose pages are marked in `bits`.
    pub fn add_region(&mut self, start: GuestAddress, len: u64, bits: Vec<u64>) {
        self.regions.push(DirtyRegion { start, len, bits });
    }

    /// A log naming every page of `memory` (what an initial copy sends).
    pub fn all(memory: &GuestMemory) -> Self {
        let mut log = Self::default();
        for region in memory.iter() {
            let pages = region.len().div_ceil(PAGE_SIZE);
            let mut bits = vec![u64::MAX; u64_to_usize(pages.div_ceil(64))];
            if pages % 64 != 0 {
                if let Some(last) = bits.last_mut() {
                    *last = (1u64 << (pages % 64)) - 1;
                }
            }
            log.add_region(region.start_addr(), region.len(), bits);
        }
        log
    }

    /// The pages of this log for which `keep(gpa)` holds, in a log of the same regions.
    pub fn select(&self, mut keep: impl FnMut(u64) -> bool) -> Self {
        let mut selected = Self {
            regions: self
                .regions
                .iter()
                .map(|r| DirtyRegion {
                    bits: vec![0; r.bits.len()],
                    ..r.clone()
                })
                .collect(),
        };
        for (region, out) in self.regions.iter().zip(&mut selected.regions) {
            for (i, &word) in region.bits.iter().enumerate() {
                let mut w = word;
                while w != 0 {
                    let bit = w.trailing_zeros() as u64;
                    w &= w - 1;
                    if keep(region.start.0 + (usize_to_u64(i) * 64 + bit) * PAGE_SIZE) {
                        out.bits[i] |= 1 << bit;
                    }
                }
            }
        }
        selected
    }

    /// Adds the pages of `other`, a log of the same memory.
    pub fn union_with(&mut self, other: &DirtyLog) {
        for (mine, theirs) in self.regions.iter_mut().zip(&other.regions) {
            for (a, b) in mine.bits.iter_mut().zip(&theirs.bits) {
                *a |= b;
            }
        }
    }

    /// Each region's bitmap, in region order.
    pub(crate) fn region_bits(&self) -> impl Iterator<Item = &[u64]> {
        self.regions.iter().map(|r| r.bits.as_slice())
    }

    /// Number of dirty pages.
    pub fn count(&self) -> usize {
        self.regions
            .iter()
            .flat_map(|r| &r.bits)
            .map(|w| w.count_ones() as usize)
            .sum()
    }

    /// The guest-physical address of every dirty page, in ascending order.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.regions.iter().flat_map(|r| {
            let pages = r.len / PAGE_SIZE;
            r.bits.iter().enumerate().flat_map(move |(i, &word)| {
                let mut w = word;
                std::iter::from_fn(move || {
                    if w == 0 {
                        return None;
                    }
                    let bit = w.trailing_zeros() as u64;
                    w &= w - 1;
                    Some(usize_to_u64(i) * 64 + bit)
                })
                .filter(move |&page| page < pages)
                .map(move |page| r.start.0 + page * PAGE_SIZE)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999G").is_err());
    }

    #[test]
    fn layout_splits_around_the_mmio_hole() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        let big = ram_ranges(4 << 30);
        assert_eq!(big[0], (GuestAddress(0), LOW_RAM_END));
        assert_eq!(
            big[1],
            (GuestAddress(HIGH_RAM_START), (4 << 30) - LOW_RAM_END)
        );
    }

    #[test]
    fn sizes_are_checked() {
        assert!(check_mem_size(256 << 20).is_ok());
        assert!(check_mem_size(1 << 20).is_err());
        assert!(check_mem_size(65 << 30).is_err());
        assert!(check_mem_size((256 << 20) + 4096).is_err());
        let mem = create_guest_memory(64 << 20).unwrap();
        assert_eq!(mem.num_regions(), 1);
    }

    #[test]
    fn dirty_log_lists_pages_in_order() {
        let mut log = DirtyLog::default();
        log.add_region(GuestAddress(0), 128 * PAGE_SIZE, vec![0b1001, 1 << 63]);
        log.add_region(GuestAddress(HIGH_RAM_START), 3 * PAGE_SIZE, vec![0b110]);
        let pages: Vec<u64> = log.pages().collect();
        assert_eq!(
            pages,
            vec![
                0,
                3 * PAGE_SIZE,
                127 * PAGE_SIZE,
                HIGH_RAM_START + PAGE_SIZE,
                HIGH_RAM_START + 2 * PAGE_SIZE
            ]
        );
        assert_eq!(log.count(), 5);
        let mem = create_guest_memory(66 << 20).unwrap();
        let all = DirtyLog::all(&mem);
        assert_eq!(usize_to_u64(all.count()), (66 << 20) / PAGE_SIZE);
        assert_eq!(all.pages().last(), Some((66 << 20) - PAGE_SIZE));
    }
}
