//! Fault injection end to end, on loopback with the real binary: a node frozen (SIGSTOP) past
//! the failover timeout and woken again, a replication link that corrupts, truncates, stalls
//! or drops an epoch (a proxy between the nodes), a peer of another protocol version, nodes
//! whose configurations differ, and a primary with no standby.

mod common;

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use checkpoint::delta::{self, PageForm};
use checkpoint::wire::{self, Channel, FrameReader, Message, HEADER_LEN, PROTOCOL_VERSION};
use common::*;

/// The replicated-pair tests need about a CPU and a half each; on a small machine two at once
/// starve each other into spurious failovers. The others (handshakes only) run alongside.
static ONE_PAIR: Mutex<()> = Mutex::new(());

fn one_pair() -> MutexGuard<'static, ()> {
    ONE_PAIR.lock().unwrap_or_else(|e| e.into_inner())
}

/// seq arguments for a guest that runs about 2 s once protected here (debug build, 2 CPUs),
/// printing steadily (some 2.8 MiB in all), so that faults land mid-run.
const SEQ: [&str; 3] = ["120000", "64", "1000000"];

/// The same transcript, with 1024 pages dirtied round-robin: epochs of some 2000 pages take a
/// while to send and commit, so that freezes often land while one is unacknowledged.
const FROZEN_SEQ: [&str; 3] = ["120000", "1024", "1000000"];

fn seq_want() -> String {
    seq_transcript(120_000, 1_000_000)
}

/// Failover timeout of the pair tests: generous, so that debug builds on a busy 2-CPU machine
/// never drop a healthy peer; the freezes and stalls below outlast it (or, in
/// `brief_freezes_change_nothing`, last half of it).
const TIMEOUT_MS: u64 = 1000;

const LIMIT: Duration = Duration::from_secs(60);

const GOODBYE_ERROR: &str =
    "ftvmm: error: the primary continues without this standby (it said goodbye)";
const DEPOSED_ERROR: &str =
    "ftvmm: error: the standby took over; this node stopped and released nothing more";

/// The files of one pair.
struct Files {
    p_out: PathBuf,
    s_out: PathBuf,
    p_stats: PathBuf,
    s_stats: PathBuf,
}

impl Files {
    fn new(dir: &Scratch) -> Self {
        Self {
            p_out: dir.path("p.out"),
            s_out: dir.path("s.out"),
            p_stats: dir.path("p.json"),
            s_stats: dir.path("s.json"),
        }
    }
}

fn loopback() -> String {
    format!("127.0.0.1:{}", free_port())
}

