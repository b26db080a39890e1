//! Replication end to end on loopback: a primary killed with SIGKILL at seeded moments of its
//! guest's run; the standby takes over and finishes the guest exactly.

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{free_port, merge, stats, wait_for, Node, Rng, Scratch};
use vmm::cast::{u64_to_usize, usize_to_u64};

/// Each test runs a replicated pair that needs about a CPU and a half; on a small machine two
/// at once would starve each other into spurious failovers and time-outs.
static ONE_PAIR: Mutex<()> = Mutex::new(());

/// A killed primary's sockets close at once, so the standby sees the kill whatever the
/// failover timeout; generous timeouts keep a starved machine (a build flushing to disk
/// beside the suite) from dropping the standby or failing over before the kill.
const FAILOVER_TIMEOUT_MS: u64 = 2000;
const ACK_TIMEOUT_MS: u64 = 30_000;

/// What one trial left behind: the merged console, the standby's stats, the primary's stats
/// as it last wrote them before the kill, and how long the pair ran from protection to the
/// standby's exit.
struct Trial {
    merged: String,
    standby: serde_json::Value,
    primary: serde_json::Value,
    ran: Duration,
}

/// A seeded point in the first two thirds of the `lines` a guest prints that are still to come
/// when protection starts at line `protected_at`.
fn mid_run(lines: usize, rng: &mut Rng) -> impl FnOnce(usize) -> usize + '_ {
    move |protected_at| {
        let to_come = usize_to_u64(lines.saturating_sub(protected_at));
        protected_at + u64_to_usize(rng.range(0, (to_come * 2 / 3).max(1)))
    }
}

/// Runs the payload on a primary/standby pair. Once protection starts (the first released
/// output: a checkpoint was acknowledged, at line `protected_at`), SIGKILLs the primary
/// `after` it has released `kill_at(protected_at)` lines (the moment follows the guest's
/// progress, whatever this machine's speed), and lets the standby finish, which must exit 0.
fn kill_primary(
    dir: &Scratch,
    vm: &[&str],
    standby_vm: &[&str],
    payload: &[String],
    kill_at: impl FnOnce(usize) -> usize,
    after: Duration,
    what: &str,
) -> Trial {
    let (p_out, s_out, s_stats) = (dir.path("p.out"), dir.path("s.out"), dir.path("s.json"));
    let p_stats = dir.path("p.json");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut standby = Node::spawn(
        &[
            "standby".into(),
            "--listen".into(),
            addr.clone(),
            format!("--console=file:{}", s_out.display()),
            format!("--stats-json={}", s_stats.display()),
        ]
        .into_iter()
        .chain(standby_vm.iter().map(|a| a.to_string()))
        .collect::<Vec<_>>(),
    );
    let mut args: Vec<String> = ["primary", "--peer", &addr, "--mem", "64M"]
        .map(String::from)
        .into();
    args.push(format!("--failover-timeout-ms={FAILOVER_TIMEOUT_MS}"));
    args.push(format!("--ack-timeout-ms={ACK_TIMEOUT_MS}"));
    args.push(format!("--console=file:{}", p_out.display()));
    args.push(format!("--stats-json={}", p_stats.display()));
    args.extend(vm.iter().map(|a| a.to_string()));
    args.push("--".into());
    args.extend_from_slice(payload);
    let mut primary = Node::spawn(&args);
    let released_lines = || {
        let out = std::fs::read(&p_out).unwrap_or_default();
        out.iter().filter(|&&b| b == b'\n').count()
    };
    let up = wait_for(Duration::from_secs(60), || {
        released_lines() > 0 || !primary.running()
    });
    assert!(
        up && primary.running(),
        "{what}: never protected: {}",
        primary.stderr()
    );
    let start = Instant::now();
    let kill_at = kill_at(released_lines());
    let reached = wait_for(Duration::from_secs(60), || {
        released_lines() >= kill_at || !primary.running()
    });
    assert!(reached, "{what}: stalled before line {kill_at}");
    // A chosen moment after the line, not a wait for anything.
    std::thread::sleep(after);
    let at_kill = stats(&p_stats);
    // SIGKILL of the ftvmm process itself (by pid).
    primary.child.0.kill().unwrap();
    let (status, s_err) = standby.wait(Duration::from_secs(120));
    assert!(
        status.success(),
        "{what}: standby failed: {s_err}\nprimary: {}",
        primary.stderr()
    );
    let p = std::fs::read(&p_out).unwrap_or_default();
    let s = std::fs::read(&s_out).unwrap_or_default();
    let merged = String::from_utf8(merge(&p, &s)).expect("console is text");
    Trial {
        merged,
        standby: stats(&s_stats),
        primary: at_kill,
        ran: start.elapsed(),
    }
}

