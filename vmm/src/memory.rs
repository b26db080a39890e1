//! Guest RAM: its layout around the MMIO hole and its creation with a VMM-side dirty bitmap.

use guest_abi::{HIGH_RAM_START, LOW_RAM_END};
use vm_memory::{GuestAddress, GuestMemoryMmap};

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

/// Allocates zeroed guest RAM whose writes through vm-memory are recorded in a page bitmap.
pub fn create_guest_memory(mem_size: u64) -> Result<GuestMemory, MemoryError> {
    check_mem_size(mem_size)?;
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(mem_size)
        .into_iter()
        .map(|(a, s)| (a, s as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Allocate {
        size: mem_size,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend as _;

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
}
