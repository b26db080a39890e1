//! Stock Linux guests: Debian's cloud kernel (fetched by scripts/fetch-kernel.sh) booted
//! through its PVH entry, alone and as a replicated pair whose primary is killed mid-boot, and
//! its bzImage entered through the 64-bit boot protocol.
//!
//! Under PVM (see docs/linux.md) the kernel's code is emulated, so these tests stop in early
//! boot: at the banner and ACPI table lines, and at the `Memory:` line.

mod common;

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{free_port, merge, wait_for, Node, Scratch};

/// Each test keeps a core busy emulating kernel code; two at once would halve both.
static ONE_KERNEL: Mutex<()> = Mutex::new(());

/// The kernel's banner must be on the UART within this (the bound).
const BANNER_LIMIT: Duration = Duration::from_secs(60);
/// From the primary's death to the standby's `Memory:` line.
const MEMORY_LIMIT: Duration = Duration::from_secs(150);

/// The ELF vmlinux of Debian's linux-image-cloud-amd64: $FTVMM_KERNEL, or where
/// scripts/fetch-kernel.sh caches it. A missing kernel fails the test.
fn kernel() -> PathBuf {
    let path = std::env::var_os("FTVMM_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/ftvmm/vmlinux"));
    assert!(
        path.is_file(),
        "no kernel at {} (run scripts/fetch-kernel.sh, or set FTVMM_KERNEL)",
        path.display()
    );
    path
}

/// The complete lines of a console file so far (a line being written is left out).
/// Debian's bzImage of the same kernel, which scripts/fetch-kernel.sh caches beside it.
fn bzimage() -> PathBuf {
    let path = kernel().with_file_name("bzImage");
    assert!(
        path.is_file(),
        "no bzImage at {} (run scripts/fetch-kernel.sh)",
        path.display()
    );
    path
}