fn start_standby(f: &Files, listen: &str, extra: &[&str]) -> Node {
    let mut args: Vec<String> = ["standby", "--listen", listen, "--console"]
        .map(String::from)
        .into();
    args.push(format!("file:{}", f.s_out.display()));
    args.push("--stats-json".into());
    args.push(f.s_stats.display().to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    Node::spawn(&args)
}

fn start_primary(f: &Files, peer: &str, extra: &[&str], payload: &[&str]) -> Node {
    let mut args: Vec<String> = ["primary", "--peer", peer, "--mem", "64M"]
        .map(String::from)
        .into();
    args.extend(["--failover-timeout-ms".into(), TIMEOUT_MS.to_string()]);
    args.push("--console".into());
    args.push(format!("file:{}", f.p_out.display()));
    args.push("--stats-json".into());
    args.push(f.p_stats.display().to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(["--payload", "builtin:seq", "--"].map(String::from));
    args.extend(payload.iter().map(|s| s.to_string()));
    Node::spawn(&args)
}

/// Waits until the primary releases output: a checkpoint was acknowledged, protection runs.
fn wait_protected(primary: &mut Node, f: &Files) {
    let up = wait_for(LIMIT, || file_len(&f.p_out) > 0 || !primary.running());
    assert!(
        up && primary.running(),
        "the primary never got protected: {}",
        primary.stderr()
    );
}

/// Last line of a node's stderr.
fn last_line(err: &str) -> &str {
    err.trim_end().lines().last().unwrap_or("")
}

/// Checks the ending every link fault must have: the primary drops the standby (with a logged
/// reason containing `lost_why`), finishes the guest alone with exit 0 and the exact
/// transcript; the standby, told goodbye, never takes over and exits non-zero.
fn primary_continues_alone(primary: &mut Node, standby: &mut Node, f: &Files, lost_why: &str) {
    let (status, p_err) = primary.wait(LIMIT);
    assert!(status.success(), "primary failed: {p_err}");
    assert!(
        p_err.contains(&format!("standby lost ({lost_why}"))
            && p_err.contains("the guest continues unprotected"),
        "primary did not log losing the standby for {lost_why:?}: {p_err}"
    );
    let p_stats = stats(&f.p_stats);
    assert_eq!(p_stats["protected"], false, "{p_stats}");
    let got = std::fs::read_to_string(&f.p_out).unwrap();
    assert!(got == seq_want(), "primary's console is not the transcript");

    let (status, s_err) = standby.wait(LIMIT);
    assert_eq!(status.code(), Some(EXIT_FTVMM_ERROR), "standby: {s_err}");
    assert_eq!(last_line(&s_err), GOODBYE_ERROR, "standby: {s_err}");
    assert!(!s_err.contains("taking over"), "standby: {s_err}");
    let s_stats = stats(&f.s_stats);
    assert_eq!(s_stats["took_over"], false, "{s_stats}");
    assert!(!f.s_out.exists(), "the standby wrote console output");
}

/// The control case of the faults below: with nothing injected the primary stays protected to
/// the end, neither node logs a warning, and both exit with the guest's exit code (2 is seq's
/// answer to bad arguments).
#[test]
fn a_fault_free_pair_stays_protected_and_exits_with_the_guests_code() {
    let _one = one_pair();
    for (payload, code, want) in [
        (&["20000", "8", "1000"][..], 0, seq_transcript(20_000, 1000)),
        (
            &["ten"][..],
            2,
            "seq: COUNT must be a number; usage: seq COUNT [PAGES] [WORK]\n".into(),
        ),
    ] {
        let dir = Scratch::new("fault-free");
        let f = Files::new(&dir);
        let addr = loopback();
        let mut standby = start_standby(&f, &addr, &[]);
        let mut primary = start_primary(&f, &addr, &[], payload);
        let (p_status, p_err) = primary.wait(LIMIT);
        let (s_status, s_err) = standby.wait(LIMIT);
        assert_eq!(p_status.code(), Some(code), "{payload:?}: primary: {p_err}");
        assert_eq!(s_status.code(), Some(code), "{payload:?}: standby: {s_err}");
        assert_eq!((p_err.as_str(), s_err.as_str()), ("", ""), "{payload:?}");
        let p_stats = stats(&f.p_stats);
        assert_eq!(p_stats["protected"], true, "{p_stats}");
        assert!(p_stats["epochs"].as_u64().unwrap() > 0, "{p_stats}");
        let s_stats = stats(&f.s_stats);
        assert_eq!(s_stats["took_over"], false, "{s_stats}");
        assert!(
            std::fs::read_to_string(&f.p_out).unwrap() == want,
            "{payload:?}"
        );
        assert!(!f.s_out.exists(), "the standby wrote console output");
    }
}

/// A primary frozen past the failover timeout is replaced by the standby, which finishes the
/// guest exactly. Woken while the standby runs the guest, the old primary learns it was deposed
/// and exits non-zero without releasing one more byte. Frozen at seeded moments, so that some
/// freezes land while an epoch is on its way or waiting for its acknowledgement (without the
/// primary's read-all-that-arrived check, about one trial in four released that epoch's
/// output on waking). FTVMM_FREEZE_TRIALS sets the number of trials (default 6).
#[test]
fn frozen_primary_is_deposed_and_releases_nothing_when_it_wakes() {
    let _one = one_pair();
    let trials: u64 = std::env::var("FTVMM_FREEZE_TRIALS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(6);
    let mut rng = Rng::seeded(0xf2ee_2e5e);
    for trial in 0..trials {
        let delay = rng.millis(100, 700);
        frozen_primary(&format!("{} trial {trial} ({delay:?})", rng.name()), delay);
    }
}

fn frozen_primary(what: &str, delay: Duration) {
    let dir = Scratch::new("frozen-primary");
    let f = Files::new(&dir);
    let addr = loopback();
    let mut standby = start_standby(&f, &addr, &[]);
    let mut primary = start_primary(&f, &addr, &[], &FROZEN_SEQ);
    wait_protected(&mut primary, &f);
    std::thread::sleep(delay);

    assert!(
        !standby.stderr().contains("taking over"),
        "{what}: took over too early"
    );
    freeze(primary.pid());
    let frozen_len = file_len(&f.p_out);
    assert!(
        standby.wait_stderr("taking over", LIMIT),
        "{what}: standby did not take over: {}\nprimary: {}",
        standby.stderr(),
        primary.stderr()
    );
    // The standby tells the primary it took over before it resumes the guest and opens its
    // console file: once the file exists, the old primary has the news queued.
    assert!(
        wait_for(LIMIT, || f.s_out.exists()),
        "{what}: standby never resumed"
    );
    assert!(
        standby.running(),
        "{what}: the standby finished before the old primary woke: nothing was tested"
    );
    signal(primary.pid(), libc::SIGCONT);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        file_len(&f.p_out),
        frozen_len,
        "{what}: the woken primary released output after the standby took over: {}",
        primary.stderr()
    );

    let (status, p_err) = primary.wait(Duration::from_secs(10));
    assert_eq!(
        status.code(),
        Some(EXIT_FTVMM_ERROR),
        "{what}: primary: {p_err}"
    );
    assert_eq!(last_line(&p_err), DEPOSED_ERROR, "{what}: primary: {p_err}");
    assert!(
        p_err.contains("the standby has taken over; this node stops and releases nothing more"),
        "{what}: primary did not hear TakenOver: {p_err}"
    );
    assert_eq!(
        file_len(&f.p_out),
        frozen_len,
        "{what}: released output on its way out"
    );
    assert_eq!(stats(&f.p_stats)["outcome"], "Deposed", "{what}");

    let (status, s_err) = standby.wait(LIMIT);
    assert!(status.success(), "{what}: standby: {s_err}");
    let s_stats = stats(&f.s_stats);
    assert_eq!(s_stats["took_over"], true, "{what}: {s_stats}");
    assert!(
        s_stats["reason"].as_str().unwrap().contains("silent for"),
        "{what}: {s_stats}"
    );
    // From the primary's last word to the decision: the whole timeout, not less.
    let detection = s_stats["detection_ms"].as_f64().unwrap();
    assert!(detection >= TIMEOUT_MS as f64, "{what}: {s_stats}");
    let p = std::fs::read(&f.p_out).unwrap();
    let s = std::fs::read(&f.s_out).unwrap();
    assert!(
        merge(&p, &s) == seq_want().as_bytes(),
        "{what}: merged console is not the transcript"
    );
}

/// A standby frozen past the failover timeout is given up: the primary says goodbye and finishes
/// the guest alone, releasing everything. The goodbye waits in the frozen standby's socket;
/// woken after the primary has gone, the standby reads it before it could judge the closed
/// link or its own frozen time as the primary's death, and exits without taking over.
#[test]
fn frozen_standby_is_dropped_and_never_takes_over() {
    let _one = one_pair();
    let dir = Scratch::new("frozen-standby");
    let f = Files::new(&dir);
    let addr = loopback();
    let mut standby = start_standby(&f, &addr, &[]);
    let mut primary = start_primary(&f, &addr, &[], &SEQ);
    wait_protected(&mut primary, &f);
    std::thread::sleep(Duration::from_millis(300));

    assert!(standby.running(), "standby: {}", standby.stderr());
    freeze(standby.pid());
    let (status, p_err) = primary.wait(LIMIT);
    assert!(status.success(), "primary: {p_err}");
    assert!(
        p_err.contains("standby lost (silent for") && p_err.contains("continues unprotected"),
        "{p_err}"
    );
    let p_stats = stats(&f.p_stats);
    assert_eq!(p_stats["protected"], false, "{p_stats}");
    assert!(std::fs::read_to_string(&f.p_out).unwrap() == seq_want());
    assert!(standby.running(), "the frozen standby exited");

    signal(standby.pid(), libc::SIGCONT);
    let (status, s_err) = standby.wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(EXIT_FTVMM_ERROR), "standby: {s_err}");
    assert_eq!(last_line(&s_err), GOODBYE_ERROR, "standby: {s_err}");
    assert!(!s_err.contains("taking over"), "standby: {s_err}");
    assert_eq!(stats(&f.s_stats)["took_over"], false);
    assert!(!f.s_out.exists(), "the standby wrote console output");
}

/// Freezes shorter than the failover timeout change nothing: the standby, then the primary,
/// stopped for half the timeout, each catch up on what arrived meanwhile (the woken primary
/// reads all of it before acting and releases what was acknowledged), nobody is dropped or
/// deposed (a frozen standby is at most slow), and the run ends protected with the exact
/// transcript.
#[test]
fn brief_freezes_change_nothing() {
    let _one = one_pair();
    let dir = Scratch::new("brief-freezes");
    let f = Files::new(&dir);
    let addr = loopback();
    let mut standby = start_standby(&f, &addr, &[]);
    let mut primary = start_primary(&f, &addr, &[], &FROZEN_SEQ);
    wait_protected(&mut primary, &f);
    for pid in [standby.pid(), primary.pid()] {
        std::thread::sleep(Duration::from_millis(200));
        freeze(pid);
        std::thread::sleep(Duration::from_millis(TIMEOUT_MS / 2));
        signal(pid, libc::SIGCONT);
    }
    let (p_status, p_err) = primary.wait(LIMIT);
    let (s_status, s_err) = standby.wait(LIMIT);
    assert!(p_status.success(), "primary: {p_err}");
    assert!(s_status.success(), "standby: {s_err}");
    // The primary may find its standby slow while either is frozen (a warning); nothing
    // else is logged: nobody is lost, deposed or taking over.
    let unexpected: Vec<&str> = p_err
        .lines()
        .chain(s_err.lines())
        .filter(|l| !l.contains("standby slow"))
        .collect();
    assert!(unexpected.is_empty(), "{unexpected:#?}");
    assert_eq!(stats(&f.p_stats)["protected"], true);
    assert_eq!(stats(&f.s_stats)["took_over"], false);
    assert!(std::fs::read_to_string(&f.p_out).unwrap() == seq_want());
}

/// What the proxy does to the data connection at the first frame after `after` epochs.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// Flips the last byte of that frame's payload, then forwards the rest faithfully.
    Corrupt,
    /// Forwards half of that frame, then closes the data connection both ways.
    Truncate,
    /// Forwards half of that frame, then nothing more; the connection stays open.
    Stall,
    /// Drops every frame of that epoch, its EpochEnd included, and forwards the rest.
    DropEpoch,
    /// Replaces that epoch's VM state with bytes that do not decode, and its EpochEnd with one
    /// that matches: every frame checks out, the state does not.
    BadState,
}

