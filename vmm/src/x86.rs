//! x86 control-register, EFER, RFLAGS and page-table bits that both boot paths set, and the
//! identity map both build.

use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use crate::devices::GuestMemory;

pub const RFLAGS_IOPL3: u64 = 3 << 12;
/// Bit 1 of RFLAGS always reads as one.
pub const RFLAGS_RESERVED: u64 = 1 << 1;
pub const CR0_PE: u64 = 1;
pub const CR0_MP: u64 = 1 << 1;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_WP: u64 = 1 << 16;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_OSFXSR: u64 = 1 << 9;
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
pub const PTE_PRESENT: u64 = 1;
pub const PTE_WRITE: u64 = 1 << 1;
pub const PTE_USER: u64 = 1 << 2;
pub const PTE_HUGE: u64 = 1 << 7;
pub const GIB: u64 = 1 << 30;

/// The GDTR limit (size less one) of a GDT of `slots` 8-byte descriptor slots.
#[allow(clippy::cast_possible_truncation)] // at most 8192 slots, so the limit fits 16 bits
pub const fn gdt_limit(slots: usize) -> u16 {
    assert!(slots > 0 && slots <= 8192, "a GDT has 1 to 8192 slots");
    (slots * 8 - 1) as u16
}

/// Identity-maps guest-physical 0..`gibs` GiB with 2 MiB pages carrying `flags`: a PML4 at
/// `pml4`, its PDPT in the next page, then one page directory per GiB.
pub fn write_identity_map(
    mem: &GuestMemory,
    pml4: u64,
    gibs: u64,
    flags: u64,
) -> Result<(), GuestMemoryError> {
    let pdpt = pml4 + 0x1000;
    let pds = pdpt + 0x1000;
    mem.write_obj(pdpt | flags, GuestAddress(pml4))?;
    for g in 0..gibs {
        let pd = pds + g * 0x1000;
        mem.write_obj(pd | flags, GuestAddress(pdpt + g * 8))?;
        let entries: Vec<u8> = (0..512u64)
            .flat_map(|i| ((g * GIB + i * (2 << 20)) | flags | PTE_HUGE).to_le_bytes())
            .collect();
        mem.write_slice(&entries, GuestAddress(pd))?;
    }
    Ok(())
}
