//! Helpers shared by the end-to-end tests: running the ftvmm binary with a bounded wait,
//! hand-made ELF files, and the host-side reference of the seq payload.
#![allow(dead_code)] // each test binary uses its own subset

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const FTVMM: &str = env!("CARGO_BIN_EXE_ftvmm");
/// ftvmm's own failures exit with this status.
pub const EXIT_FTVMM_ERROR: i32 = 125;
pub const EXIT_GUEST_FAULT: i32 = 124;

/// A child process that is killed (by pid) if the test drops it while it still runs.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Runs `ftvmm ARGS` to completion, killing it after `limit`.
pub fn ftvmm(args: &[&str], limit: Duration) -> Output {
    let child = Command::new(FTVMM)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ftvmm");
    wait_bounded(child, limit)
}

/// Waits for `child` at most `limit`; panics (after killing it) if it runs longer.
pub fn wait_bounded(child: Child, limit: Duration) -> Output {
    let mut guard = Guard(child);
    let mut stdout = guard.0.stdout.take();
    let mut stderr = guard.0.stderr.take();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.read_to_end(&mut v);
        }
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.read_to_end(&mut v);
        }
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = guard.0.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > limit {
            let _ = guard.0.kill();
            let _ = guard.0.wait();
            let err = err_t.join().unwrap_or_default();
            panic!(
                "ftvmm did not finish within {limit:?}; stderr:\n{}",
                String::from_utf8_lossy(&err)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    }
}

/// The exact console transcript of `builtin:seq -- count pages work`.
pub fn seq_transcript(count: u64, work: u64) -> String {
    let mut x: u64 = 1;
    let mut s = String::new();
    for i in 1..=count {
        for _ in 0..work {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
        }
        s.push_str(&format!("{i} {x:016x}\n"));
    }
    s.push_str("done\n");
    s
}

/// A unique scratch directory for one test, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ftvmm-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Self(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A static x86-64 ELF with one segment holding `code` at `load`, entered at `load`.
pub fn elf_with_code(code: &[u8], load: u64) -> Vec<u8> {
    let mut e = vec![0u8; 120];
    e[..4].copy_from_slice(b"\x7fELF");
    e[4] = 2;
    e[5] = 1;
    e[6] = 1;
    e[16..18].copy_from_slice(&2u16.to_le_bytes());
    e[18..20].copy_from_slice(&62u16.to_le_bytes());
    e[24..32].copy_from_slice(&load.to_le_bytes());
    e[32..40].copy_from_slice(&64u64.to_le_bytes());
    e[52..54].copy_from_slice(&64u16.to_le_bytes());
    e[54..56].copy_from_slice(&56u16.to_le_bytes());
    e[56..58].copy_from_slice(&1u16.to_le_bytes());
    let n = code.len() as u64;
    let ph = &mut e[64..120];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes());
    ph[4..8].copy_from_slice(&5u32.to_le_bytes());
    ph[8..16].copy_from_slice(&120u64.to_le_bytes());
    ph[16..24].copy_from_slice(&load.to_le_bytes());
    ph[24..32].copy_from_slice(&load.to_le_bytes());
    ph[32..40].copy_from_slice(&n.to_le_bytes());
    ph[40..48].copy_from_slice(&n.max(0x1000).to_le_bytes());
    e.extend_from_slice(code);
    e
}

pub fn write_file(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).expect("write test file");
}

pub fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}
