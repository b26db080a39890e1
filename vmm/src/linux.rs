//! Linux boot: an ELF vmlinux through its PVH entry (32-bit protected mode, paging off, `ebx`
//! = `hvm_start_info`) or a bzImage through the 64-bit boot protocol (long mode on identity
//! page tables, `rsi` = boot_params), with the command line, an initrd and the e820 map.
//!
//! Guest-physical layout below 1 MiB (the kernel itself loads at 1 MiB or 16 MiB and up):
//! GDT at 0x500, PVH start info at 0x6000 (its module list at 0x6800), the e820 map or the
//! zero page at 0x7000, the boot stack below 0x9000, page tables 0x9000..0xf000, the command
//! line at 0x20000, ACPI tables at 0xe0000 (see [`crate::acpi`]). The initrd goes at the top
//! of low RAM.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress};

use crate::cast::u64_to_usize;
use crate::devices::GuestMemory;
use crate::memory::ram_ranges;
use crate::x86::{
    gdt_limit, write_identity_map, CR0_ET, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME,
    PTE_PRESENT, PTE_WRITE, RFLAGS_RESERVED,
};

#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    #[error("cannot read kernel {path}: {source}")]
    ReadKernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read initrd {path}: {source}")]
    ReadInitrd {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel {0} is neither an ELF vmlinux nor a bzImage")]
    NotAKernel(PathBuf),
    #[error(
        "kernel {0} is an ELF without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): build it \
         with CONFIG_PVH=y or boot its bzImage"
    )]
    NoPvhEntry(PathBuf),
    #[error("bzImage {0} does not support the 64-bit boot protocol (needs protocol 2.12+)")]
    No64BitEntry(PathBuf),
    #[error("cannot load kernel {path}: {source}")]
    Load {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    #[error("kernel command line is {0} bytes; the limit is {MAX_CMDLINE} bytes")]
    CmdlineTooLong(usize),
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error(
        "initrd ({size} bytes) does not fit in guest RAM above the kernel (ends {kernel_end:#x})"
    )]
    InitrdTooLarge { size: u64, kernel_end: u64 },
    #[error("kernel (ends {0:#x}) does not fit in guest RAM")]
    KernelTooLarge(u64),
    #[error("cannot write boot structures into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("cannot write boot parameters: {0}")]
    Configure(#[from] linux_loader::configurator::Error),
}

/// What to boot: a kernel image, an optional initrd, a command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxBoot {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The full command line (ftvmm appends `virtio_mmio.device=` entries).
    pub cmdline: String,
}

/// The command line used when none is given: the console on the 16550 from the first byte.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1";
/// Linux's COMMAND_LINE_SIZE on x86, terminating NUL included.
pub const MAX_CMDLINE: usize = 2047;

/// The two kernel formats ftvmm boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An ELF vmlinux with a PVH entry note.
    ElfPvh,
    /// A bzImage (boot protocol 2.12+, 64-bit entry).
    BzImage,
}

const GDT_ADDR: u64 = 0x500;
const PVH_INFO_ADDR: u64 = 0x6000;
const PVH_MODLIST_ADDR: u64 = 0x6800;
const MEMMAP_ADDR: u64 = 0x7000;
const ZERO_PAGE_ADDR: u64 = 0x7000;
const BOOT_STACK: u64 = 0x8ff0;
const PML4_ADDR: u64 = 0x9000;
const CMDLINE_ADDR: u64 = 0x20000;
/// Where real-mode-reachable RAM ends (the EBDA convention) and the BIOS area starts.
const EBDA_START: u64 = 0x9_fc00;
/// Reserved up to 1 MiB: the ACPI tables live here.
const BIOS_AREA: u64 = 0xe_0000;
const HIMEM_START: u64 = 0x10_0000;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const XLF_KERNEL_64: u16 = 1;
const LOADER_TYPE_OTHER: u8 = 0xff;

