//! Every builtin payload boots under KVM and computes exactly what the host computes.

mod common;

use std::time::Duration;

use common::*;
use vmm::cast::usize_to_u64;

const LIMIT: Duration = Duration::from_secs(60);

fn run_ok(args: &[&str]) -> String {
    let out = ftvmm(args, LIMIT);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr_of(&out));
    stdout_of(&out)
}

#[test]
fn seq_output_is_the_host_computation_line_by_line() {
    let out = run_ok(&["run", "--payload", "builtin:seq", "--", "3000", "64", "3"]);
    let want = seq_transcript(3000, 3);
    for (n, (got, want)) in out.lines().zip(want.lines()).enumerate() {
        assert_eq!(got, want, "line {}", n + 1);
    }
    assert_eq!(out, want);
}

#[test]
fn seq_defaults_and_bad_arguments() {
    assert_eq!(
        run_ok(&["run", "--payload", "builtin:seq", "--", "10"]),
        seq_transcript(10, 1)
    );
    let out = ftvmm(&["run", "--payload", "builtin:seq", "--", "ten"], LIMIT);
    assert_eq!(out.status.code(), Some(2), "bad COUNT exits 2");
}

fn stencil_checksum(out: &str) -> u64 {
    let line = out
        .lines()
        .last()
        .and_then(|l| l.strip_prefix("checksum "))
        .unwrap_or_else(|| panic!("no checksum line in:\n{out}"));
    u64::from_str_radix(line, 16).expect("hex checksum")
}

#[test]
fn stencil_checksum_equals_the_host_reference_on_one_and_two_vcpus() {
    let want = stencil_core::reference_checksum(200, 150);
    for vcpus in ["1", "2"] {
        let out = run_ok(&[
            "run",
            "--vcpus",
            vcpus,
            "--payload",
            "builtin:stencil",
            "--",
            "n=200",
            "steps=150",
            "report=50",
        ]);
        assert_eq!(stencil_checksum(&out), want, "{vcpus} vCPUs:\n{out}");
        let progress: Vec<&str> = out.lines().filter(|l| l.starts_with("step ")).collect();
        assert_eq!(progress.len(), 3, "{out}");
    }
}