/// The arguments of a 256x256 stencil run of `steps` reporting every `report` steps, and the
/// checksum line it must end with.
fn stencil(steps: u64, report: u64) -> ([String; 3], String) {
    let n = 256;
    let args = [
        format!("n={n}"),
        format!("steps={steps}"),
        format!("report={report}"),
    ];
    let expected = format!(
        "checksum {:016x}",
        stencil_core::reference_checksum(n, steps)
    );
    (args, expected)
}

#[test]
fn stencil_survives_primary_sigkill_at_seeded_moments() {
    let _one = ONE_PAIR.lock().unwrap_or_else(|e| e.into_inner());
    // Long enough (some 2.5 s on 2 vCPUs) that protection starts early in the run even when
    // a loaded machine makes pre-copy slow.
    let steps = 200_000u64;
    let (args, expected) = stencil(steps, 5000);
    let mut rng = Rng::seeded(0x5eed_f00d);
    for trial in 0..6 {
        let dir = Scratch::new(&format!("failover{trial}"));
        let what = format!("stencil {} trial {trial}", rng.name());
        let t = kill_primary(
            &dir,
            &["--vcpus", "2", "--payload", "builtin:stencil"],
            &[],
            &args,
            mid_run(u64_to_usize(steps / 5000), &mut rng),
            Duration::ZERO,
            &what,
        );
        assert!(
            t.standby["took_over"] == true,
            "{what}: the kill landed after the guest ended ({:?} after protection): {}",
            t.ran,
            t.standby
        );
        assert_eq!(t.merged.lines().last(), Some(expected.as_str()), "{what}");
        let reports: Vec<&str> = t
            .merged
            .lines()
            .filter(|l| l.starts_with("step "))
            .collect();
        assert_eq!(
            usize_to_u64(reports.len()),
            steps / 5000,
            "{what}: gapless reports"
        );
    }
}

/// A failover in the middle of a long epoch. Epochs last 1 to 4 s (an epoch with output
/// waiting ends once it is a second old: here at the first progress line after that, the
/// stencil printing every few hundred milliseconds), and the primary is killed a seeded
/// 400-800 ms after a line was released, inside the epoch that began with the checkpoint
/// whose acknowledgement released it. The standby resumes from that checkpoint, redoes the
/// work since, and finishes with the exact checksum and every progress line once.
#[test]
fn stencil_survives_a_primary_sigkill_in_the_middle_of_a_long_epoch() {
    let _one = ONE_PAIR.lock().unwrap_or_else(|e| e.into_inner());
    let (steps, report) = (240_000u64, 6000u64);
    let (args, expected) = stencil(steps, report);
    let lines = u64_to_usize(steps / report);
    let mut rng = Rng::seeded(0x10e9_e90c);
    for trial in 0..3 {
        let dir = Scratch::new(&format!("longepoch{trial}"));
        let after = rng.millis(400, 800);
        let what = format!(
            "long epoch {} trial {trial}, {after:?} after a line",
            rng.name()
        );
        let t = kill_primary(
            &dir,
            &[
                "--payload",
                "builtin:stencil",
                "--epoch-min-ms=1000",
                "--epoch-max-ms=4000",
            ],
            &[],
            &args,
            mid_run(lines, &mut rng),
            after,
            &what,
        );
        assert!(t.standby["took_over"] == true, "{what}: {}", t.standby);
        assert_eq!(t.merged.lines().last(), Some(expected.as_str()), "{what}");
        let reports = t.merged.lines().filter(|l| l.starts_with("step ")).count();
        assert_eq!(reports, lines, "{what}: gapless reports");
        // Stats are written every 250 ms: the last before the kill saw an epoch that had run
        // at least some 150 ms, and the standby took over from the checkpoint that began it
        // (or, were that one not yet acknowledged, the one before).
        let running = t.primary["epoch_running_ms"].as_u64().unwrap_or(0);
        assert!(
            running >= 100,
            "{what}: killed {running} ms into an epoch: {}",
            t.primary
        );
        let (sealed, resumed) = (t.primary["epochs"].as_u64(), t.standby["epoch"].as_u64());
        assert!(
            resumed
                .zip(sealed)
                .is_some_and(|(r, s)| r <= s && r + 1 >= s),
            "{what}: took over at epoch {resumed:?}, the primary had sealed {sealed:?}"
        );
        println!("{what}: killed at least {running} ms into an epoch, resumed from {resumed:?}");
    }
}