const EPOCH_END: u8 = 6;
const PAGES: u8 = 4;
const PAGE_DELTAS: u8 = 22;

/// A TCP forwarder on loopback between primary and standby that injects one `Fault` into the
/// data connection (told apart from the control connection by its Hello's channel).
struct Proxy {
    addr: String,
    /// Epoch of the frame the fault hit, once it did.
    hit: Arc<Mutex<Option<u64>>>,
    /// Connections kept open (a stalled one) for as long as the proxy lives.
    held: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(target: &str, fault: Fault, after: u64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let hit = Arc::new(Mutex::new(None));
        let held = Arc::new(Mutex::new(Vec::new()));
        let (target, h, k) = (target.to_string(), hit.clone(), held.clone());
        // Detached: these threads end with their connections (or with the test process).
        std::thread::spawn(move || {
            for primary in listener.incoming().map_while(Result::ok) {
                let (target, h, k) = (target.clone(), h.clone(), k.clone());
                std::thread::spawn(move || relay(primary, &target, fault, after, &h, &k));
            }
        });
        Self { addr, hit, held }
    }

    fn hit(&self) -> Option<u64> {
        *self.hit.lock().unwrap()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for s in self.held.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// The pages the standby holds, from the Pages and PageDeltas frames relayed to it (a page
/// never sent is zero, as a fresh standby's memory is).
#[derive(Default)]
struct Mirror(std::collections::HashMap<u64, Vec<u8>>);

impl Mirror {
    /// Takes in a batch of pages, resolving its deltas; returns its addresses and pages.
    fn pages(&mut self, msg: Message) -> (Vec<u64>, Vec<u8>) {
        let (gpas, forms, mut data) = match msg {
            Message::Pages { gpas, data, .. } => (gpas, vec![], data),
            Message::PageDeltas {
                gpas, forms, data, ..
            } => (gpas, forms, data),
            other => panic!("not pages: {other:?}"),
        };
        let page_size = wire::PAGE_SIZE;
        for (i, (gpa, body)) in gpas
            .iter()
            .zip(data.chunks_exact_mut(page_size))
            .enumerate()
        {
            let held = self.0.entry(*gpa).or_insert_with(|| vec![0; page_size]);
            if forms.get(i) == Some(&PageForm::Delta) {
                let mut plain = vec![0; page_size];
                delta::decode_delta(held, body, &mut plain);
                body.copy_from_slice(&plain);
            }
            held.copy_from_slice(body);
        }
        (gpas, data)
    }
}

/// One whole frame, or None at a clean end of stream.
fn read_frame(r: &mut impl Read) -> io::Result<Option<Vec<u8>>> {
    let mut frame = vec![0u8; HEADER_LEN];
    match r.read_exact(&mut frame) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize;
    frame.resize(HEADER_LEN + len, 0);
    r.read_exact(&mut frame[HEADER_LEN..])?;
    Ok(Some(frame))
}

fn relay(
    primary: TcpStream,
    target: &str,
    fault: Fault,
    after: u64,
    hit: &Mutex<Option<u64>>,
    held: &Mutex<Vec<TcpStream>>,
) -> io::Result<()> {
    let standby = TcpStream::connect(target)?;
    let mut from_primary = primary.try_clone()?;
    let Some(hello) = read_frame(&mut from_primary)? else {
        return Ok(());
    };
    // Hello payload: version (u32), then the channel (0 = data).
    let data = hello.get(HEADER_LEN + 4) == Some(&0);
    (&standby).write_all(&hello)?;
    {
        let (mut from, mut to) = (standby.try_clone()?, primary.try_clone()?);
        std::thread::spawn(move || {
            let _ = io::copy(&mut from, &mut to);
            let _ = to.shutdown(Shutdown::Write);
        });
    }
    if !data {
        io::copy(&mut from_primary, &mut &standby)?;
        return standby.shutdown(Shutdown::Write);
    }
    let mut ends = 0u64;
    let mut fired = false;
    let mut digest = wire::EpochDigest::new();
    // The pages as the standby holds them, to digest the pages of deltas by.
    let mut mirror = Mirror::default();
    while let Some(mut frame) = read_frame(&mut from_primary)? {
        let kind = frame[4];
        if fault == Fault::BadState && ends < after && [PAGES, PAGE_DELTAS].contains(&kind) {
            let msg = FrameReader::new(&frame[..])
                .read_message()
                .expect("a frame from the primary");
            mirror.pages(msg);
        }
        if fault == Fault::BadState && ends == after {
            let msg = FrameReader::new(&frame[..])
                .read_message()
                .expect("a frame from the primary");
            let msg = match msg {
                Message::Pages { epoch, gpas, data } => {
                    digest.add_pages(&gpas, &data);
                    Message::Pages { epoch, gpas, data }
                }
                deltas @ Message::PageDeltas { .. } => {
                    let (gpas, data) = mirror.pages(deltas.clone());
                    digest.add_pages(&gpas, &data);
                    deltas
                }
                Message::Disk { epoch, bytes } => {
                    digest.add_state(&bytes);
                    Message::Disk { epoch, bytes }
                }
                Message::State { epoch, bytes } => {
                    hit.lock().unwrap().get_or_insert(epoch);
                    let garbage = vec![0xff; bytes.len()];
                    digest.add_state(&garbage);
                    Message::State {
                        epoch,
                        bytes: garbage,
                    }
                }
                Message::EpochEnd { epoch, .. } => {
                    ends += 1;
                    digest.end(epoch)
                }
                other => other,
            };
            (&standby).write_all(&wire::encode(&msg))?;
            continue;
        }
        if ends == after && !(fired && fault == Fault::Corrupt) {
            // Pages, State and EpochEnd payloads all start with their epoch.
            let epoch = u64::from_le_bytes(frame[HEADER_LEN..HEADER_LEN + 8].try_into().unwrap());
            hit.lock().unwrap().get_or_insert(epoch);
            fired = true;
            let half = HEADER_LEN + (frame.len() - HEADER_LEN) / 2;
            match fault {
                Fault::Corrupt => *frame.last_mut().unwrap() ^= 0x5a,
                Fault::Truncate => {
                    (&standby).write_all(&frame[..half])?;
                    let _ = standby.shutdown(Shutdown::Both);
                    return primary.shutdown(Shutdown::Both);
                }
                Fault::Stall => {
                    (&standby).write_all(&frame[..half])?;
                    held.lock().unwrap().push(standby);
                    // Keep taking the primary's bytes, as a stalled network path would.
                    io::copy(&mut from_primary, &mut io::sink())?;
                    return Ok(());
                }
                Fault::DropEpoch => {
                    if kind == EPOCH_END {
                        ends += 1;
                    }
                    continue;
                }
                // Handled whole above.
                Fault::BadState => {}
            }
        }
        if kind == EPOCH_END {
            ends += 1;
        }
        (&standby).write_all(&frame)?;
    }
    standby.shutdown(Shutdown::Write)
}

/// Runs the pair through a proxy injecting `fault` after 5 epochs; returns the epoch hit and
/// the standby's stderr.
fn link_fault(fault: Fault, lost_why: &str) -> (u64, String) {
    let _one = one_pair();
    let dir = Scratch::new(&format!("{fault:?}"));
    let f = Files::new(&dir);
    let addr = loopback();
    let mut standby = start_standby(&f, &addr, &[]);
    let proxy = Proxy::start(&addr, fault, 5);
    let mut primary = start_primary(&f, &proxy.addr, &[], &SEQ);
    primary_continues_alone(&mut primary, &mut standby, &f, lost_why);
    let epoch = proxy.hit().expect("the fault never fired");
    // Epochs are numbered from 1: the fault hits the sixth.
    assert_eq!(epoch, 6, "{fault:?}");
    (epoch, standby.stderr())
}

/// A rejected epoch is logged with its reason, and the standby keeps the epoch before it.
fn assert_rejected(s_err: &str, epoch: u64, reason: &str) {
    let line = s_err
        .lines()
        .find(|l| l.contains("rejecting epoch"))
        .unwrap_or_else(|| panic!("no rejection logged: {s_err}"));
    assert!(
        line.contains(&format!("rejecting epoch {epoch}: {reason}"))
            && line.ends_with(&format!("staying on committed epoch {}", epoch - 1)),
        "{line}"
    );
}

#[test]
fn corrupt_epoch_is_rejected_and_the_primary_continues_alone() {
    let (epoch, s_err) = link_fault(Fault::Corrupt, "it refused an epoch: epoch ");
    assert_rejected(&s_err, epoch, "frame checksum mismatch");
}

#[test]
fn truncated_epoch_is_rejected_and_the_primary_continues_alone() {
    let (epoch, s_err) = link_fault(Fault::Truncate, "it refused an epoch: epoch ");
    assert_rejected(&s_err, epoch, "connection closed inside a frame");
}

#[test]
fn out_of_order_epoch_is_rejected_and_the_primary_continues_alone() {
    let (epoch, s_err) = link_fault(Fault::DropEpoch, "it refused an epoch: epoch ");
    assert_rejected(
        &s_err,
        epoch,
        &format!("out of order: got a frame of epoch {}", epoch + 1),
    );
}

/// An epoch whose every frame checks out but whose VM state does not decode is refused when it
/// would commit, before it is acknowledged: the standby stays on the epoch before.
#[test]
fn a_state_the_standby_cannot_decode_is_refused() {
    let (epoch, s_err) = link_fault(Fault::BadState, "it refused an epoch: epoch ");
    assert_rejected(&s_err, epoch, "cannot decode the VM state");
}

#[test]
fn stalled_epoch_is_given_up_and_the_primary_continues_alone() {
    // Half an epoch arrives and nothing more: the standby cannot acknowledge it, the primary
    // gives it up after the timeout.
    link_fault(
        Fault::Stall,
        "no acknowledgement within the acknowledgement timeout of 3000 ms",
    );
}

/// Reads one message from `stream` within `limit`.
fn read_reply(stream: &TcpStream, limit: Duration) -> Message {
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut reader = FrameReader::new(stream);
    let start = Instant::now();
    loop {
        match reader.read_message() {
            Err(e) if e.is_idle() && start.elapsed() < limit => continue,
            other => return other.expect("a reply"),
        }
    }
}

/// Connects to `addr`, retrying while the server starts.
fn connect(addr: &str) -> TcpStream {
    let start = Instant::now();
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => return s,
            Err(e) => {
                assert!(start.elapsed() < LIMIT, "cannot connect to {addr}: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

#[test]
fn standby_refuses_a_primary_of_another_protocol_version() {
    let dir = Scratch::new("version-standby");
    let f = Files::new(&dir);
    let addr = loopback();
    let mut standby = start_standby(&f, &addr, &[]);
    let stream = connect(&addr);
    let theirs = PROTOCOL_VERSION + 1;
    let hello = Message::Hello {
        version: theirs,
        channel: Channel::Data,
        session: 1,
        config: b"{}".to_vec(),
    };
    (&stream).write_all(&wire::encode(&hello)).unwrap();
    let reason = format!(
        "protocol version mismatch: this node speaks {PROTOCOL_VERSION}, the peer speaks {theirs}"
    );
    assert_eq!(
        read_reply(&stream, LIMIT),
        Message::Refuse {
            reason: reason.clone()
        }
    );
    let (status, err) = standby.wait(LIMIT);
    assert_eq!(status.code(), Some(EXIT_FTVMM_ERROR), "{err}");
    assert_eq!(
        err.trim_end(),
        format!("ftvmm: error: refused the primary: {reason}")
    );
    assert!(!f.s_out.exists());
}

/// A fake standby on `addr` that reads the primary's Hello (which must be of this version, on
/// the data connection) and answers `reply`.
fn fake_standby(listener: TcpListener, reply: Message) -> std::thread::JoinHandle<Message> {
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let hello = read_reply(&stream, LIMIT);
        (&stream).write_all(&wire::encode(&reply)).unwrap();
        // Keep the connection until the primary has read the reply and hung up.
        stream.set_read_timeout(Some(LIMIT)).unwrap();
        let _ = (&stream).read(&mut [0u8; 1]);
        hello
    })
}

#[test]
fn primary_refuses_a_standby_of_another_protocol_version() {
    let theirs = PROTOCOL_VERSION + 1;
    let cases = [
        // A standby of another version names both versions in its refusal...
        (
            Message::Refuse {
                reason: format!(
                    "protocol version mismatch: this node speaks {theirs}, the peer speaks {PROTOCOL_VERSION}"
                ),
            },
            format!(
                "the standby refused this primary: protocol version mismatch: this node speaks \
                 {theirs}, the peer speaks {PROTOCOL_VERSION}"
            ),
        ),
        // ...or answers with its own Hello, whose version this primary names.
        (
            Message::Hello {
                version: theirs,
                channel: Channel::Data,
                session: 2,
                config: Vec::new(),
            },
            format!(
                "protocol version mismatch: this node speaks {PROTOCOL_VERSION}, the peer \
                 speaks {theirs}"
            ),
        ),
    ];
    for (reply, error) in cases {
        // --allow-unprotected covers an absent standby, not one that answers and refuses.
        for extra in [&[][..], &["--allow-unprotected"][..]] {
            let dir = Scratch::new("version-primary");
            let f = Files::new(&dir);
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let fake = fake_standby(listener, reply.clone());
            let mut primary = start_primary(&f, &addr, extra, &["10"]);
            let (status, err) = primary.wait(LIMIT);
            let hello = fake.join().unwrap();
            assert!(
                matches!(
                    hello,
                    Message::Hello {
                        version: PROTOCOL_VERSION,
                        channel: Channel::Data,
                        ..
                    }
                ),
                "{hello:?}"
            );
            assert_eq!(status.code(), Some(EXIT_FTVMM_ERROR), "{extra:?}: {err}");
            assert_eq!(err.trim_end().lines().count(), 1, "{extra:?}: {err}");
            assert!(
                err.starts_with("ftvmm: error: ") && err.trim_end().ends_with(&error),
                "{extra:?}: {err}"
            );
            assert_eq!(file_len(&f.p_out), 0, "the refused primary released output");
        }
    }
}

/// A sparse disk image of `size` bytes.
fn disk(dir: &Scratch, name: &str, size: u64) -> String {
    let path = dir.path(name);
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    path.display().to_string()
}

/// Runs a standby and a primary with these extra flags; both must fail with one error line,
/// the standby's `refused the primary: {reason}`, the primary's `the standby refused this
/// primary: {reason}`.
fn config_mismatch(dir: &Scratch, standby_extra: &[&str], primary_extra: &[&str], reason: &str) {
    let f = Files::new(dir);
    let addr = loopback();
    let mut standby = start_standby(&f, &addr, standby_extra);
    let mut primary = start_primary(&f, &addr, primary_extra, &["10"]);
    let (p_status, p_err) = primary.wait(LIMIT);
    let (s_status, s_err) = standby.wait(LIMIT);
    for (who, status, err, want) in [
        (
            "primary",
            p_status,
            &p_err,
            "the standby refused this primary",
        ),
        ("standby", s_status, &s_err, "refused the primary"),
    ] {
        assert_eq!(status.code(), Some(EXIT_FTVMM_ERROR), "{who}: {err}");
        assert_eq!(
            err.trim_end(),
            format!("ftvmm: error: {want}: {reason}"),
            "{who}"
        );
    }
    assert_eq!(file_len(&f.p_out), 0, "the refused primary released output");
}

#[test]
fn disks_of_different_sizes_fail_both_nodes() {
    let dir = Scratch::new("disk-size");
    let p = disk(&dir, "p.img", 2 << 20);
    let s = disk(&dir, "s.img", 1 << 20);
    config_mismatch(
        &dir,
        &["--disk", &s],
        &["--disk", &p],
        "disk size differs: the primary's disk has 2097152 bytes, the standby's 1048576",
    );
}

#[test]
fn a_disk_on_one_node_only_fails_both_nodes() {
    let dir = Scratch::new("disk-one");
    let img = disk(&dir, "d.img", 1 << 20);
    config_mismatch(
        &dir,
        &[],
        &["--disk", &img],
        "the primary has a disk and the standby has none",
    );
    config_mismatch(
        &dir,
        &["--disk", &img],
        &[],
        "the standby has a disk and the primary has none",
    );
}

/// With no standby listening, a primary fails after its connect timeout with one clear line;
/// with --allow-unprotected it runs the guest alone to the end.
#[test]
fn no_standby_fails_unless_unprotected_is_allowed() {
    let dir = Scratch::new("no-standby");
    let f = Files::new(&dir);
    let addr = loopback();
    let start = Instant::now();
    let out = ftvmm(
        &[
            "primary",
            "--peer",
            &addr,
            "--connect-timeout-ms",
            "300",
            "--payload",
            "builtin:seq",
            "--",
            "10",
        ],
        LIMIT,
    );
    let err = one_error_line(&out);
    assert!(
        err.starts_with(&format!(
            "ftvmm: error: no standby answered at {addr} within "
        )),
        "{err}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );

    let mut primary = start_primary(
        &f,
        &addr,
        &["--connect-timeout-ms", "300", "--allow-unprotected"],
        &["2000", "8", "3"],
    );
    let (status, err) = primary.wait(LIMIT);
    assert!(status.success(), "{err}");
    assert!(
        err.contains(&format!("no standby answered at {addr}"))
            && err.contains("running unprotected (--allow-unprotected)"),
        "{err}"
    );
    assert!(std::fs::read_to_string(&f.p_out).unwrap() == seq_transcript(2000, 3));
}

/// A small tmpfs mounted on a directory for one test, unmounted when dropped (even when the
/// test fails).
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(dir: PathBuf, size: &str) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "cannot mount a tmpfs on {}",
            dir.display()
        );
        Self(dir)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Which node's image of a [`JournalPair`] sits on a 1 MiB tmpfs, which fills up long before
/// the journal ends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FullDisk {
    Primary,
    Standby,
    Neither,
}

/// A pair running `builtin:journal -- RECORDS` (512 bytes a record) on 16 MiB sparse images.
struct JournalPair {
    f: Files,
    p_disk: String,
    s_disk: String,
    primary: Node,
    standby: Node,
    _full: Option<SmallFs>,
    _dir: Scratch,
}

impl JournalPair {
    /// 16000 records (8 MB) with one node's disk full.
    fn start(tag: &str, full_primary: bool) -> Self {
        let full = if full_primary {
            FullDisk::Primary
        } else {
            FullDisk::Standby
        };
        Self::start_with(tag, full, &[], &[], 16_000)
    }

    fn start_with(
        tag: &str,
        full: FullDisk,
        standby_extra: &[&str],
        primary_extra: &[&str],
        records: u32,
    ) -> Self {
        let dir = Scratch::new(tag);
        let f = Files::new(&dir);
        let small = (full != FullDisk::Neither).then(|| SmallFs::mount(dir.path("small"), "1m"));
        let image = |name: &str, on_full: bool| {
            let path = match &small {
                Some(small) if on_full => small.0.join(name),
                _ => dir.path(name),
            };
            std::fs::File::create(&path)
                .unwrap()
                .set_len(16 << 20)
                .unwrap();
            format!("--disk={}", path.display())
        };
        let (p_disk, s_disk) = (
            image("p.img", full == FullDisk::Primary),
            image("s.img", full == FullDisk::Standby),
        );
        let addr = loopback();
        let standby_args: Vec<&str> = [s_disk.as_str()]
            .into_iter()
            .chain(standby_extra.iter().copied())
            .collect();
        let standby = start_standby(&f, &addr, &standby_args);
        let console = format!("--console=file:{}", f.p_out.display());
        let stats_json = format!("--stats-json={}", f.p_stats.display());
        let records = records.to_string();
        let mut args = vec![
            "primary",
            "--peer",
            &addr,
            "--mem=64M",
            &p_disk,
            &console,
            &stats_json,
        ];
        args.extend(primary_extra);
        args.extend(["--payload=builtin:journal", "--", &records]);
        let primary = Node::spawn(&args);
        Self {
            f,
            p_disk,
            s_disk,
            primary,
            standby,
            _full: small,
            _dir: dir,
        }
    }

    /// What `verify` prints for the image of `disk` (a `--disk=` flag).
    fn verify(disk: &str) -> String {
        let out = ftvmm(
            &["run", disk, "--payload=builtin:journal", "--", "verify"],
            LIMIT,
        );
        stdout_of(&out)
    }
}

#[test]
fn a_full_standby_disk_drops_protection_and_the_guest_finishes_on_the_primary() {
    let _one = one_pair();
    let mut pair = JournalPair::start("diskfull", false);
    let (status, p_err) = pair.primary.wait(LIMIT);
    assert!(status.success(), "primary failed: {p_err}");
    let lost = p_err
        .lines()
        .find(|l| l.contains("standby lost"))
        .unwrap_or_else(|| panic!("the primary kept its full standby: {p_err}"));
    assert!(
        lost.contains("standby disk: standby disk write at ")
            && lost.contains("No space left on device")
            && lost.ends_with("the guest continues unprotected"),
        "{lost}"
    );
    println!("{lost}");
    assert_eq!(stats(&pair.f.p_stats)["protected"], false);
    let out = std::fs::read_to_string(&pair.f.p_out).unwrap();
    assert!(out.contains("done 16000 records in "), "{out}");
    // Nothing was lost or corrupted on the node that runs the guest.
    assert_eq!(JournalPair::verify(&pair.p_disk), "ok 16000\n");

    let (status, s_err) = pair.standby.wait(LIMIT);
    assert_eq!(status.code(), Some(EXIT_FTVMM_ERROR), "standby: {s_err}");
    assert!(
        s_err.contains("No space left on device") && !s_err.contains("taking over"),
        "standby: {s_err}"
    );
}

#[test]
fn a_full_primary_disk_is_an_io_error_for_the_guest_and_the_standby_follows_it() {
    let _one = one_pair();
    let mut pair = JournalPair::start("primaryfull", true);
    // The guest sees the failed write as an I/O error and exits with journal's code for it
    // (3); both nodes end with it, the pair still protected.
    let (status, p_err) = pair.primary.wait(LIMIT);
    let out = std::fs::read_to_string(&pair.f.p_out).unwrap();
    assert_eq!(status.code(), Some(3), "primary: {p_err}\n{out}");
    let failed = out
        .lines()
        .find(|l| l.starts_with("journal: write failed at record "))
        .unwrap_or_else(|| panic!("no I/O error reached the guest: {out}"));
    println!("{failed}");
    let (status, s_err) = pair.standby.wait(LIMIT);
    assert_eq!(status.code(), Some(3), "standby: {s_err}");
    // Every batch the guest saw committed is on the standby's disk.
    let last_committed: u64 = out
        .lines()
        .filter_map(|l| l.strip_prefix("committed "))
        .map(|n| n.parse().unwrap())
        .max()
        .unwrap_or(0);
    let verified = JournalPair::verify(&pair.s_disk);
    let on_disk: u64 = verified
        .trim()
        .strip_prefix("ok ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("standby image: {verified}"));
    assert!(
        on_disk >= last_committed && last_committed > 0,
        "committed {last_committed}, the standby holds {on_disk}"
    );
}

/// The journal's console lines: every `committed {n}` of a run of `records` in batches of 16,
/// in order, then its `done` line (whose time varies).
fn assert_journal_transcript(out: &str, records: u64) {
    let mut lines = out.lines();
    for n in (16..=records).step_by(16) {
        assert_eq!(
            lines.next(),
            Some(format!("committed {n}").as_str()),
            "{out}"
        );
    }
    let done = lines.next().unwrap_or_default();
    assert!(
        done.starts_with(&format!("done {records} records in ")),
        "{done}"
    );
    assert_eq!(lines.next(), None, "{out}");
}

/// Runs 16000 journal records on a pair whose standby's fdatasync takes `fsync_delay_ms`
/// longer, with a 200 ms failover timeout and `ack_timeout_ms`; returns the pair once the
/// primary has ended (successfully) with the primary's stderr.
fn slow_standby(tag: &str, fsync_delay_ms: u64, ack_timeout_ms: u64) -> (JournalPair, String) {
    let mut pair = JournalPair::start_with(
        tag,
        FullDisk::Neither,
        &[&format!("--test-fsync-delay-ms={fsync_delay_ms}")],
        &[
            "--failover-timeout-ms=200",
            &format!("--ack-timeout-ms={ack_timeout_ms}"),
        ],
        16_000,
    );
    let (status, p_err) = pair.primary.wait(LIMIT);
    assert!(status.success(), "primary failed: {p_err}");
    (pair, p_err)
}

/// A standby whose disk takes 3.5 failover timeouts to make each epoch durable, while its
/// heartbeats flow, is slow, not dead: the primary holds output (and, at the bound, the
/// guest) and stays protected to the end; both images hold the whole journal.
#[test]
fn a_slow_standby_disk_holds_output_and_the_pair_stays_protected() {
    let _one = one_pair();
    let (mut pair, p_err) = slow_standby("slowdisk", 700, 20_000);
    assert!(!p_err.contains("standby lost"), "{p_err}");
    let slow = p_err
        .lines()
        .find(|l| l.contains("standby slow"))
        .unwrap_or_else(|| panic!("the primary never found its standby slow: {p_err}"));
    println!("{slow}");
    let p_stats = stats(&pair.f.p_stats);
    println!("{p_stats}");
    assert_eq!(p_stats["protected"], true, "{p_stats}");
    assert_eq!(p_stats["standby"], "ok", "{p_stats}");
    assert!(p_stats["slow_episodes"].as_u64() >= Some(1), "{p_stats}");
    let (status, s_err) = pair.standby.wait(LIMIT);
    assert_eq!(status.code(), Some(0), "standby: {s_err}");
    let out = std::fs::read_to_string(&pair.f.p_out).unwrap();
    assert_journal_transcript(&out, 16_000);
    assert_eq!(JournalPair::verify(&pair.p_disk), "ok 16000\n");
    assert_eq!(JournalPair::verify(&pair.s_disk), "ok 16000\n");
}

/// A standby slower than the acknowledgement timeout is dropped with that reason, although
/// its heartbeats arrive; the guest finishes on the primary with its journal intact.
#[test]
fn a_standby_slower_than_the_ack_timeout_is_dropped_with_that_reason() {
    let _one = one_pair();
    let (mut pair, p_err) = slow_standby("slowerdisk", 4000, 1000);
    let lost = p_err
        .lines()
        .find(|l| l.contains("standby lost"))
        .unwrap_or_else(|| panic!("the primary kept its standby: {p_err}"));
    println!("{lost}");
    assert!(
        lost.contains("standby lost (no acknowledgement within the acknowledgement timeout of 1000 ms: epoch ")
            && lost.ends_with("the guest continues unprotected"),
        "{lost}"
    );
    assert!(p_err.contains("standby slow"), "{p_err}");
    let p_stats = stats(&pair.f.p_stats);
    assert_eq!(p_stats["protected"], false, "{p_stats}");
    assert_eq!(p_stats["standby"], "standby lost", "{p_stats}");
    let reason = p_stats["lost_reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("no acknowledgement within the acknowledgement timeout"),
        "{p_stats}"
    );
    let out = std::fs::read_to_string(&pair.f.p_out).unwrap();
    assert_journal_transcript(&out, 16_000);
    assert_eq!(JournalPair::verify(&pair.p_disk), "ok 16000\n");
    let (status, s_err) = pair.standby.wait(LIMIT);
    assert_eq!(status.code(), Some(EXIT_FTVMM_ERROR), "standby: {s_err}");
    assert_eq!(last_line(&s_err), GOODBYE_ERROR, "standby: {s_err}");
}
