//! Every builtin payload boots under KVM and computes exactly what the host computes.

mod common;

use std::time::Duration;

use common::*;

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
    assert_eq!((word(1), word(2)), (n as u64, steps));
    assert_eq!(word(3), stencil_core::checksum(&grid));
    assert_eq!(word(3), stencil_checksum(&out));
    assert_eq!(word(4), n as u64, "all rows fit in 1 MiB");
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

#[test]
fn the_demo_fails_over_mid_run_and_finishes_with_the_fault_free_checksum() {
    let out = ftvmm(&["demo"], Duration::from_secs(240));
    let text = stdout_of(&out);
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr_of(&out));
    assert!(
        text.contains("[primary] step 5000 center"),
        "shows progress: {text}"
    );
    assert!(text.contains("killed the primary with SIGKILL"), "{text}");
    assert!(text.contains("[standby] step 60000 center"), "{text}");
    assert!(text.contains("equals the fault-free run's: OK"), "{text}");
}
