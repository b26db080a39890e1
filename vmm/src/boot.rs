//! Payload boot: ELF checks and loading, identity page tables, GDT/TSS, the boot-info block and
//! the register state every vCPU enters the payload with (long mode, CPL3, IOPL=3, IF=0).

use std::io::Cursor;

use guest_abi::{
    BootInfo, DeviceInfo, MemRegion, BOOT_INFO_ADDR, BOOT_INFO_MAGIC, GDT_ADDR, MAX_ARGS_LEN,
    MAX_DEVICES, PAGE_TABLE_ADDR, PAYLOAD_MIN_ADDR, STACK_SIZE, TSS_ADDR,
};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::{elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::cast::{u64_to_usize, usize_to_u64};
use crate::devices::GuestMemory;
use crate::memory::ram_ranges;
use crate::x86::*;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("payload is not an ELF file")]
    NotElf,
    #[error("payload is not a 64-bit little-endian x86-64 executable ELF ({0})")]
    WrongElfKind(&'static str),
    #[error("payload ELF is truncated or its program headers are malformed")]
    Malformed,
    #[error(
        "payload segment {start:#x}..{end:#x} lies outside guest RAM {ram_start:#x}..{ram_end:#x}"
    )]
    SegmentOutsideMemory {
        start: u64,
        end: u64,
        ram_start: u64,
        ram_end: u64,
    },
    #[error("payload entry point {0:#x} is not inside a loadable segment")]
    BadEntry(u64),
    #[error(
        "guest memory too small: payload and {vcpus} vCPU stacks need {needed:#x} bytes of low RAM"
    )]
    TooSmall { vcpus: u32, needed: u64 },
    #[error("payload arguments exceed {MAX_ARGS_LEN} bytes")]
    ArgsTooLong,
    #[error("too many devices (at most {MAX_DEVICES})")]
    TooManyDevices,
    #[error("cannot load payload: {0}")]
    Load(#[from] linux_loader::loader::Error),
    #[error("cannot write boot structures into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// The extent of a checked payload image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayloadImage {
    pub entry: u64,
    /// First byte after the highest segment (including bss).
    pub end: u64,
}

const PT_LOAD: u32 = 1;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Checks that `elf` is a static x86-64 executable whose every loadable segment fits in guest
/// low RAM above the boot area; returns its entry point and end.
pub fn check_payload(elf: &[u8], mem_size: u64) -> Result<PayloadImage, BootError> {
    if elf.get(..4) != Some(b"\x7fELF") {
        return Err(BootError::NotElf);
    }
    if elf.get(4) != Some(&2) {
        return Err(BootError::WrongElfKind("not ELFCLASS64"));
    }
    if elf.get(5) != Some(&1) {
        return Err(BootError::WrongElfKind("not little-endian"));
    }
    if u16_at(elf, 18) != Some(EM_X86_64) {
        return Err(BootError::WrongElfKind("machine is not x86-64"));
    }
    if u16_at(elf, 16) != Some(ET_EXEC) {
        return Err(BootError::WrongElfKind("not a static executable (ET_EXEC)"));
    }
    let entry = u64_at(elf, 24).ok_or(BootError::Malformed)?;
    let phoff = u64_to_usize(u64_at(elf, 32).ok_or(BootError::Malformed)?);
    let phentsize = u16_at(elf, 54).ok_or(BootError::Malformed)? as usize;
    let phnum = u16_at(elf, 56).ok_or(BootError::Malformed)? as usize;
    if phentsize != 56 || phnum == 0 {
        return Err(BootError::Malformed);
    }
    let ram_end = ram_ranges(mem_size)[0].1;
    let mut end = 0;
    let mut entry_ok = false;
    for i in 0..phnum {
        let ph = phoff
            .checked_add(i * phentsize)
            .and_then(|o| elf.get(o..o + phentsize))
            .ok_or(BootError::Malformed)?;
        if u32_at(ph, 0) != Some(PT_LOAD) {
            continue;
        }
        let offset = u64_at(ph, 8).ok_or(BootError::Malformed)?;
        let paddr = u64_at(ph, 24).ok_or(BootError::Malformed)?;
        let filesz = u64_at(ph, 32).ok_or(BootError::Malformed)?;
        let memsz = u64_at(ph, 40).ok_or(BootError::Malformed)?;
        if offset
            .checked_add(filesz)
            .is_none_or(|e| e > usize_to_u64(elf.len()))
            || filesz > memsz
        {
            return Err(BootError::Malformed);
        }
        let seg_end = paddr.checked_add(memsz).ok_or(BootError::Malformed)?;
        if paddr < PAYLOAD_MIN_ADDR || seg_end > ram_end {
            return Err(BootError::SegmentOutsideMemory {
                start: paddr,
                end: seg_end,
                ram_start: PAYLOAD_MIN_ADDR,
                ram_end,
            });
        }
        entry_ok |= (paddr..seg_end).contains(&entry);
        end = end.max(seg_end);
    }
    if !entry_ok {
        return Err(BootError::BadEntry(entry));
    }
    Ok(PayloadImage { entry, end })
}