#[test]
fn stencil_writes_its_result_to_the_disk() {
    let s = Scratch::new("stencil-disk");
    let disk = s.path("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let (n, steps) = (64usize, 31u64);
    let out = run_ok(&[
        "run",
        "--vcpus",
        "2",
        "--disk",
        disk.to_str().unwrap(),
        "--payload",
        "builtin:stencil",
        "--",
        "n=64",
        "steps=31",
    ]);
    assert!(out.contains("disk written"), "{out}");
    // The host's own run of the same kernel.
    let mut a = vec![0.0f64; n * n];
    let mut b = vec![0.0f64; n * n];
    stencil_core::init(&mut a, n);
    stencil_core::init(&mut b, n);
    let grid = if stencil_core::run_serial(&mut a, &mut b, n, steps) {
        b
    } else {
        a
    };
    let img = std::fs::read(&disk).unwrap();
    let word = |i: usize| u64::from_le_bytes(img[i * 8..i * 8 + 8].try_into().unwrap());
    assert_eq!(&img[..8], b"FTVSTNC1");
    assert_eq!((word(1), word(2)), (usize_to_u64(n), steps));
    assert_eq!(word(3), stencil_core::checksum(&grid));
    assert_eq!(word(3), stencil_checksum(&out));
    assert_eq!(word(4), usize_to_u64(n), "all rows fit in 1 MiB");
    let cells: Vec<f64> = img[512..512 + n * n * 8]
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert!(cells == grid, "the grid on disk is the host's grid");
}

fn refused_disk(path: &str) -> String {
    let out = ftvmm(
        &["run", "--disk", path, "--payload", "builtin:seq", "--", "1"],
        LIMIT,
    );
    assert_eq!(out.status.code(), Some(EXIT_FTVMM_ERROR));
    let err = stderr_of(&out);
    assert!(err.contains(path), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    err
}

/// Clears the immutable flag again, even when the test fails.
struct Immutable(std::path::PathBuf);
impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_missing_or_read_only_disk_is_refused() {
    let err = refused_disk("/nonexistent/disk.img");
    assert!(err.contains("does not exist"), "{err}");
    // Root ignores permission bits; an immutable file cannot be opened for writing even by root.
    let s = Scratch::new("ro-disk");
    let disk = s.path("ro.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let ok = std::process::Command::new("chattr")
        .arg("+i")
        .arg(&disk)
        .status();
    assert!(
        ok.is_ok_and(|s| s.success()),
        "chattr +i (e2fsprogs) on the test directory"
    );
    let _guard = Immutable(disk.clone());
    let err = refused_disk(disk.to_str().unwrap());
    assert!(err.contains("cannot be opened read-write"), "{err}");
}

/// The demo runs the whole protected cycle of examples/local-pair.toml and ends with the
/// fault-free checksum and the summary of what each step cost; its output is plain text.
#[test]
fn the_demo_runs_the_whole_cycle_and_finishes_with_the_fault_free_checksum() {
    let out = ftvmm(&["demo"], Duration::from_secs(300));
    let text = stdout_of(&out);
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr_of(&out));
    for step in [
        "1. fault-free run",
        "2. nodes a and b up",
        "3. killed node a",
        "4. node a back",
        "5. automatic failback",
        "equals the fault-free run's: OK",
        "what each step cost:",
    ] {
        assert!(text.contains(step), "no {step:?} in:\n{text}");
    }
    assert!(!text.contains('\x1b'), "escape codes on a pipe:\n{text}");
    assert!(text.lines().count() < 40, "a wall of lines:\n{text}");
    println!("{text}");
}

/// Runs `builtin:journal` on `disk` with `args`.
fn journal(disk: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut all = vec![
        "run",
        "--disk",
        disk.to_str().unwrap(),
        "--payload",
        "builtin:journal",
        "--",
    ];
    all.extend_from_slice(args);
    ftvmm(&all, LIMIT)
}

/// Checks the records on the image from the host, independently of the guest's code: sector
/// `n` holds magic `FTJR`, seq `n`, payload length 492 and the CRC32C (crc32c crate) of bytes
/// 0..508, for every `n < count`; every sector after them is still zero.
fn check_journal_image(img: &[u8], count: usize) {
    for (n, sector) in img.chunks_exact(512).enumerate() {
        if n >= count {
            assert!(sector.iter().all(|&b| b == 0), "sector {n} past the log");
            continue;
        }
        assert_eq!(&sector[..4], b"FTJR", "magic of sector {n}");
        let seq = u64::from_le_bytes(sector[4..12].try_into().unwrap());
        assert_eq!(seq, usize_to_u64(n), "seq of sector {n}");
        let len = u32::from_le_bytes(sector[12..16].try_into().unwrap());
        assert_eq!(len, 492, "payload length of sector {n}");
        let crc = u32::from_le_bytes(sector[508..512].try_into().unwrap());
        assert_eq!(crc, crc32c::crc32c(&sector[..508]), "CRC of sector {n}");
    }
}

fn committed_lines(out: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| l.strip_prefix("committed "))
        .map(|n| n.parse().expect("committed count"))
        .collect()
}

#[test]
fn journal_commits_every_batch_and_verify_reads_every_record_back() {
    let s = Scratch::new("journal");
    let disk = s.path("journal.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let out = journal(&disk, &["1000"]);
    let text = stdout_of(&out);
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr_of(&out));
    // Increasing multiples of the default batch (16), then the last partial batch.
    let want: Vec<u64> = (1..=62).map(|i| i * 16).chain([1000]).collect();
    assert_eq!(committed_lines(&text), want, "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), want.len() + 1, "{text}");
    assert_eq!(lines[lines.len() - 2], "committed 1000");
    let done = lines[lines.len() - 1];
    let us = done
        .strip_prefix("done 1000 records in ")
        .and_then(|r| r.strip_suffix(" us"))
        .unwrap_or_else(|| panic!("no done line: {text}"));
    us.parse::<u64>().expect("microseconds");
    check_journal_image(&std::fs::read(&disk).unwrap(), 1000);

    let out = journal(&disk, &["verify"]);
    assert_eq!(stdout_of(&out), "ok 1000\n", "{}", stderr_of(&out));
    assert_eq!(out.status.code(), Some(0));

    // Another batch size: multiples of 7, the last one COUNT.
    let small = s.path("small.img");
    std::fs::write(&small, vec![0u8; 64 << 10]).unwrap();
    let out = journal(&small, &["50", "batch=7"]);
    let text = stdout_of(&out);
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr_of(&out));
    let want: Vec<u64> = (1..=7).map(|i| i * 7).chain([50]).collect();
    assert_eq!(committed_lines(&text), want, "{text}");
    assert!(text.ends_with(" us\n") && text.contains("done 50 records in "));
    check_journal_image(&std::fs::read(&small).unwrap(), 50);
}

#[test]
fn journal_verify_finds_a_corrupted_record_and_stops_at_a_blank_one() {
    let s = Scratch::new("journal-corrupt");
    let disk = s.path("journal.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let out = journal(&disk, &["1000", "batch=64"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout_of(&out));
    let mut img = std::fs::read(&disk).unwrap();
    check_journal_image(&img, 1000);

    // One flipped payload bit in record 500: the CRC no longer matches.
    img[500 * 512 + 100] ^= 0x01;
    std::fs::write(&disk, &img).unwrap();
    let out = journal(&disk, &["verify"]);
    assert_eq!(stdout_of(&out), "corrupt at 500\n", "{}", stderr_of(&out));
    assert_eq!(out.status.code(), Some(1));

    // Record 500 never written (a torn log's end): the first 500 are the log.
    img[500 * 512..501 * 512].fill(0);
    std::fs::write(&disk, &img).unwrap();
    let out = journal(&disk, &["verify"]);
    assert_eq!(stdout_of(&out), "ok 500\n", "{}", stderr_of(&out));
    assert_eq!(out.status.code(), Some(0));

    // A record with a valid CRC but at the wrong place (record 3 copied over record 2).
    img.copy_within(3 * 512..4 * 512, 2 * 512);
    std::fs::write(&disk, &img).unwrap();
    let out = journal(&disk, &["verify"]);
    assert_eq!(stdout_of(&out), "corrupt at 2\n", "{}", stderr_of(&out));
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn journal_refuses_bad_arguments() {
    let s = Scratch::new("journal-args");
    let disk = s.path("small.img");
    // 128 sectors.
    std::fs::write(&disk, vec![0u8; 64 << 10]).unwrap();
    let refused = |out: std::process::Output| {
        let text = stdout_of(&out);
        assert_eq!(out.status.code(), Some(2), "{text}{}", stderr_of(&out));
        assert_eq!(text.lines().count(), 1, "one line: {text}");
        assert!(text.starts_with("journal: "), "{text}");
        text
    };
    let no_disk = ftvmm(&["run", "--payload", "builtin:journal", "--", "10"], LIMIT);
    assert!(refused(no_disk).contains("no disk"));
    let text = refused(journal(&disk, &["129"]));
    assert!(text.contains("larger than the disk"), "{text}");
    refused(journal(&disk, &["ten"]));
    refused(journal(&disk, &[]));
    refused(journal(&disk, &["10", "batch=0"]));
    refused(journal(&disk, &["10", "batch=x"]));
    refused(journal(&disk, &["10", "extra"]));
    refused(journal(&disk, &["verify", "now"]));
    assert!(
        std::fs::read(&disk).unwrap().iter().all(|&b| b == 0),
        "nothing written"
    );
    // The whole disk is fine.
    let out = journal(&disk, &["128", "batch=128"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout_of(&out));
    let out = journal(&disk, &["verify"]);
    assert_eq!(stdout_of(&out), "ok 128\n");
}

/// A guest with nothing to do naps off the host CPU (port 0x504): a second of idling costs the
/// host a small part of that second, on a machine however loaded (load only lowers it).
#[test]
fn an_idle_guest_naps_off_the_cpu() {
    let start = std::time::Instant::now();
    // SAFETY: getrusage fills the struct it is given; no other memory is touched.
    let cpu = || unsafe {
        let mut r: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut r);
        let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 * 1e-6;
        t(r.ru_utime) + t(r.ru_stime)
    };
    let before = cpu();
    let out = run_ok(&["run", "--payload", "builtin:idle", "--", "1"]);
    let (wall, used) = (start.elapsed().as_secs_f64(), cpu() - before);
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("idle"), "{out}");
    let naps: u64 = lines
        .next()
        .and_then(|l| l.strip_prefix("done "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(naps > 10, "{out}");
    assert!(
        used < wall / 2.0,
        "the idle guest used {used:.2} s of CPU in {wall:.2} s"
    );
}