fn text(path: &std::path::Path) -> String {
    let mut bytes = std::fs::read(path).unwrap_or_default();
    let end = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    bytes.truncate(end);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The ACPI table lines naming ftvmm's tables, as Linux prints them.
const ACPI_LINES: [&str; 5] = [
    "ACPI: RSDP 0x00000000000E0000 000024 (v02 FTVMM )",
    "ACPI: XSDT 0x",
    "ACPI: FACP 0x",
    "ACPI: DSDT 0x",
    "ACPI: APIC 0x",
];

#[test]
fn debian_kernel_boots_to_banner_and_acpi_tables() {
    let _one = ONE_KERNEL.lock().unwrap_or_else(|e| e.into_inner());
    let kernel = kernel();
    let dir = Scratch::new("linux-boot");
    let (out, disk, initrd) = (
        dir.path("console"),
        dir.path("disk.img"),
        dir.path("initrd"),
    );
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    // Any bytes do for an initrd that the kernel only reserves in early boot.
    std::fs::write(&initrd, vec![0x5au8; 300 << 10]).unwrap();
    let start = Instant::now();
    let mut vm = Node::spawn(&[
        "run".to_string(),
        "--mem=256M".into(),
        format!("--kernel={}", kernel.display()),
        format!("--disk={}", disk.display()),
        format!("--initrd={}", initrd.display()),
        format!("--console=file:{}", out.display()),
    ]);
    let up = wait_for(BANNER_LIMIT, || {
        let t = text(&out);
        (t.contains("Linux version") && ACPI_LINES.iter().all(|l| t.contains(l))) || !vm.running()
    });
    let elapsed = start.elapsed();
    let t = text(&out);
    assert!(
        up && vm.running(),
        "no banner and ACPI lines within {BANNER_LIMIT:?}; console:\n{t}\nstderr:\n{}",
        vm.stderr()
    );
    eprintln!("banner and ACPI table lines after {elapsed:?}");
    assert!(t.contains("Linux version 6."), "{t}");
    // Every table carries ftvmm's OEM id, and the DSDT is the one that names the devices.
    for line in t
        .lines()
        .filter(|l| l.contains("ACPI: ") && l.contains(" 0x00000000000E"))
    {
        assert!(line.contains("FTVMM"), "{line}");
    }
    // The initrd lies page-aligned at the top of the 256 MiB of RAM.
    assert!(
        t.contains("RAMDISK: [mem 0x0ffb5000-0x0fffffff]"),
        "initrd not where ftvmm put it: {t}"
    );
    // The disk is also on the command line, for kernels with virtio_mmio built in.
    let cmdline = t
        .lines()
        .find(|l| l.contains("Command line:"))
        .unwrap_or_default();
    assert!(
        cmdline.contains("console=ttyS0") && cmdline.contains("virtio_mmio.device=4K@0xd0000000:5"),
        "{cmdline}"
    );
}

#[test]
fn debian_kernel_fails_over_mid_boot() {
    let _one = ONE_KERNEL.lock().unwrap_or_else(|e| e.into_inner());
    let kernel = kernel();
    let dir = Scratch::new("linux-failover");
    let (p_out, s_out) = (dir.path("p.out"), dir.path("s.out"));
    let addr = format!("127.0.0.1:{}", free_port());
    let _standby = Node::spawn(&[
        "standby".to_string(),
        "--listen".into(),
        addr.clone(),
        format!("--console=file:{}", s_out.display()),
    ]);
    let start = Instant::now();
    let mut primary = Node::spawn(&[
        "primary".to_string(),
        "--peer".into(),
        addr,
        "--mem=128M".into(),
        // A SIGKILL closes the link, which the standby sees at once; the long timeout only
        // keeps a loaded machine's slow acknowledgement from ending protection early.
        "--failover-timeout-ms=2000".into(),
        format!("--kernel={}", kernel.display()),
        format!("--console=file:{}", p_out.display()),
    ]);
    // The banner is released output: a checkpoint holding it was acknowledged.
    let up = wait_for(BANNER_LIMIT, || {
        text(&p_out).contains("Linux version") || !primary.running()
    });
    assert!(
        up && primary.running(),
        "primary: no banner within {BANNER_LIMIT:?}; stderr:\n{}",
        primary.stderr()
    );
    eprintln!("primary's banner after {:?}", start.elapsed());
    common::signal(primary.pid(), libc::SIGKILL);
    let killed = Instant::now();
    let released = std::fs::read(&p_out).unwrap_or_default();
    let booted = wait_for(MEMORY_LIMIT, || text(&s_out).contains("Memory:"));
    assert!(
        booted,
        "standby did not reach Memory: within {MEMORY_LIMIT:?} of the kill; its console:\n{}",
        text(&s_out)
    );
    eprintln!(
        "standby's Memory: line {:?} after the kill",
        killed.elapsed()
    );
    let standby = std::fs::read(&s_out).unwrap_or_default();
    let first = standby.iter().position(|&b| b != 0);
    assert!(
        first.is_some_and(|f| f <= released.len()),
        "the standby's output does not continue the primary's"
    );
    // Gapless and identical where both wrote (merge asserts both).
    let merged = String::from_utf8_lossy(&merge(&released, &standby)).into_owned();
    assert_eq!(merged.matches("Linux version").count(), 1, "{merged}");
    assert!(merged.contains("ACPI: RSDP"), "{merged}");
    let memory = merged.find("Memory:").expect("Memory: line");
    assert!(merged.find("Linux version").is_some_and(|b| b < memory));
    assert!(
        !merged[..memory].contains('\0'),
        "a hole in the merged console"
    );
}

#[test]
fn debian_bzimage_enters_through_the_64_bit_boot_protocol() {
    let _one = ONE_KERNEL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Scratch::new("linux-bzimage");
    let out = dir.path("console");
    let mut vm = Node::spawn(&[
        "run".to_string(),
        "--mem=256M".into(),
        format!("--kernel={}", bzimage().display()),
        "--cmdline=console=ttyS0 earlyprintk=serial,ttyS0,115200 nokaslr".into(),
        format!("--console=file:{}", out.display()),
    ]);
    // The decompressor (emulated here: it takes minutes to reach the kernel's banner) found
    // the command line through the zero page and printed on the UART.
    let seen = wait_for(BANNER_LIMIT, || {
        text(&out).contains("KASLR disabled: 'nokaslr' on cmdline.") || !vm.running()
    });
    assert!(
        seen && vm.running(),
        "the bzImage's decompressor printed nothing; console:\n{}\nstderr:\n{}",
        text(&out),
        vm.stderr()
    );
}
