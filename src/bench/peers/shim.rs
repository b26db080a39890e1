//! A payload as an ELF that QEMU's `-machine microvm` boots: ftvmm's own boot structures (page
//! tables, GDT, TSS with its I/O bitmap, boot-info block, written by `vmm::boot` exactly as
//! ftvmm writes them), the payload's segments, and a trampoline of about 25 instructions
//! entered through a PVH note, so that qboot (microvm's firmware) jumps to it in 32-bit
//! protected mode. The trampoline switches to long mode on those structures and `iretq`s to
//! the payload at CPL3 with the registers ftvmm gives it. Everything before CPL3 is emulated
//! under PVM (about 1.5 M instructions/s), hence a trampoline and nothing more.

use guest_abi::{BOOT_INFO_ADDR, GDT_ADDR, PAGE_TABLE_ADDR, PAYLOAD_MIN_ADDR};
use vm_memory::{Bytes, GuestAddress};
use vmm::boot::{check_payload, load_payload, BootParams};
use vmm::cast::{u64_to_usize, usize_to_u64};

use crate::run::Error;

/// Where the trampoline is loaded and entered: free in ftvmm's boot area (between the
/// boot-info block at 0x6000 and the page tables at 0x10000).
const SHIM_ADDR: u64 = 0x8000;
/// The payload's entry point and stack top, for the trampoline to read (free too).
const ENTRY_ADDR: u64 = 0x7000;
/// The trampoline's own few bytes of stack, below the page tables.
const SHIM_STACK: u64 = 0xf000;
/// ftvmm's boot area is written from GDT_ADDR to the end of its page tables: the PML4, its
/// PDPT and four page directories (ftvmm maps at least 4 GiB; these guests are smaller).
const BOOT_AREA_END: u64 = PAGE_TABLE_ADDR + 6 * 0x1000;

// The trampoline, assembled into this binary's read-only data (never run by the host) and
// copied into the guest at SHIM_ADDR; its absolute addresses are relative to that. It sets
// what ftvmm sets through KVM_SET_SREGS (vmm::boot::EntryState::sregs): CR3, CR4 = PAE |
// OSFXSR | OSXMMEXCPT, EFER.LME, CR0 = PE | MP | ET | NE | WP | PG, the GDT and TR (the TSS
// whose all-clear I/O bitmap lets the payload's CPL3 port I/O through: PVM ignores the IOPL
// that the `iretq` below asks for, as it ignores any IOPL the guest sets itself), then enters
// the payload with rdi = boot info, rsi = vCPU 0 and the user selectors ftvmm uses.
core::arch::global_asm!(
    ".pushsection .rodata.ftvmm_peers_shim, \"a\"",
    ".balign 16",
    "ftvmm_peers_shim_start:",
    ".code32",
    "movl ${pml4}, %eax",
    "movl %eax, %cr3",
    "movl ${cr4}, %eax",
    "movl %eax, %cr4",
    "movl $0xc0000080, %ecx",
    "movl ${efer}, %eax",
    "xorl %edx, %edx",
    "wrmsr",
    "lgdtl ({base} + 3f - ftvmm_peers_shim_start)",
    "movl ${cr0}, %eax",
    "movl %eax, %cr0",
    "ljmpl $0x08, $({base} + 2f - ftvmm_peers_shim_start)",
    ".code64",
    "2:",
    "movw $0x28, %ax",
    "ltr %ax",
    "movw $0x1b, %ax",
    "movw %ax, %ds",
    "movw %ax, %es",
    "movw %ax, %fs",
    "movw %ax, %gs",
    "movl ${stack}, %esp",
    "pushq $0x1b",
    "pushq {entry} + 8",
    "pushq $0x3002",
    "pushq $0x23",
    "pushq {entry}",
    "movl ${boot_info}, %edi",
    "xorl %esi, %esi",
    "iretq",
    ".balign 8",
    "3:",
    ".word {gdt_limit}",
    ".long {gdt}",
    "ftvmm_peers_shim_end:",
    ".popsection",
    base = const SHIM_ADDR,
    pml4 = const PAGE_TABLE_ADDR,
    cr4 = const (1 << 5) | (1 << 9) | (1 << 10),
    efer = const 1 << 8,
    cr0 = const 1 | (1 << 1) | (1 << 4) | (1 << 5) | (1 << 16) | (1 << 31),
    stack = const SHIM_STACK,
    entry = const ENTRY_ADDR,
    boot_info = const BOOT_INFO_ADDR,
    // Seven slots: ftvmm's five descriptors and its 16-byte TSS descriptor.
    gdt_limit = const 7 * 8 - 1,
    gdt = const GDT_ADDR,
    options(att_syntax),
);

extern "C" {
    static ftvmm_peers_shim_start: u8;
    static ftvmm_peers_shim_end: u8;
}

/// The trampoline's machine code.
fn trampoline() -> &'static [u8] {
    // SAFETY: both symbols delimit the read-only bytes of the global_asm block above, in one
    // section, start before end; they are only read.
    unsafe {
        let start = &raw const ftvmm_peers_shim_start;
        let end = &raw const ftvmm_peers_shim_end;
        std::slice::from_raw_parts(start, end as usize - start as usize)
    }
}

