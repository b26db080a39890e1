//! Replication end to end on loopback: a primary killed with SIGKILL at seeded moments after
//! protection starts; the standby takes over and finishes the guest exactly.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{wait_bounded, Guard, Scratch, FTVMM};

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Merges two console files written at stream offsets: the standby's bytes win where it wrote
/// (unwritten bytes of a file are zero); where both wrote, they must be equal.
fn merge(primary: &[u8], standby: &[u8]) -> Vec<u8> {
    let first = standby
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(standby.len());
    let overlap = primary.len().min(standby.len());
    if first < overlap {
        assert_eq!(
            primary[first..overlap],
            standby[first..overlap],
            "nodes diverge"
        );
    }
    assert!(first <= primary.len(), "gap between the nodes' output");
    let mut merged = primary[..first].to_vec();
    merged.extend_from_slice(&standby[first..]);
    merged
}

#[test]
fn stencil_survives_primary_sigkill_at_seeded_moments() {
    let (n, steps) = (256usize, 40_000u64);
    let expected = format!(
        "checksum {:016x}",
        stencil_core::reference_checksum(n, steps)
    );
    let args = [
        format!("n={n}"),
        format!("steps={steps}"),
        "report=2000".into(),
    ];
    // xorshift seeded for repeatability: kill 0..600 ms after protection starts.
    let mut x: u64 = 0x5eed_f00d;
    for trial in 0..6 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let delay = Duration::from_millis(x % 600);
        let dir = Scratch::new(&format!("failover{trial}"));
        let (p_out, s_out) = (dir.path("p.out"), dir.path("s.out"));
        let addr = format!("127.0.0.1:{}", free_port());
        let standby = Command::new(FTVMM)
            .args(["standby", "--listen", &addr, "--console"])
            .arg(format!("file:{}", s_out.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut primary = Guard(
            Command::new(FTVMM)
                .args(["primary", "--peer", &addr, "--vcpus", "2", "--mem", "64M"])
                .args(["--failover-timeout-ms", "200"])
                .args(["--payload", "builtin:stencil", "--console"])
                .arg(format!("file:{}", p_out.display()))
                .arg("--")
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        // Released output means a checkpoint was acknowledged: protection has started.
        let start = std::time::Instant::now();
        while std::fs::metadata(&p_out).map_or(0, |m| m.len()) == 0 {
            assert!(start.elapsed() < Duration::from_secs(60), "never protected");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(delay);
        // SIGKILL of the ftvmm process itself (by pid).
        primary.0.kill().unwrap();
        primary.0.wait().unwrap();
        let out = wait_bounded(standby, Duration::from_secs(120));
        let p = std::fs::read(&p_out).unwrap_or_default();
        let s = std::fs::read(&s_out).unwrap_or_default();
        let merged = String::from_utf8(merge(&p, &s)).unwrap();
        assert!(
            out.status.success(),
            "trial {trial} ({delay:?}): standby failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            merged.lines().last(),
            Some(expected.as_str()),
            "trial {trial}"
        );
        let reports: Vec<&str> = merged.lines().filter(|l| l.starts_with("step ")).collect();
        assert_eq!(
            reports.len() as u64,
            steps / 2000,
            "trial {trial}: gapless reports"
        );
    }
}