/// What the boot-info block tells the payload besides memory layout.
#[derive(Debug, Clone, Default)]
pub struct BootParams {
    pub vcpus: u32,
    pub tsc_khz: u64,
    pub devices: Vec<DeviceInfo>,
    pub args: Vec<String>,
}

/// Where each vCPU's stack ends and the heap starts, for an image ending at `image_end`.
fn stack_layout(image_end: u64, vcpus: u32) -> (u64, u64) {
    let stacks = (image_end + (2 << 20) - 1) & !((2 << 20) - 1);
    (stacks, stacks + u64::from(vcpus) * STACK_SIZE)
}

/// Loads a checked payload and writes every boot structure; returns the per-vCPU entry state.
pub fn load_payload(
    mem: &GuestMemory,
    mem_size: u64,
    elf: &[u8],
    params: &BootParams,
) -> Result<Vec<EntryState>, BootError> {
    let image = check_payload(elf, mem_size)?;
    let low_end = ram_ranges(mem_size)[0].1;
    let (stacks, heap_start) = stack_layout(image.end, params.vcpus);
    // Leave the heap at least a few MiB; a payload with less could not run anyway.
    if heap_start + (4 << 20) > low_end {
        return Err(BootError::TooSmall {
            vcpus: params.vcpus,
            needed: heap_start + (4 << 20),
        });
    }
    Elf::load(
        mem,
        None,
        &mut Cursor::new(elf),
        Some(GuestAddress(PAYLOAD_MIN_ADDR)),
    )?;
    write_page_tables(mem, mem_size)?;
    write_gdt_and_tss(mem)?;
    write_boot_info(mem, mem_size, heap_start, params)?;
    Ok((0..params.vcpus)
        .map(|id| EntryState::new(image.entry, stacks + u64::from(id + 1) * STACK_SIZE, id))
        .collect())
}

/// Identity-maps guest-physical 0..max(4 GiB, end of RAM) with 2 MiB user pages: the payload
/// runs at CPL3, so every mapping must be user-accessible; the MMIO hole is mapped too.
fn write_page_tables(mem: &GuestMemory, mem_size: u64) -> Result<(), BootError> {
    let top = ram_ranges(mem_size)
        .last()
        .map_or(0, |(a, s)| a.0 + s)
        .max(4 * GIB);
    let flags = PTE_PRESENT | PTE_WRITE | PTE_USER;
    Ok(write_identity_map(
        mem,
        PAGE_TABLE_ADDR,
        top.div_ceil(GIB),
        flags,
    )?)
}

/// GDT selectors. User selectors carry RPL 3.
const SEL_USER_DATA: u16 = 0x18 | 3;
const SEL_USER_CODE: u16 = 0x20 | 3;
const SEL_TSS: u16 = 0x28;
const GDT: [u64; 5] = [
    0,
    0x00af_9b00_0000_ffff, // 0x08 kernel code, 64-bit
    0x00cf_9300_0000_ffff, // 0x10 kernel data
    0x00cf_f300_0000_ffff, // 0x18 user data, DPL3
    0x00af_fb00_0000_ffff, // 0x20 user code, 64-bit, DPL3
];
/// Size of the TSS proper; the I/O permission bitmap follows it (where the TSS's 16-bit I/O map
/// base field points).
const TSS_SIZE: u16 = 104;
/// One bit per port (65536 / 8 bytes), all clear (allowed), plus the terminating all-ones
/// byte.
const IO_BITMAP_SIZE: u16 = 8192 + 1;
const TSS_LIMIT: u16 = TSS_SIZE + IO_BITMAP_SIZE - 1;