/// seq, killed at 14 seeded moments: half the trials print steadily (some 50 000 lines a second,
/// 2.8 MiB in all, through the output gate; 64 pages dirtied round-robin), half compute for
/// about a millisecond between lines (most kills land mid-computation, the state in registers).
/// The merged console of the two nodes must be the exact transcript, byte for byte, and every
/// kill must have forced a takeover (it landed while the guest ran).
#[test]
fn seq_survives_primary_sigkill_at_seeded_moments() {
    let _one = ONE_PAIR.lock().unwrap_or_else(|e| e.into_inner());
    let fast = (120_000u64, 64u64, 1_000_000u64);
    let slow = (1_500u64, 1u64, 100_000_000u64);
    let want_fast = common::seq_transcript(fast.0, fast.2);
    let want_slow = common::seq_transcript(slow.0, slow.2);
    let mut rng = Rng::seeded(0x5e9_c0de);
    for trial in 0..14 {
        let ((count, pages, work), want) = if trial % 2 == 0 {
            (fast, &want_fast)
        } else {
            (slow, &want_slow)
        };
        let what = format!("seq {count} {pages} {work} {} trial {trial}", rng.name());
        let dir = Scratch::new(&format!("seqfail{trial}"));
        let args = [count, pages, work].map(|n| n.to_string());
        let t = kill_primary(
            &dir,
            &["--payload", "builtin:seq"],
            &[],
            &args,
            mid_run(u64_to_usize(count), &mut rng),
            Duration::ZERO,
            &what,
        );
        assert!(
            t.standby["took_over"] == true,
            "{what}: the kill landed after the guest ended ({:?} after protection): {}",
            t.ran,
            t.standby
        );
        // Byte for byte: no line lost, repeated, reordered or changed across the takeover.
        if t.merged != *want {
            let at = t
                .merged
                .bytes()
                .zip(want.bytes())
                .position(|(a, b)| a != b)
                .unwrap_or(t.merged.len().min(want.len()));
            panic!(
                "{what}: merged console differs from the transcript at byte {at} \
                 ({} bytes, want {}): {:?}",
                t.merged.len(),
                want.len(),
                &t.merged[at.saturating_sub(40)..(at + 40).min(t.merged.len())]
            );
        }
    }
}

/// The primary killed as its guest ends, once it has released one of the last lines: the
/// final checkpoint (taken after the guest's exit) may be committed, and the Exit message may
/// or may not have left. The standby either hears the exit or takes over a guest that has
/// ended: either way it ends with the guest's code at once (resuming vCPUs past their exit
/// would spin forever), and the merged console is exact.
#[test]
fn primary_killed_as_the_guest_exits_leaves_the_standby_ending_the_same_way() {
    let _one = ONE_PAIR.lock().unwrap_or_else(|e| e.into_inner());
    let steps = 80_000u64;
    let (args, expected) = stencil(steps, 2000);
    let lines = u64_to_usize(steps / 2000) + 1;
    for trial in 0..3 {
        let dir = Scratch::new(&format!("exitkill{trial}"));
        let what = format!("exit trial {trial}");
        let t = kill_primary(
            &dir,
            &["--vcpus", "2", "--payload", "builtin:stencil"],
            &[],
            &args,
            |_| lines - 2 - trial % 2,
            Duration::ZERO,
            &what,
        );
        assert_eq!(t.merged.lines().last(), Some(expected.as_str()), "{what}");
        assert_eq!(t.merged.lines().count(), lines, "{what}: gapless");
    }
}

/// Records in each journal trial: some 20 MB of disk, a few seconds of writing.
const JOURNAL_RECORDS: u64 = 40_000;

/// A sparse zero image big enough for the journal trials.
fn journal_image(path: &std::path::Path) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len((JOURNAL_RECORDS * 512).next_multiple_of(1 << 20) + (1 << 20))
        .unwrap();
}

