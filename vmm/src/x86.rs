//! x86 control-register, EFER and RFLAGS bits that both boot paths set.

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