fn write_gdt_and_tss(mem: &GuestMemory) -> Result<(), BootError> {
    let mut gdt: Vec<u64> = GDT.to_vec();
    // 16-byte available 64-bit TSS descriptor at 0x28.
    let base = TSS_ADDR;
    let low = u64::from(TSS_LIMIT)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40)
        | (((base >> 24) & 0xff) << 56);
    gdt.push(low);
    gdt.push(base >> 32);
    let bytes: Vec<u8> = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(GDT_ADDR))?;
    // The TSS carries an all-clear I/O permission bitmap. PVM runs the guest on the real CPU
    // at ring 3 without its IOPL, traps every port access and emulates it; the emulator lets a
    // CPL3 access through when IOPL or this bitmap allows it, and the IOPL that ftvmm sets may
    // not survive the guest's first exit.
    mem.write_obj(TSS_SIZE, GuestAddress(TSS_ADDR + 102))?;
    mem.write_obj(0xffu8, GuestAddress(TSS_ADDR + u64::from(TSS_LIMIT)))?;
    Ok(())
}

fn write_boot_info(
    mem: &GuestMemory,
    mem_size: u64,
    heap_start: u64,
    params: &BootParams,
) -> Result<(), BootError> {
    let mut args = [0u8; MAX_ARGS_LEN];
    let mut len = 0;
    for arg in &params.args {
        let end = len + arg.len() + 1;
        if end > MAX_ARGS_LEN {
            return Err(BootError::ArgsTooLong);
        }
        args[len..end - 1].copy_from_slice(arg.as_bytes());
        len = end;
    }
    if params.devices.len() > MAX_DEVICES {
        return Err(BootError::TooManyDevices);
    }
    let mut devices = [DeviceInfo {
        kind: 0,
        irq: 0,
        mmio_base: 0,
    }; MAX_DEVICES];
    devices[..params.devices.len()].copy_from_slice(&params.devices);
    let mut mem_regions = [MemRegion::default(); guest_abi::MAX_MEM_REGIONS];
    let ranges = ram_ranges(mem_size);
    for (slot, (addr, size)) in mem_regions.iter_mut().zip(&ranges) {
        *slot = MemRegion {
            start: addr.0,
            size: *size,
        };
    }
    // Each count is at most its array's length (MAX_MEM_REGIONS, MAX_DEVICES, MAX_ARGS_LEN).
    #[allow(clippy::cast_possible_truncation)]
    let info = BootInfo {
        magic: BOOT_INFO_MAGIC,
        mem_size,
        vcpu_count: params.vcpus,
        mem_region_count: ranges.len() as u32,
        mem_regions,
        heap_start,
        tsc_khz: params.tsc_khz,
        device_count: params.devices.len() as u32,
        args_len: len as u32,
        devices,
        args,
    };
    // SAFETY: BootInfo is repr(C) plain data laid out without padding (its u32 fields come in
    // pairs between u64s, and its byte array ends it on a multiple of 8), so every byte of
    // `info` is initialised; the slice borrows `info` only for the copy below.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            (&info as *const BootInfo).cast::<u8>(),
            std::mem::size_of::<BootInfo>(),
        )
    };
    mem.write_slice(bytes, GuestAddress(BOOT_INFO_ADDR))?;
    Ok(())
}

/// The register state one vCPU enters the payload with.
#[derive(Debug, Clone, Copy)]
pub struct EntryState {
    pub rip: u64,
    pub rsp: u64,
    pub vcpu_id: u32,
}

impl EntryState {
    fn new(rip: u64, rsp: u64, vcpu_id: u32) -> Self {
        Self { rip, rsp, vcpu_id }
    }

    /// General registers: IOPL=3 must be set here, since PVM ignores IOPL changes the guest
    /// makes itself.
    pub fn regs(&self) -> kvm_regs {
        kvm_regs {
            rip: self.rip,
            rsp: self.rsp,
            rdi: BOOT_INFO_ADDR,
            rsi: u64::from(self.vcpu_id),
            rflags: RFLAGS_IOPL3 | RFLAGS_RESERVED,
            ..Default::default()
        }
    }