/// Reads enough of `path` to tell its format.
pub fn probe(path: &Path) -> Result<KernelFormat, LinuxError> {
    let read_err = |source| LinuxError::ReadKernel {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let mut head = vec![0u8; 0x260];
    let mut n = 0;
    while n < head.len() {
        match file.read(&mut head[n..]).map_err(read_err)? {
            0 => break,
            k => n += k,
        }
    }
    head.truncate(n);
    if head.starts_with(b"\x7fELF") {
        return Ok(KernelFormat::ElfPvh);
    }
    let u16_at = |off: usize| {
        head.get(off..off + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    if head.get(0x202..0x206) == Some(b"HdrS") && u16_at(0x1fe) == Some(0xaa55) {
        let version = u16_at(0x206).unwrap_or(0);
        let xloadflags = u16_at(0x236).unwrap_or(0);
        if version < 0x20c || xloadflags & XLF_KERNEL_64 == 0 {
            return Err(LinuxError::No64BitEntry(path.to_owned()));
        }
        return Ok(KernelFormat::BzImage);
    }
    Err(LinuxError::NotAKernel(path.to_owned()))
}

/// Checks what can be checked before a VM is built: the kernel's format, the command line,
/// and that the initrd can be opened.
pub fn check(boot: &LinuxBoot) -> Result<KernelFormat, LinuxError> {
    let format = probe(&boot.kernel)?;
    check_cmdline(&boot.cmdline)?;
    if let Some(path) = &boot.initrd {
        File::open(path).map_err(|source| LinuxError::ReadInitrd {
            path: path.clone(),
            source,
        })?;
    }
    Ok(format)
}

/// Checks the command line a guest would get.
pub fn check_cmdline(cmdline: &str) -> Result<(), LinuxError> {
    if cmdline.contains('\0') {
        return Err(LinuxError::CmdlineNul);
    }
    if cmdline.len() > MAX_CMDLINE {
        return Err(LinuxError::CmdlineTooLong(cmdline.len()));
    }
    Ok(())
}

/// The e820 map of a Linux guest with `mem_size` bytes: real-mode RAM, the reserved BIOS area
/// (ACPI tables), RAM from 1 MiB to the MMIO hole, RAM above 4 GiB.
pub fn e820_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (BIOS_AREA, HIMEM_START - BIOS_AREA, E820_RESERVED),
    ];
    for (start, size) in ram_ranges(mem_size) {
        let (start, size) = if start.0 == 0 {
            (HIMEM_START, size - HIMEM_START)
        } else {
            (start.0, size)
        };
        map.push((start, size, E820_RAM));
    }
    map
}

/// Where each vCPU starts: the boot vCPU at the kernel's entry, the others wait for SIPI.
#[derive(Debug, Clone, Copy)]
pub struct LinuxEntry {
    pub format: KernelFormat,
    pub entry: u64,
}

/// Loads the kernel, the initrd and the command line and writes the boot parameters;
/// `rsdp` is the ACPI root pointer's address (see [`crate::acpi`]).
pub fn load(
    mem: &GuestMemory,
    mem_size: u64,
    boot: &LinuxBoot,
    rsdp: u64,
) -> Result<LinuxEntry, LinuxError> {
    let format = probe(&boot.kernel)?;
    check_cmdline(&boot.cmdline)?;
    let read_err = |source| LinuxError::ReadKernel {
        path: boot.kernel.clone(),
        source,
    };
    let load_err = |source| LinuxError::Load {
        path: boot.kernel.clone(),
        source,
    };
    let mut file = File::open(&boot.kernel).map_err(read_err)?;
    let low_end = ram_ranges(mem_size)[0].1;
    let result = match format {
        KernelFormat::ElfPvh => Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))),
        KernelFormat::BzImage => {
            BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
        }
    }
    .map_err(load_err)?;
    // The bzImage decompresses in place up to init_size past its load address.
    let kernel_end = match &result.setup_header {
        Some(hdr) => result
            .kernel_end
            .max(result.kernel_load.0 + u64::from(hdr.init_size)),
        None => result.kernel_end,
    };
    if kernel_end > low_end {
        return Err(LinuxError::KernelTooLarge(kernel_end));
    }
    let mut cmdline = boot.cmdline.clone().into_bytes();
    cmdline.push(0);
    mem.write_slice(&cmdline, GuestAddress(CMDLINE_ADDR))?;
    let initrd = match &boot.initrd {
        Some(path) => {
            let max = match &result.setup_header {
                Some(hdr) if hdr.initrd_addr_max != 0 => u64::from(hdr.initrd_addr_max) + 1,
                _ => low_end,
            };
            Some(load_initrd(mem, path, kernel_end, low_end.min(max))?)
        }
        None => None,
    };
    let map = e820_map(mem_size);
    let entry = match format {
        KernelFormat::ElfPvh => {
            let PvhBootCapability::PvhEntryPresent(entry) = result.pvh_boot_cap else {
                return Err(LinuxError::NoPvhEntry(boot.kernel.clone()));
            };
            write_pvh_info(mem, &map, initrd, rsdp)?;
            entry.0
        }
        KernelFormat::BzImage => {
            let mut hdr = result.setup_header.unwrap_or_default();
            write_zero_page(mem, &mut hdr, &map, initrd, rsdp, cmdline.len())?;
            write_page_tables(mem)?;
            // The 64-bit entry point is 0x200 past the protected-mode code.
            result.kernel_load.0 + 0x200
        }
    };
    write_gdt(mem)?;
    Ok(LinuxEntry { format, entry })
}

