//! The boot contract between ftvmm and a payload guest.
//!
//! ftvmm enters every vCPU at the payload's ELF entry point in 64-bit long mode at CPL3, with
//! IOPL=3 and interrupts off, on identity-mapped user-accessible page tables, with:
//! - `rdi` = guest-physical (= virtual) address of a [`BootInfo`] block,
//! - `rsi` = the vCPU id,
//! - `rsp` = the top of that vCPU's stack (16-byte aligned).
//!
//! Both sides compile this crate, so the layout below is the single source of truth.
#![no_std]

/// Guest-physical address of the GDT built by ftvmm.
pub const GDT_ADDR: u64 = 0x1000;
/// Guest-physical address of the TSS built by ftvmm (with its 8 KiB I/O permission bitmap it
/// extends to 0x4069).
pub const TSS_ADDR: u64 = 0x2000;
/// Guest-physical address of the [`BootInfo`] block.
pub const BOOT_INFO_ADDR: u64 = 0x6000;
/// Guest-physical address of the page-table area (PML4, PDPTs, PDs follow it).
pub const PAGE_TABLE_ADDR: u64 = 0x10000;
/// Payload segments must lie at or above this address (below it is ftvmm's boot area).
pub const PAYLOAD_MIN_ADDR: u64 = 0x10_0000;
/// Bytes of stack given to each vCPU.
pub const STACK_SIZE: u64 = 1 << 20;

/// Guest RAM below the MMIO hole ends here at the latest; the rest starts at [`HIGH_RAM_START`].
pub const LOW_RAM_END: u64 = 0xC000_0000;
/// Where guest RAM continues when it does not fit below the MMIO hole.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// Base of the virtio-mmio device windows, one [`MMIO_DEVICE_SIZE`] window per device.
pub const MMIO_BASE: u64 = 0xD000_0000;
/// Size of one virtio-mmio device window.
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// First legacy IRQ line given to virtio-mmio devices (Linux guests; payloads poll).
pub const MMIO_FIRST_IRQ: u32 = 5;

/// COM1, a 16550 UART. Payloads write whole buffers with `rep outsb` (one VM exit per batch).
pub const PORT_UART: u16 = 0x3f8;
/// A 32-bit write here ends the VM; the value is the exit code ftvmm exits with.
pub const PORT_EXIT: u16 = 0x0501;
/// A write here parks the writing vCPU for good (CPL3 cannot `hlt`); the VM ends when every
/// vCPU has parked or one has written [`PORT_EXIT`]. The value written is ignored.
pub const PORT_PARK: u16 = 0x0502;
/// A 32-bit write here naps the writing vCPU for that many microseconds (at most
/// [`MAX_NAP_US`]; longer is cut to it), off the CPU, or less if ftvmm pauses the VM meanwhile:
/// a guest with nothing to do waits without burning a host core (CPL3 cannot `hlt`).
pub const PORT_NAP: u16 = 0x0504;
/// The longest nap one write to [`PORT_NAP`] asks for.
pub const MAX_NAP_US: u32 = 100_000;

/// Batched console output: ONE VM exit per batch. (`rep outsb` to [`PORT_UART`] is emulated by
/// KVM one byte per exit, 30-50 us each under PVM, so it cannot batch.)
/// - A 32-bit read returns [`CONSOLE_BATCH_MAGIC`] when ftvmm supports this port (an unclaimed
///   port reads as all ones); payloads probe once and fall back to the UART otherwise.
/// - A 32-bit write of the guest-physical address (below 4 GiB, 4-byte aligned) of a record
///   `{ len: u32 (little endian), bytes: [u8; len] }` sends those `len` bytes (at most
///   [`CONSOLE_BATCH_MAX`]) to the console as one batch, in order with UART output.
pub const PORT_CONSOLE_BATCH: u16 = 0x0503;
/// What a 32-bit read of [`PORT_CONSOLE_BATCH`] returns when supported: "FTVC".
pub const CONSOLE_BATCH_MAGIC: u32 = u32::from_le_bytes(*b"FTVC");
/// Largest `len` of one [`PORT_CONSOLE_BATCH`] record (the record then fills one 4 KiB page).
pub const CONSOLE_BATCH_MAX: u32 = 4092;

/// Magic value at the start of [`BootInfo`]: "FTVMMBI1".
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"FTVMMBI1");
/// Maximum number of memory regions in [`BootInfo`].
pub const MAX_MEM_REGIONS: usize = 2;
/// Maximum number of devices in [`BootInfo`].
pub const MAX_DEVICES: usize = 8;
/// Maximum bytes of the argument string (NUL separated arguments).
pub const MAX_ARGS_LEN: usize = 2048;

/// A range of guest RAM.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemRegion {
    pub start: u64,
    pub size: u64,
}

/// Kinds of devices listed in [`BootInfo`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    None = 0,
    VirtioBlk = 1,
    VirtioNet = 2,
}

/// A device the payload may drive.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// A [`DeviceKind`] value.
    pub kind: u32,
    /// Legacy IRQ line (unused by polling payloads).
    pub irq: u32,
    /// Guest-physical base of the virtio-mmio window.
    pub mmio_base: u64,
}

/// The block ftvmm writes at [`BOOT_INFO_ADDR`] before entering the payload.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// Total guest RAM in bytes.
    pub mem_size: u64,
    /// Number of vCPUs; each enters with its id in `rsi`.
    pub vcpu_count: u32,
    /// Number of valid entries in `mem_regions`.
    pub mem_region_count: u32,
    pub mem_regions: [MemRegion; MAX_MEM_REGIONS],
    /// First byte of RAM free for the payload's heap (after image and stacks) in region 0.
    pub heap_start: u64,
    /// Guest TSC frequency in kHz (for the payload's clock).
    pub tsc_khz: u64,
    /// Number of valid entries in `devices`.
    pub device_count: u32,
    /// Length in bytes of `args`.
    pub args_len: u32,
    pub devices: [DeviceInfo; MAX_DEVICES],
    /// The payload's arguments, each terminated by a NUL byte.
    pub args: [u8; MAX_ARGS_LEN],
}

impl BootInfo {
    /// Iterates over the payload's arguments.
    pub fn args(&self) -> impl Iterator<Item = &[u8]> {
        let all = &self.args[..(self.args_len as usize).min(MAX_ARGS_LEN)];
        let all = all.strip_suffix(&[0]).unwrap_or(all);
        all.split(|b| *b == 0).filter(move |_| !all.is_empty())
    }

    /// The devices ftvmm attached.
    pub fn devices(&self) -> &[DeviceInfo] {
        &self.devices[..(self.device_count as usize).min(MAX_DEVICES)]
    }

    /// The RAM regions.
    pub fn mem_regions(&self) -> &[MemRegion] {
        &self.mem_regions[..(self.mem_region_count as usize).min(MAX_MEM_REGIONS)]
    }
}