/// One loadable segment of the image: its guest-physical address and bytes.
struct Segment {
    addr: u64,
    bytes: Vec<u8>,
}

/// The ELF QEMU boots for `payload` with `mem_size` bytes of RAM, one vCPU and `args`;
/// `tsc_khz` goes to the boot-info block as ftvmm would put it there.
pub fn image(
    payload: &[u8],
    mem_size: u64,
    tsc_khz: u64,
    args: &[String],
) -> Result<Vec<u8>, Error> {
    let mem = vmm::memory::create_guest_memory(mem_size)?;
    let params = BootParams {
        vcpus: 1,
        tsc_khz,
        devices: Vec::new(),
        args: args.to_vec(),
    };
    let entry = load_payload(&mem, mem_size, payload, &params)?;
    let entry = entry.first().ok_or("no vCPU entry state")?;
    mem.write_slice(trampoline(), GuestAddress(SHIM_ADDR))?;
    mem.write_obj(entry.rip, GuestAddress(ENTRY_ADDR))?;
    mem.write_obj(entry.rsp, GuestAddress(ENTRY_ADDR + 8))?;
    let read = |start: u64, end: u64| -> Result<Segment, Error> {
        let mut bytes = vec![0u8; u64_to_usize(end - start)];
        mem.read_slice(&mut bytes, GuestAddress(start))?;
        Ok(Segment { addr: start, bytes })
    };
    let boot = read(GDT_ADDR, BOOT_AREA_END)?;
    let end = check_payload(payload, mem_size)?.end;
    let mut image = read(PAYLOAD_MIN_ADDR, end)?;
    // The payload links above PAYLOAD_MIN_ADDR (at 4 MiB by default): leave out the zero pages
    // before it, guest RAM starts zeroed.
    let skip = image
        .bytes
        .chunks(4096)
        .take_while(|page| page.iter().all(|b| *b == 0))
        .count()
        * 4096;
    image.bytes.drain(..skip.min(image.bytes.len()));
    image.addr += usize_to_u64(skip);
    Ok(elf(&[boot, image], SHIM_ADDR))
}

/// XEN_ELFNOTE_PHYS32_ENTRY: the note QEMU looks for to boot an ELF through PVH.
const PVH_NOTE_TYPE: u32 = 18;
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
/// The note: namesz, descsz, type, "Xen\0", then the 64-bit entry (QEMU reads 8 bytes).
const NOTE_SIZE: usize = 12 + 4 + 8;

/// A static x86-64 ELF executable of `segments` (PT_LOAD, physical = virtual address) and a PVH
/// note naming `pvh_entry`.
fn elf(segments: &[Segment], pvh_entry: u64) -> Vec<u8> {
    let phnum = segments.len() + 1;
    let note_off = EHDR_SIZE + phnum * PHDR_SIZE;
    let mut data_off = (note_off + NOTE_SIZE).next_multiple_of(4096);
    let mut out = Vec::new();
    let u16s = |v: u16| v.to_le_bytes();
    // The ELF header: ELFCLASS64, little endian, version 1, ET_EXEC, EM_X86_64.
    out.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    out.extend_from_slice(&u16s(2));
    out.extend_from_slice(&u16s(62));
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&pvh_entry.to_le_bytes());
    out.extend_from_slice(&usize_to_u64(EHDR_SIZE).to_le_bytes()); // phoff
    out.extend_from_slice(&0u64.to_le_bytes()); // shoff
    out.extend_from_slice(&0u32.to_le_bytes()); // flags
    #[allow(clippy::cast_possible_truncation)] // a handful of headers
    for v in [EHDR_SIZE, PHDR_SIZE, phnum, 64, 0, 0] {
        out.extend_from_slice(&u16s(v as u16));
    }
    let phdr = |out: &mut Vec<u8>, kind: u32, flags: u32, off: usize, addr: u64, size: usize| {
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        for v in [usize_to_u64(off), addr, addr] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        let size = usize_to_u64(size);
        let align = if kind == 1 { 4096u64 } else { 4 };
        for v in [size, size, align] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    };
    let mut offsets = Vec::new();
    for s in segments {
        offsets.push(data_off);
        // PT_LOAD, read + write + execute.
        phdr(&mut out, 1, 7, data_off, s.addr, s.bytes.len());
        data_off = (data_off + s.bytes.len()).next_multiple_of(4096);
    }
    phdr(&mut out, 4, 4, note_off, 0, NOTE_SIZE); // PT_NOTE
    out.extend_from_slice(&4u32.to_le_bytes());
    out.extend_from_slice(&8u32.to_le_bytes());
    out.extend_from_slice(&PVH_NOTE_TYPE.to_le_bytes());
    out.extend_from_slice(b"Xen\0");
    out.extend_from_slice(&pvh_entry.to_le_bytes());
    for (s, off) in segments.iter().zip(offsets) {
        out.resize(off, 0);
        out.extend_from_slice(&s.bytes);
    }
    out
}
