//! Helpers shared by the end-to-end tests: running the ftvmm binary with a bounded wait,
//! hand-made ELF files, the host-side reference of the seq payload, and the pieces of the
//! replication tests (nodes whose stderr is watched while they run, signals by pid, merging
//! the two nodes' console files).
#![allow(dead_code)] // each test binary uses its own subset

pub mod pair;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm::cast::usize_to_u64;

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

/// Makes the child of `cmd` die with the thread that starts it: an interrupted or crashed
/// test leaves no ftvmm behind (a normal end kills its nodes by pid first).
pub fn dies_with_test(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a flag of the calling (child) process; it is
    // async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Runs `ftvmm ARGS` to completion, killing it after `limit`.
pub fn ftvmm(args: &[&str], limit: Duration) -> Output {
    let child = dies_with_test(&mut Command::new(FTVMM))
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

/// The exact console transcript of `builtin:seq -- count pages work` (any `pages`).
pub fn seq_transcript(count: u64, work: u64) -> String {
    // One step is the affine map x -> a*x + b (mod 2^64); `work` steps are its work-th power,
    // computed by squaring so that a guest that runs for seconds (a large WORK) is checked in
    // microseconds by this (unoptimised) test build.
    let (a, b) = affine_power(6364136223846793005, 1442695040888963407, work);
    let mut x: u64 = 1;
    let mut s = String::new();
    for i in 1..=count {
        x = a.wrapping_mul(x).wrapping_add(b);
        s.push_str(&format!("{i} {x:016x}\n"));
    }
    s.push_str("done\n");
    s
}

/// The map x -> a*x + b applied `n` times, as (a', b') with x -> a'*x + b' (wrapping).
fn affine_power(mut a: u64, mut b: u64, mut n: u64) -> (u64, u64) {
    let (mut ra, mut rb) = (1u64, 0u64);
    while n > 0 {
        if n & 1 == 1 {
            // r := f after r (powers of one map commute, so the order does not matter).
            (ra, rb) = (a.wrapping_mul(ra), a.wrapping_mul(rb).wrapping_add(b));
        }
        (a, b) = (a.wrapping_mul(a), a.wrapping_mul(b).wrapping_add(b));
        n >>= 1;
    }
    (ra, rb)
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
    let n = usize_to_u64(code.len());
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

/// Checks that ftvmm failed as ftvmm (not the guest) with one `ftvmm: error: ...` line on
/// stderr, and returns that line.
pub fn one_error_line(out: &Output) -> String {
    let err = stderr_of(out);
    assert_eq!(out.status.code(), Some(EXIT_FTVMM_ERROR), "stderr: {err}");
    assert!(!err.contains("panicked"), "ftvmm panicked: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(err.starts_with("ftvmm: error: "), "{err}");
    err.trim_end().to_string()
}

/// A loopback port that nothing listens on (until a test binds it).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local address").port()
}

/// Polls `cond` every 5 ms until it holds; false if it still does not after `limit`.
pub fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Length of a file, 0 if it does not exist (yet).
pub fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Sends `sig` to the process `pid`.
pub fn signal(pid: u32, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).unwrap();
    // SAFETY: kill(2) has no memory effects. Callers pass a child of this test that they know
    // runs, so it is not reaped yet and its pid cannot have been reused.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

/// Whether every thread of `pid` is stopped (state T in /proc), i.e. a SIGSTOP took effect.
pub fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            // The state follows the parenthesised command name, which may contain spaces.
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('T')))
            .unwrap_or(false)
    })
}

/// Stops `pid` with SIGSTOP and waits until all its threads are stopped.
pub fn freeze(pid: u32) {
    signal(pid, libc::SIGSTOP);
    assert!(
        wait_for(Duration::from_secs(5), || all_threads_stopped(pid)),
        "process {pid} did not stop"
    );
}

