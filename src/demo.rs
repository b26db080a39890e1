//! `ftvmm demo`: the main job with no configuration. Runs the stencil workload (2-D heat
//! diffusion over two vCPUs) once unreplicated for its fault-free checksum, then as a protected
//! primary with a standby on loopback (two child processes of this binary), kills the primary
//! with SIGKILL mid-run, and shows the guest finishing on the standby with the same checksum.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use vmm::builder::HostIo;
use vmm::{GuestKind, VmConfig, VmOutcome, Vmm};

use crate::run::{Capture, Error, Node};

const N: usize = 512;
const STEPS: u64 = 60_000;
const REPORT: u64 = 5_000;
const VCPUS: u32 = 2;
/// The primary is killed once the guest has reported this step (its output was released, so
/// the standby holds a checkpoint at least that far on).
const KILL_AT_STEP: u64 = 20_000;
const LIMIT: Duration = Duration::from_secs(300);

fn guest_args() -> Vec<String> {
    vec![
        format!("n={N}"),
        format!("steps={STEPS}"),
        format!("report={REPORT}"),
    ]
}

fn checksum_of(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("checksum "))
        .and_then(|h| u64::from_str_radix(h, 16).ok())
}

/// The fault-free run: the same guest, unreplicated, in this process.
fn fault_free() -> Result<u64, Error> {
    let capture = Capture::default();
    let io = HostIo {
        kvm_path: "/dev/kvm".into(),
        console: Box::new(capture.clone()),
        disk: None,
        net: None,
    };
    let config = VmConfig {
        mem_size: 128 << 20,
        vcpus: VCPUS,
        args: guest_args(),
        kind: GuestKind::Payload,
    };
    let payload = crate::payloads::builtin("stencil").ok_or("stencil payload missing")?;
    let mut vmm = Vmm::boot_payload(&config, payload, io)?;
    vmm.start()?;
    match vmm.wait() {
        VmOutcome::Exited(0) => {}
        other => return Err(format!("the fault-free run ended with {other:?}").into()),
    }
    Ok(checksum_of(&capture.text()).ok_or("the fault-free run printed no checksum")?)
}

/// Shows a node's console file as it grows. Both nodes write the guest's console stream at
/// absolute offsets, so the standby's tail starts where the primary's released output ended,
/// reading the stream through `under` (the primary's file) up to the standby's first byte.
struct Tail {
    path: PathBuf,
    under: Option<PathBuf>,
    tag: &'static str,
    /// Stream offset up to which lines were shown.
    offset: usize,
    /// The lines shown so far.
    text: String,
}

impl Tail {
    fn new(path: PathBuf, under: Option<PathBuf>, tag: &'static str, offset: usize) -> Self {
        Self {
            path,
            under,
            tag,
            offset,
            text: String::new(),
        }
    }

    /// Prints the complete lines written past `offset`.
    fn show(&mut self) {
        let mut bytes = std::fs::read(&self.path).unwrap_or_default();
        if let Some(under) = &self.under {
            // Unwritten bytes of a console file read as zero.
            let first = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
            let mut merged = std::fs::read(under).unwrap_or_default();
            merged.truncate(first);
            merged.extend_from_slice(&bytes[first..]);
            bytes = merged;
        }
        let Some(new) = bytes.get(self.offset..) else {
            return;
        };
        let Some(end) = new.iter().rposition(|&b| b == b'\n') else {
            return;
        };
        let lines = String::from_utf8_lossy(&new[..=end]).into_owned();
        for line in lines.lines() {
            println!("  [{}] {line}", self.tag);
        }
        self.offset += end + 1;
        self.text.push_str(&lines);
    }
}

fn step_of(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.strip_prefix("step ")?.split(' ').next()?.parse().ok())
        .max()
        .unwrap_or(0)
}

pub fn demo() -> Result<ExitCode, Error> {
    println!(
        "ftvmm demo: stencil payload, {N}x{N} grid, {STEPS} Jacobi steps on {VCPUS} vCPUs, \
         replicated every 40 ms to a standby on loopback; the primary is killed mid-run"
    );
    let start = Instant::now();
    let reference = fault_free()?;
    println!(
        "1. fault-free run (unreplicated): checksum {reference:016x} in {:.1} s",
        start.elapsed().as_secs_f64()
    );

    let dir = std::env::temp_dir().join(format!("ftvmm-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = replicated(&dir, reference);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn replicated(dir: &Path, reference: u64) -> Result<ExitCode, Error> {
    let exe = std::env::current_exe()?;
    let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?.to_string();
    let (p_out, s_out, stats) = (
        dir.join("primary.console"),
        dir.join("standby.console"),
        dir.join("standby.json"),
    );
    let mut standby = Node(
        Command::new(&exe)
            .args(["standby", "--listen", &addr, "--console"])
            .arg(format!("file:{}", s_out.display()))
            .arg("--stats-json")
            .arg(&stats)
            .stdout(Stdio::null())
            .spawn()?,
    );
    let mut primary = Node(
        Command::new(&exe)
            .args(["primary", "--peer", &addr, "--vcpus", &VCPUS.to_string()])
            .args(["--mem", "128M", "--payload", "builtin:stencil", "--console"])
            .arg(format!("file:{}", p_out.display()))
            .arg("--")
            .args(guest_args())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    println!(
        "2. primary (pid {}) protected by a standby (pid {}) at {addr}; the guest's output, \
         released as each checkpoint is acknowledged:",
        primary.0.id(),
        standby.0.id()
    );
    let started = Instant::now();
    let mut p_tail = Tail::new(p_out.clone(), None, "primary", 0);
    loop {
        p_tail.show();
        if step_of(&p_tail.text) >= KILL_AT_STEP {
            break;
        }
        if let Some(status) = primary.0.try_wait()? {
            return Err(
                format!("the primary ended before the fault was injected: {status}").into(),
            );
        }
        if started.elapsed() > LIMIT {
            return Err("the primary made no progress".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    primary.0.kill()?;
    primary.0.wait()?;
    p_tail.show();
    println!(
        "3. killed the primary with SIGKILL after step {}; the standby takes over:",
        step_of(&p_tail.text)
    );
    std::io::stdout().flush()?;
    let mut s_tail = Tail::new(s_out, Some(p_out), "standby", p_tail.offset);
    let status = loop {
        s_tail.show();
        if let Some(status) = standby.0.try_wait()? {
            break status;
        }
        if started.elapsed() > LIMIT {
            return Err("the standby did not finish the guest".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    s_tail.show();
    if !status.success() {
        return Err(format!("the standby failed: {status}").into());
    }
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&stats)?)?;
    println!(
        "4. the standby resumed from checkpoint {} (detection {:.1} ms, restore {:.1} ms: {})",
        json["epoch"],
        json["detection_ms"].as_f64().unwrap_or(f64::NAN),
        json["restore_ms"].as_f64().unwrap_or(f64::NAN),
        json["reason"].as_str().unwrap_or("?"),
    );
    match checksum_of(&s_tail.text) {
        Some(sum) if sum == reference => {
            println!("checksum {sum:016x} equals the fault-free run's: OK");
            Ok(ExitCode::SUCCESS)
        }
        Some(sum) => {
            println!("checksum MISMATCH: failover {sum:016x}, fault-free {reference:016x}");
            Ok(ExitCode::FAILURE)
        }
        None => Err("the standby's guest printed no checksum".into()),
    }
}