#[test]
fn journal_on_disk_survives_primary_sigkill_at_seeded_moments() {
    let _one = ONE_PAIR.lock().unwrap_or_else(|e| e.into_inner());
    let batches = u64_to_usize(JOURNAL_RECORDS.div_ceil(16));
    let mut rng = Rng::seeded(0xd15c_0001);
    for trial in 0..4 {
        let dir = Scratch::new(&format!("journal{trial}"));
        let what = format!("journal {} trial {trial}", rng.name());
        let (p_img, s_img) = (dir.path("p.img"), dir.path("s.img"));
        journal_image(&p_img);
        journal_image(&s_img);
        let p_disk = format!("--disk={}", p_img.display());
        let s_disk = format!("--disk={}", s_img.display());
        let t = kill_primary(
            &dir,
            &[&p_disk, "--payload", "builtin:journal"],
            &[&s_disk],
            &[JOURNAL_RECORDS.to_string()],
            mid_run(batches, &mut rng),
            Duration::ZERO,
            &what,
        );
        assert_eq!(t.standby["took_over"], true, "{what}: {}", t.merged);
        // Every batch the guest saw committed, in order, and its end.
        let committed: Vec<u64> = t
            .merged
            .lines()
            .filter_map(|l| l.strip_prefix("committed "))
            .map(|n| n.parse().expect("committed count"))
            .collect();
        let want: Vec<u64> = (1..=JOURNAL_RECORDS / 16)
            .map(|i| i * 16)
            .chain((!JOURNAL_RECORDS.is_multiple_of(16)).then_some(JOURNAL_RECORDS))
            .collect();
        assert!(committed == want, "{what}: committed lines: {}", t.merged);
        assert!(
            t.merged
                .contains(&format!("done {JOURNAL_RECORDS} records in ")),
            "{what}: {}",
            t.merged
        );
        // The standby's disk holds every record, each intact.
        let verify = common::ftvmm(
            &[
                "run",
                &s_disk,
                "--payload",
                "builtin:journal",
                "--",
                "verify",
            ],
            Duration::from_secs(60),
        );
        assert_eq!(
            common::stdout_of(&verify),
            format!("ok {JOURNAL_RECORDS}\n"),
            "{what}: {}",
            common::stderr_of(&verify)
        );
        println!(
            "{what}: took over at epoch {} after {:.1} s",
            t.standby["epoch"],
            t.ran.as_secs_f64()
        );
    }
}

/// A 64 GiB guest that uses a few pages is protected from its start to its end, and neither
/// node holds more than a bounded staging area: the pre-copy passes over memory the guest
/// never touched (the standby's is zero already) and stages the rest a batch at a time, and a
/// standby building a VM that large goes on heartbeating.
#[test]
fn a_64_gib_guest_is_protected_with_bounded_memory_on_both_nodes() {
    let _one = ONE_PAIR.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Scratch::new("big");
    let (s_stats, p_stats) = (dir.path("s.json"), dir.path("p.json"));
    let (p_out, s_out) = (dir.path("p.out"), dir.path("s.out"));
    let addr = format!("127.0.0.1:{}", free_port());
    let mut standby = Node::spawn(&[
        "standby".into(),
        "--listen".into(),
        addr.clone(),
        format!("--console=file:{}", s_out.display()),
        format!("--stats-json={}", s_stats.display()),
    ]);
    let mut primary = Node::spawn(&[
        "primary".into(),
        "--peer".into(),
        addr,
        "--mem=64G".into(),
        format!("--failover-timeout-ms={FAILOVER_TIMEOUT_MS}"),
        format!("--ack-timeout-ms={ACK_TIMEOUT_MS}"),
        format!("--console=file:{}", p_out.display()),
        format!("--stats-json={}", p_stats.display()),
        "--payload=builtin:seq".into(),
        "--".into(),
        "200".into(),
    ]);
    let (status, err) = primary.wait(Duration::from_secs(120));
    assert!(status.success(), "primary: {err}");
    let (status, err) = standby.wait(Duration::from_secs(60));
    assert!(status.success(), "standby: {err}");
    let p = stats(&p_stats);
    assert_eq!(p["protected"], true, "{p}");
    assert!(p["unprotected_at"].is_null(), "{p}");
    assert!(p["acked"].as_u64().unwrap_or(0) >= 1, "{p}");
    let out = std::fs::read_to_string(&p_out).unwrap_or_default();
    assert!(out.ends_with("done\n"), "{out}");
    // Of 16 Mi pages, the pre-copy sent those the guest and its loading wrote.
    let precopy = p["precopy_pages"].as_u64().unwrap_or(u64::MAX);
    assert!(precopy < 4096, "{p}");
    let s = stats(&s_stats);
    for (node, st) in [("primary", &p), ("standby", &s)] {
        let peak = st["peak_rss_mib"].as_f64().unwrap_or(f64::MAX);
        println!("{node}: peak resident memory {peak:.1} MiB for a 64 GiB guest");
        assert!(peak < 256.0, "{node}: {st}");
    }
}