/// Puts the initrd at the top of RAM below `top`, page aligned; returns (address, size).
fn load_initrd(
    mem: &GuestMemory,
    path: &Path,
    kernel_end: u64,
    top: u64,
) -> Result<(u64, u64), LinuxError> {
    let read_err = |source| LinuxError::ReadInitrd {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.seek(SeekFrom::End(0)).map_err(read_err)?;
    file.rewind().map_err(read_err)?;
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end)
        .ok_or(LinuxError::InitrdTooLarge { size, kernel_end })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, u64_to_usize(size))?;
    Ok((addr, size))
}

// The e820 map has at most four entries and the module list at most one (the initrd).
#[allow(clippy::cast_possible_truncation)]
fn write_pvh_info(
    mem: &GuestMemory,
    map: &[(u64, u64, u32)],
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<(), LinuxError> {
    let memmap: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|&(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        rsdp_paddr: rsdp,
        memmap_paddr: MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let modules: Vec<hvm_modlist_entry> = initrd
        .map(|(paddr, size)| hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        })
        .into_iter()
        .collect();
    if !modules.is_empty() {
        info.nr_modules = modules.len() as u32;
        info.modlist_paddr = PVH_MODLIST_ADDR;
    }
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_ADDR));
    params.set_sections(&memmap, GuestAddress(MEMMAP_ADDR));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(PVH_MODLIST_ADDR));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemory>(&params, mem)?;
    Ok(())
}

// The 32-bit fields get low-RAM addresses and sizes (the initrd lies below the MMIO hole, see
// `load_initrd`); e820_entries gets at most the table's 128.
#[allow(clippy::cast_possible_truncation)]
fn write_zero_page(
    mem: &GuestMemory,
    hdr: &mut linux_loader::loader::bootparam::setup_header,
    map: &[(u64, u64, u32)],
    initrd: Option<(u64, u64)>,
    rsdp: u64,
    cmdline_len: usize,
) -> Result<(), LinuxError> {
    let mut params = boot_params::default();
    hdr.type_of_loader = LOADER_TYPE_OTHER;
    hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    // cmdline_size is the kernel's limit (protocol 2.06+), not ours to set.
    if hdr.cmdline_size != 0 && cmdline_len > hdr.cmdline_size as usize {
        return Err(LinuxError::CmdlineTooLong(cmdline_len - 1));
    }
    if let Some((addr, size)) = initrd {
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }
    params.hdr = *hdr;
    params.acpi_rsdp_addr = rsdp;
    for (slot, &(addr, size, type_)) in params.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemory>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_ADDR)),
        mem,
    )?;
    Ok(())
}

/// Identity-maps the first 4 GiB with 2 MiB supervisor pages, as the 64-bit boot protocol
/// requires of the kernel, zero page and command line.
fn write_page_tables(mem: &GuestMemory) -> Result<(), LinuxError> {
    Ok(write_identity_map(
        mem,
        PML4_ADDR,
        4,
        PTE_PRESENT | PTE_WRITE,
    )?)
}

/// Selectors of ftvmm's Linux boot GDT. 0x10/0x18 are the 64-bit protocol's __BOOT_CS and
/// __BOOT_DS; the PVH entry runs on the 32-bit code segment.
const SEL_CODE32: u16 = 0x08;
const SEL_CODE64: u16 = 0x10;
const SEL_DATA: u16 = 0x18;
const SEL_TSS: u16 = 0x20;
const GDT: [u64; 5] = [
    0,
    0x00cf_9b00_0000_ffff, // 0x08 code, 32-bit, flat
    0x00af_9b00_0000_ffff, // 0x10 code, 64-bit
    0x00cf_9300_0000_ffff, // 0x18 data, flat
    0x0000_8b00_0000_0067, // 0x20 32-bit TSS (busy), base 0, limit 0x67
];

fn write_gdt(mem: &GuestMemory) -> Result<(), LinuxError> {
    let bytes: Vec<u8> = GDT.iter().flat_map(|d| d.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(GDT_ADDR))?;
    Ok(())
}