    /// Segment and control registers for 64-bit CPL3 on ftvmm's GDT and page tables.
    pub fn sregs(&self, mut sregs: kvm_sregs) -> kvm_sregs {
        let flat = |selector: u16, type_: u8, l: u8, db: u8| kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector,
            type_,
            present: 1,
            dpl: 3,
            db,
            s: 1,
            l,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        sregs.cs = flat(SEL_USER_CODE, 0xb, 1, 0);
        let data = flat(SEL_USER_DATA, 0x3, 0, 1);
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = kvm_segment {
            base: TSS_ADDR,
            limit: u32::from(TSS_LIMIT),
            selector: SEL_TSS,
            type_: 0xb,
            present: 1,
            dpl: 0,
            db: 0,
            s: 0,
            l: 0,
            g: 0,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        sregs.gdt.base = GDT_ADDR;
        // The TSS descriptor takes the two slots after GDT.
        sregs.gdt.limit = gdt_limit(GDT.len() + 2);
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
        sregs.cr3 = PAGE_TABLE_ADDR;
        sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
        sregs.efer = EFER_LME | EFER_LMA;
        sregs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal valid ELF64 header with one PT_LOAD program header.
    pub(crate) fn tiny_elf(paddr: u64, memsz: u64, entry: u64) -> Vec<u8> {
        let mut e = vec![0u8; 64 + 56 + 16];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2;
        e[5] = 1;
        e[6] = 1;
        e[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        e[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        e[24..32].copy_from_slice(&entry.to_le_bytes());
        e[32..40].copy_from_slice(&64u64.to_le_bytes());
        e[52..54].copy_from_slice(&64u16.to_le_bytes());
        e[54..56].copy_from_slice(&56u16.to_le_bytes());
        e[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = &mut e[64..120];
        ph[0..4].copy_from_slice(&PT_LOAD.to_le_bytes());
        ph[8..16].copy_from_slice(&120u64.to_le_bytes());
        ph[16..24].copy_from_slice(&paddr.to_le_bytes());
        ph[24..32].copy_from_slice(&paddr.to_le_bytes());
        ph[32..40].copy_from_slice(&16u64.to_le_bytes());
        ph[40..48].copy_from_slice(&memsz.to_le_bytes());
        e
    }

    #[test]
    fn accepts_a_static_x86_64_elf() {
        let img = check_payload(&tiny_elf(0x40_0000, 0x1000, 0x40_0000), 64 << 20).unwrap();
        assert_eq!(img.entry, 0x40_0000);
        assert_eq!(img.end, 0x40_1000);
    }

    #[test]
    fn rejects_bad_elves() {
        assert!(matches!(
            check_payload(b"hello", 64 << 20),
            Err(BootError::NotElf)
        ));
        let mut e = tiny_elf(0x40_0000, 0x1000, 0x40_0000);
        e[4] = 1;
        assert!(matches!(
            check_payload(&e, 64 << 20),
            Err(BootError::WrongElfKind(_))
        ));
        let mut e = tiny_elf(0x40_0000, 0x1000, 0x40_0000);
        e[18] = 40; // ARM
        assert!(matches!(
            check_payload(&e, 64 << 20),
            Err(BootError::WrongElfKind(_))
        ));
        let e = tiny_elf(0x40_0000, 0x1000, 0x40_0000);
        assert!(matches!(
            check_payload(&e[..100], 64 << 20),
            Err(BootError::Malformed)
        ));
        let e = tiny_elf(0x3ff_f000, 0x2000, 0x3ff_f000);
        assert!(matches!(
            check_payload(&e, 64 << 20),
            Err(BootError::SegmentOutsideMemory { .. })
        ));
        let e = tiny_elf(0x1000, 0x1000, 0x1000);
        assert!(matches!(
            check_payload(&e, 64 << 20),
            Err(BootError::SegmentOutsideMemory { .. })
        ));
        let e = tiny_elf(0x40_0000, 0x1000, 0x50_0000);
        assert!(matches!(
            check_payload(&e, 64 << 20),
            Err(BootError::BadEntry(_))
        ));
    }

    #[test]
    fn boot_structures_are_written() {
        let mem = crate::memory::create_guest_memory(64 << 20).unwrap();
        let params = BootParams {
            vcpus: 2,
            tsc_khz: 1000,
            devices: vec![],
            args: vec!["a".into(), "bc".into()],
        };
        let entries = load_payload(
            &mem,
            64 << 20,
            &tiny_elf(0x40_0000, 0x1000, 0x40_0000),
            &params,
        )
        .unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1].rsp, 0x60_0000 + 2 * STACK_SIZE);
        let mut raw = [0u8; std::mem::size_of::<BootInfo>()];
        mem.read_slice(&mut raw, GuestAddress(BOOT_INFO_ADDR))
            .unwrap();
        // SAFETY: raw holds size_of::<BootInfo>() bytes and BootInfo is plain repr(C) data.
        let info: BootInfo = unsafe { std::ptr::read_unaligned(raw.as_ptr().cast()) };
        assert_eq!(info.magic, BOOT_INFO_MAGIC);
        let args: Vec<&[u8]> = info.args().collect();
        assert_eq!(args, vec![&b"a"[..], &b"bc"[..]]);
        assert_eq!(info.heap_start, 0x60_0000 + 2 * STACK_SIZE);
        let pml4: u64 = mem.read_obj(GuestAddress(PAGE_TABLE_ADDR)).unwrap();
        assert_eq!(pml4, (PAGE_TABLE_ADDR + 0x1000) | 7);
    }
}