/// A running ftvmm whose stderr is collected as it comes, so that a test can wait for a log
/// line while the process runs. Killed (by pid) if dropped while it runs.
pub struct Node {
    pub child: Guard,
    stderr: Arc<Mutex<Vec<u8>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Node {
    /// Starts `ftvmm ARGS` with stdin and stdout closed and stderr collected.
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Self {
        let mut cmd = Command::new(FTVMM);
        cmd.args(args);
        Self::start(cmd)
    }

    /// Starts `ftvmm ARGS` in network namespace `netns` (`ip netns exec` execs ftvmm, so the
    /// pid is ftvmm's).
    pub fn spawn_in<S: AsRef<std::ffi::OsStr>>(netns: &str, args: &[S]) -> Self {
        Self::spawn_in_env(netns, args, &[])
    }

    /// [`Node::spawn`] with environment variables `env` set.
    pub fn spawn_env<S: AsRef<std::ffi::OsStr>>(args: &[S], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(FTVMM);
        cmd.args(args).envs(env.iter().copied());
        Self::start(cmd)
    }

    /// [`Node::spawn_in`] with environment variables `env` set.
    pub fn spawn_in_env<S: AsRef<std::ffi::OsStr>>(
        netns: &str,
        args: &[S],
        env: &[(&str, &str)],
    ) -> Self {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns, FTVMM])
            .args(args)
            .envs(env.iter().copied());
        Self::start(cmd)
    }

    fn start(mut cmd: Command) -> Self {
        let mut child = dies_with_test(&mut cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ftvmm");
        let mut pipe = child.stderr.take().expect("stderr pipe");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = stderr.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Self {
            child: Guard(child),
            stderr,
            reader: Some(reader),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Waits at most `limit` for `needle` to appear on stderr; false at once if the process
    /// exits without writing it.
    pub fn wait_stderr(&mut self, needle: &str, limit: Duration) -> bool {
        wait_for(limit, || {
            let done = !self.running();
            self.stderr().contains(needle) || done
        }) && self.stderr().contains(needle)
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.0.try_wait(), Ok(None))
    }

    /// Waits at most `limit` for the process to exit; panics (after killing it) if it does not.
    /// Returns its status and complete stderr.
    pub fn wait(&mut self, limit: Duration) -> (ExitStatus, String) {
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.0.try_wait().expect("wait") {
                break status;
            }
            if start.elapsed() > limit {
                let _ = self.child.0.kill();
                let _ = self.child.0.wait();
                panic!(
                    "ftvmm did not finish within {limit:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        // The pipe ends with the process (its children, if any, do not keep it).
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        (status, self.stderr())
    }
}

/// Merges console files written at stream offsets by the nodes that ran a guest in turn
/// (unwritten bytes of a file are zero: console output here is text). Where two wrote, they
/// must be equal; the merged stream must have no hole.
pub fn merge(first: &[u8], second: &[u8]) -> Vec<u8> {
    merge_all(&[first, second])
}

/// [`merge`] of any number of files.
pub fn merge_all(files: &[&[u8]]) -> Vec<u8> {
    let len = files.iter().map(|f| f.len()).max().unwrap_or(0);
    let mut merged = vec![0u8; len];
    for file in files {
        for (at, (&byte, out)) in file.iter().zip(merged.iter_mut()).enumerate() {
            if byte == 0 {
                continue;
            }
            assert!(
                *out == 0 || *out == byte,
                "nodes diverge at stream offset {at}"
            );
            *out = byte;
        }
    }
    if let Some(hole) = merged.iter().position(|&b| b == 0) {
        panic!("gap between the nodes' output at stream offset {hole} of {len}");
    }
    merged
}

/// Reads a `--stats-json` file.
pub fn stats(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read stats {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad stats JSON {text}: {e}"))
}

/// xorshift64: the tests' seeded source of "random" moments. Each test has its own seed;
/// FTVMM_TEST_SEED (hex or decimal) replaces it, to replay or to explore other moments, and
/// trial messages name it, so a failure says how to reproduce it.
pub struct Rng(pub u64, u64);

impl Rng {
    pub fn seeded(default: u64) -> Self {
        let seed = std::env::var("FTVMM_TEST_SEED")
            .ok()
            .and_then(|s| match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16).ok(),
                None => s.parse().ok(),
            })
            .filter(|&s| s != 0)
            .unwrap_or(default);
        Self(seed, seed)
    }

    /// `seed 0x…`, for messages: FTVMM_TEST_SEED=0x… replays the test.
    pub fn name(&self) -> String {
        format!("seed {:#x}", self.1)
    }

    pub fn next(&mut self) -> u64 {
        let x = &mut self.0;
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    /// A number in lo..hi.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }

    /// A duration uniformly in `lo..hi` milliseconds.
    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }
}