/// The descriptor of `selector` in [`GDT`], as KVM takes it.
// The limit is a 20-bit field: even scaled to 4 KiB granules it fits in 32 bits.
#[allow(clippy::cast_possible_truncation)]
fn segment(selector: u16) -> kvm_segment {
    let d = GDT[usize::from(selector / 8)];
    let base = ((d >> 16) & 0xff_ffff) | (((d >> 56) & 0xff) << 24);
    let limit = (d & 0xffff) | (((d >> 48) & 0xf) << 16);
    let g = ((d >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 {
            ((limit << 12) | 0xfff) as u32
        } else {
            limit as u32
        },
        selector,
        type_: ((d >> 40) & 0xf) as u8,
        present: ((d >> 47) & 1) as u8,
        dpl: ((d >> 45) & 3) as u8,
        db: ((d >> 54) & 1) as u8,
        s: ((d >> 44) & 1) as u8,
        l: ((d >> 53) & 1) as u8,
        g,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

impl LinuxEntry {
    /// The boot vCPU's general registers.
    pub fn regs(&self) -> kvm_regs {
        let mut regs = kvm_regs {
            rip: self.entry,
            rflags: RFLAGS_RESERVED,
            ..Default::default()
        };
        match self.format {
            KernelFormat::ElfPvh => regs.rbx = PVH_INFO_ADDR,
            KernelFormat::BzImage => {
                regs.rsi = ZERO_PAGE_ADDR;
                regs.rsp = BOOT_STACK;
                regs.rbp = BOOT_STACK;
            }
        }
        regs
    }

    /// The boot vCPU's segment and control registers: flat 32-bit protected mode without
    /// paging for PVH, 64-bit long mode on the identity map for a bzImage.
    pub fn sregs(&self, mut sregs: kvm_sregs) -> kvm_sregs {
        let (code, cr0, cr4, efer) = match self.format {
            KernelFormat::ElfPvh => (SEL_CODE32, CR0_PE | CR0_ET, 0, 0),
            KernelFormat::BzImage => (
                SEL_CODE64,
                CR0_PE | CR0_ET | CR0_PG,
                CR4_PAE,
                EFER_LME | EFER_LMA,
            ),
        };
        sregs.cs = segment(code);
        let data = segment(SEL_DATA);
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = segment(SEL_TSS);
        sregs.gdt.base = GDT_ADDR;
        sregs.gdt.limit = gdt_limit(GDT.len());
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        sregs.cr0 = cr0;
        sregs.cr4 = cr4;
        sregs.efer = efer;
        if self.format == KernelFormat::BzImage {
            sregs.cr3 = PML4_ADDR;
        }
        sregs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory of test files, removed when dropped (even when the test fails).
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("ftvmm-linux-{}-{tag}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn formats_are_told_apart() {
        let dir = Scratch::new("formats");
        let scratch = |name: &str, bytes: &[u8]| dir.file(name, bytes);
        let elf = scratch("elf", b"\x7fELF\x02\x01\x01");
        assert_eq!(probe(&elf).unwrap(), KernelFormat::ElfPvh);
        let mut bz = vec![0u8; 0x400];
        bz[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        bz[0x236..0x238].copy_from_slice(&1u16.to_le_bytes());
        let p = scratch("bz", &bz);
        assert_eq!(probe(&p).unwrap(), KernelFormat::BzImage);
        bz[0x236] = 0;
        let p = scratch("bz32", &bz);
        assert!(matches!(probe(&p), Err(LinuxError::No64BitEntry(_))));
        let p = scratch("text", b"hello world");
        assert!(matches!(probe(&p), Err(LinuxError::NotAKernel(_))));
        assert!(matches!(
            probe(Path::new("/nonexistent/vmlinux")),
            Err(LinuxError::ReadKernel { .. })
        ));
    }

    #[test]
    fn e820_leaves_the_bios_area_and_hole_out() {
        let map = e820_map(256 << 20);
        assert_eq!(map[0], (0, 0x9fc00, E820_RAM));
        assert_eq!(map[1], (0xe0000, 0x20000, E820_RESERVED));
        assert_eq!(map[2], (0x10_0000, (256 << 20) - 0x10_0000, E820_RAM));
        let big = e820_map(4 << 30);
        assert_eq!(big.len(), 4);
        assert_eq!(big[3].0, guest_abi::HIGH_RAM_START);
    }

    #[test]
    fn cmdlines_are_checked() {
        assert!(check_cmdline(DEFAULT_CMDLINE).is_ok());
        assert!(matches!(
            check_cmdline(&"x".repeat(4000)),
            Err(LinuxError::CmdlineTooLong(4000))
        ));
        assert!(matches!(check_cmdline("a\0b"), Err(LinuxError::CmdlineNul)));
    }

    #[test]
    fn pvh_entry_state_is_flat_protected_mode() {
        let e = LinuxEntry {
            format: KernelFormat::ElfPvh,
            entry: 0x100_0000,
        };
        let s = e.sregs(kvm_sregs::default());
        assert_eq!(s.cs.db, 1);
        assert_eq!(s.cs.l, 0);
        assert_eq!(s.cs.limit, 0xffff_ffff);
        assert_eq!(s.cs.type_, 0xb);
        assert_eq!(s.tr.limit, 0x67);
        assert_eq!(s.cr0 & CR0_PG, 0);
        assert_eq!(e.regs().rbx, PVH_INFO_ADDR);
        let b = LinuxEntry {
            format: KernelFormat::BzImage,
            entry: 0x10_0200,
        };
        let s = b.sregs(kvm_sregs::default());
        assert_eq!((s.cs.selector, s.cs.l), (0x10, 1));
        assert_eq!(s.ds.selector, 0x18);
        assert_eq!(b.regs().rsi, ZERO_PAGE_ADDR);
    }
}
