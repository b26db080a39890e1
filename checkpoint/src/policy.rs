//! Where the primary ends an epoch and when it makes the guest wait: the one place where the
//! epoch loop decides, a pure function of what it observes, so that it is tested without KVM.
//!
//! An epoch costs the guest a pause and, under dirty tracking, a write fault on every page it
//! dirties again afterwards (3-10 us each on this project's PVM hosts); it buys output that
//! can leave and a standby that is closer behind. So an epoch ends (once it is at least the
//! minimum interval old):
//!
//! - when output is waiting (console bytes, network frames): someone waits for it, and it can
//!   leave only once its checkpoint is acknowledged;
//! - when its dirty pages reach the dirty budget, what the pair ships within the ship bound at
//!   the rate measured in recent epochs, so that the pause, the checkpoint's transfer and the
//!   output that comes meanwhile stay bounded however fast the guest writes;
//! - at the maximum length, which bounds the work a failover redoes;
//! - for a silent guest, once the epoch is long enough that its checkpoint's cost (the last
//!   pause and the write faults the guest took, as measured in recent epochs) is a small share
//!   of it: a guest that dirties little is checkpointed often at little cost, one that dirties
//!   fast gets long epochs, up to the maximum.
//!
//! Whatever the rule, an epoch is sealed only when the sender can take it (it is not still busy
//! with the last two) and few enough epochs are unacknowledged; meanwhile the epoch stretches
//! and the guest runs on, until the output and disk writes it holds reach their bound (which
//! also ends an epoch before its minimum interval): then the guest waits, paused, until the
//! standby catches up.
//!
//! A guest under output pressure (it talks, and dirties memory about as fast as the pair ships
//! it, so its output waits for large checkpoints) has its epochs bounded by the reply budget,
//! what ships within the reply bound, instead of the dirty budget, keeps few pages writable,
//! has one checkpoint in flight at a time, and waits, paused, once its epoch reaches the reply
//! budget before the last checkpoint is acknowledged: its replies wait for one small
//! checkpoint, and it dirties at the pace the pair ships. Fixed epochs (minimum = maximum)
//! never come under pressure.
//!
//! A standby whose oldest unacknowledged checkpoint is older than the lag bound also makes
//! the guest wait: the guest runs at the pace its standby can follow (which,
//! when both share a host, also gives the standby the CPU the guest took). Together these
//! bound every buffer of the primary and the lag of the standby, however slow it is.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use vmm::cast::usize_to_u64;

use crate::hot::MAX_HOT_EPOCHS;
use crate::link::PeerConfig;
use crate::wire::PAGE_SIZE;

/// The epoch lengths a pair is configured with, carried in the handshake so that both nodes
/// know them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochBounds {
    /// An epoch with output waiting ends once it is this old (`--epoch-min-ms`); no rule but
    /// the byte bound ends one sooner.
    pub min_ms: u64,
    /// No epoch lasts longer, unless the sender is still busy (`--epoch-max-ms`).
    pub max_ms: u64,
}

impl EpochBounds {
    /// The defaults: replies wait at most about 2 ms for their epoch to end, and a failover
    /// redoes at most half a second of the guest's work.
    pub const DEFAULT: Self = Self {
        min_ms: 2,
        max_ms: 500,
    };

    /// Epochs of `ms` each, as a fixed Remus period (`--epoch-ms`).
    pub fn fixed(ms: u64) -> Self {
        Self {
            min_ms: ms,
            max_ms: ms,
        }
    }
}

impl Default for EpochBounds {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The bounds the policy works within.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// No epoch ends sooner, except at the byte bound.
    pub min: Duration,
    /// No epoch lasts longer (while the sender can take it).
    pub max: Duration,
    /// How long a checkpoint may take to ship: the dirty budget is what the pair ships in
    /// this time at the rate measured in recent epochs. Two thirds of the lag bound by
    /// default, as a checkpoint acknowledged later makes the standby slow (some 40 MiB here
    /// with the default 300 ms failover timeout: more than a 16 MiB working set rewritten
    /// every epoch, which long epochs cost nothing more to ship than short ones). Output that
    /// comes in a long epoch waits at most about this for the pages dirtied before it.
    pub ship: Duration,
    /// How long a checkpoint may take to ship under output pressure: the reply budget is
    /// what the pair ships in this time.
    pub reply: Duration,
    /// The share of a silent guest's time that its checkpoints may cost (pause and write
    /// faults): its epochs last (pause + tracking) / overhead, between `min` and `max`.
    pub overhead: f64,
    /// What one write fault on a write-protected page costs the guest: the tracking cost of a
    /// page it dirties. Measured 3-10 us on this project's PVM hosts (DESIGN.md); far less on
    /// hardware KVM with PML, where a smaller figure gives silent guests shorter epochs.
    pub fault: Duration,
    /// Console bytes and disk-write bytes of the running epoch that end it early.
    pub epoch_bytes: usize,
    /// Console bytes held in all unacknowledged epochs at which the guest waits.
    pub held_bytes: usize,
    /// Epochs sealed and not yet acknowledged at which no further epoch is sealed.
    pub unacked_epochs: usize,
    /// Age of the oldest unacknowledged checkpoint at which the guest waits for the standby.
    pub lag: Duration,
}

impl Limits {
    /// The defaults for epochs within `bounds` (a minimum above the maximum is raised to
    /// it), the guest waiting for a standby that lags by more than `lag`.
    pub fn new(bounds: EpochBounds, lag: Duration) -> Self {
        let max = Duration::from_millis(bounds.max_ms.max(1));
        Self {
            min: Duration::from_millis(bounds.min_ms).min(max),
            max,
            ship: lag * 2 / 3,
            reply: REPLY,
            overhead: OVERHEAD,
            fault: FAULT_COST,
            epoch_bytes: EPOCH_BYTES,
            held_bytes: HELD_BYTES,
            unacked_epochs: UNACKED_EPOCHS,
            lag,
        }
    }

    /// The limits of a pair configured with `config`: its epoch bounds, and its failover
    /// timeout as the lag bound (a standby that lags more is slow).
    pub fn for_peer(config: &PeerConfig) -> Self {
        Self::new(config.epochs, config.failover_timeout())
    }
}

/// Disk writes and console bytes in one epoch that end it early: a journal at disk speed
/// fills this in a fraction of a period, and the epoch's frames then stay well inside one
/// frame limit of the wire.
pub const EPOCH_BYTES: usize = 16 << 20;
/// Console bytes held at most while the standby is behind.
pub const HELD_BYTES: usize = 4 << 20;
/// Epochs in flight at most: a second and more of short epochs.
pub const UNACKED_EPOCHS: usize = 32;
/// The reply bound: a checkpoint of a guest that talks under pressure ships in some 2 ms
/// (plus its fixed costs: the pause, the round trip, the standby's commit).
pub const REPLY: Duration = Duration::from_millis(2);
/// The reply budget is never smaller: 1 MiB, as measured from small checkpoints the rate is
/// mostly their fixed round trip and would shrink the budget further.
pub const MIN_REPLY_BUDGET: usize = 256;
/// A silent guest's checkpoints cost it at most this share of its time.
pub const OVERHEAD: f64 = 0.02;
/// Tracking cost of a page: the upper end of what this project's PVM hosts measure.
pub const FAULT_COST: Duration = Duration::from_micros(10);
/// The rate assumed until checkpoints have been measured: about what this project's 2-core
/// hosts ship with the guest running beside (compression, loopback, the standby's apply).
pub const DEFAULT_SHIP_RATE: u64 = 200 << 20;
/// The dirty budget is never smaller: a checkpoint of this size ships in some 20 ms here,
/// and a budget measured from small, latency-bound checkpoints would otherwise cut epochs
/// the pair could easily ship.
pub const MIN_DIRTY_BUDGET: usize = 1024;
/// How often the epoch loop counts the running epoch's dirty pages (about 10 us each time
/// for a 1 GiB guest, 80 us for 8 GiB).
pub const DIRTY_POLL: Duration = Duration::from_millis(5);
/// How often under output pressure: a vCPU can dirty some 200 pages a millisecond here even
/// when every page faults, and the reply budget is a few hundred.
pub const PRESSED_POLL: Duration = Duration::from_micros(250);
/// The shortest wait between looks, so that a deadline that is due never spins the loop.
const MIN_LOOK: Duration = Duration::from_micros(100);

/// What recent checkpoints cost and how fast the pair took them, as the epoch loop measured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recent {
    /// Checkpoint bytes per second from sealing to acknowledgement over recent epochs (the
    /// sender, the link and the standby's commit together); None until measured.
    pub ship_rate: Option<u64>,
    /// The last checkpoint's pause.
    pub pause: Duration,
    /// Write faults the guest took per epoch (pages it dirtied that were write-protected),
    /// over recent epochs (see [`TrackingMeter`]).
    pub faults: usize,
    /// The guest is under output pressure (see [`pressed`]).
    pub pressed: bool,
}

/// Checkpoints the ship rate is measured over.
pub const SHIP_WINDOW: usize = 16;

/// Measures the rate at which the pair takes checkpoints: each checkpoint's bytes and the
/// time from when the pair could start on it (its sealing, or the previous acknowledgement if
/// that came later: checkpoints go through the sender and the standby one at a time) to its
/// acknowledgement, over the last `SHIP_WINDOW` checkpoints.
#[derive(Debug, Default)]
pub struct ShipMeter {
    recent: VecDeque<(u64, Duration)>,
    last_ack: Option<Instant>,
}

impl ShipMeter {
    /// A checkpoint of `bytes`, sealed at `sealed`, was acknowledged at `now` (several
    /// acknowledged at once: in order, with the same `now`).
    pub fn acked(&mut self, bytes: u64, sealed: Instant, now: Instant) {
        let start = self.last_ack.map_or(sealed, |ack| ack.max(sealed));
        if self.recent.len() == SHIP_WINDOW {
            self.recent.pop_front();
        }
        self.recent
            .push_back((bytes, now.saturating_duration_since(start)));
        self.last_ack = Some(now);
    }

    /// Bytes per second over the recent checkpoints; None before any took measurable time.
    pub fn rate(&self) -> Option<u64> {
        let bytes: u64 = self.recent.iter().map(|(b, _)| b).sum();
        let time: Duration = self.recent.iter().map(|(_, t)| *t).sum();
        let micros = time.as_micros();
        (micros > 0)
            .then(|| u64::try_from(u128::from(bytes) * 1_000_000 / micros).unwrap_or(u64::MAX))
    }
}

/// Averages the write faults the guest takes per epoch over the longest hot window
/// (`MAX_HOT_EPOCHS` + 1 epochs): a page the guest keeps writing stays writable for a window
/// and then faults once, and pages dirtied together fault in the same epoch, so one epoch's
/// count swings between none and the whole working set.
#[derive(Debug, Default)]
pub struct TrackingMeter {
    recent: VecDeque<usize>,
}

impl TrackingMeter {
    /// The guest took `faults` write faults in the epoch that just ended.
    pub fn epoch(&mut self, faults: usize) {
        if self.recent.len() > usize::from(MAX_HOT_EPOCHS) {
            self.recent.pop_front();
        }
        self.recent.push_back(faults);
    }

    /// Faults per epoch over the window (0 before any epoch).
    pub fn per_epoch(&self) -> usize {
        let sum: usize = self.recent.iter().sum();
        sum / self.recent.len().max(1)
    }
}

/// What the epoch loop sees when it looks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observation {
    /// Time since the running epoch began.
    pub elapsed: Duration,
    /// Whether the sender can take a checkpoint now (it is not still busy with the last two).
    pub sender_ready: bool,
    /// Epochs sealed and not yet acknowledged.
    pub unacked: usize,
    /// Console bytes and disk-write bytes the running epoch holds.
    pub epoch_bytes: usize,
    /// Console bytes held in all unacknowledged epochs, the running one included.
    pub held_bytes: usize,
    /// Age of the oldest unacknowledged checkpoint (zero when all are acknowledged).
    pub oldest_unacked: Duration,
    /// How long the running epoch's first output (console bytes, network frames) has waited
    /// for its checkpoint; None when no output waits.
    pub output_waiting: Option<Duration>,
    /// Pages the running epoch's checkpoint would copy so far; None when they cannot be
    /// counted while the guest runs.
    pub dirty_pages: Option<usize>,
    /// What recent checkpoints cost.
    pub recent: Recent,
}

/// Why an epoch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum EpochEnd {
    /// Output was waiting.
    Output,
    /// Its dirty pages reached the dirty budget.
    Dirty,
    /// It held as much output and disk writing as one epoch may.
    Bytes,
    /// A swap: the guest stops here and the standby resumes it.
    Swap,
    /// A silent epoch long enough for its checkpoint's cost to be a small share of it.
    Amortized,
    /// It reached the maximum length (the period, for fixed epochs).
    Max,
    /// The guest ended: its final checkpoint.
    Exit,
}

impl EpochEnd {
    /// Every reason, in the order status lists them.
    pub const ALL: [EpochEnd; 7] = [
        EpochEnd::Output,
        EpochEnd::Dirty,
        EpochEnd::Bytes,
        EpochEnd::Amortized,
        EpochEnd::Max,
        EpochEnd::Exit,
        EpochEnd::Swap,
    ];

    /// As status and `--stats-json` name it.
    pub fn as_str(self) -> &'static str {
        match self {
            EpochEnd::Output => "output",
            EpochEnd::Dirty => "dirty",
            EpochEnd::Bytes => "bytes",
            EpochEnd::Amortized => "amortized",
            EpochEnd::Max => "max",
            EpochEnd::Exit => "exit",
            EpochEnd::Swap => "swap",
        }
    }
}

/// Why the guest waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// The running epoch is full and the sender cannot take it yet.
    EpochFull,
    /// The guest is under output pressure and its epoch has dirtied the reply budget before
    /// the sender can take it: it dirties no more until then.
    Throttle,
    /// The standby acknowledges too slowly: held output is at its bound.
    HeldFull,
    /// The standby lags by more than the lag bound.
    StandbyBehind,
    /// A swap stopped it at an epoch's end: the standby resumes it.
    Swap,
}

impl Hold {
    /// How long the loop waits before it looks again (sooner when the standby answers or the
    /// sender takes a checkpoint): a throttled guest is held for about a checkpoint's
    /// transfer, and the minimum interval may end meanwhile, which nothing signals.
    pub fn look_in(self) -> Duration {
        match self {
            Hold::Throttle => PRESSED_POLL,
            Hold::EpochFull | Hold::HeldFull | Hold::StandbyBehind | Hold::Swap => DIRTY_POLL,
        }
    }
}

/// What the epoch loop does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Let the guest run and look again within `look_in` (sooner when output arrives or the
    /// standby answers).
    Run { look_in: Duration },
    /// End the epoch now: take its checkpoint.
    Checkpoint(EpochEnd),
    /// Keep the guest paused (pause it if it runs) and look again within
    /// [`Hold::look_in`], or when the standby answers.
    Hold(Hold),
}

/// The pages the pair ships within the ship bound at the recent rate: an epoch ends when its
/// dirty pages reach them.
pub fn dirty_budget(limits: &Limits, recent: &Recent) -> usize {
    pages_shipped(recent, limits.ship).max(MIN_DIRTY_BUDGET)
}

fn usize_to_u128(n: usize) -> u128 {
    u128::from(usize_to_u64(n))
}

/// Pages the pair ships in `time` at the recent rate.
fn pages_shipped(recent: &Recent, time: Duration) -> usize {
    let rate = recent.ship_rate.unwrap_or(DEFAULT_SHIP_RATE);
    let bytes = u128::from(rate) * time.as_micros() / 1_000_000;
    usize::try_from(bytes / usize_to_u128(PAGE_SIZE)).unwrap_or(usize::MAX)
}

/// How long a silent epoch lasts: long enough that its checkpoint's cost (the last pause,
/// and the write faults the guest takes per epoch) is the overhead share of it, between the
/// minimum and the maximum.
pub fn silent_length(limits: &Limits, recent: &Recent) -> Duration {
    let faults = u32::try_from(recent.faults).unwrap_or(u32::MAX);
    let cost = recent.pause + limits.fault.saturating_mul(faults);
    let length = if limits.overhead > 0.0 {
        Duration::try_from_secs_f64(cost.as_secs_f64() / limits.overhead).unwrap_or(limits.max)
    } else {
        limits.max
    };
    length.clamp(limits.min, limits.max)
}

/// The dirty pages that end the running epoch: the reply budget under output pressure, else
/// the dirty budget.
fn epoch_budget(limits: &Limits, recent: &Recent) -> usize {
    if recent.pressed {
        reply_budget(limits, recent)
    } else {
        dirty_budget(limits, recent)
    }
}

/// The pages the pair ships within the reply bound: under output pressure an epoch ends at
/// them, and the guest waits once it has dirtied them before the last checkpoint is
/// acknowledged.
pub fn reply_budget(limits: &Limits, recent: &Recent) -> usize {
    pages_shipped(recent, limits.reply).max(MIN_REPLY_BUDGET)
}

/// How many of an epoch's dirty pages may stay writable into the next epoch rather than be
/// write-protected again (see `crate::hot`): half the budget that ends the next epoch. Its
/// checkpoint copies and ships every one of them whether the guest writes it again or not, so
/// they must leave it room for new writes.
pub fn hot_budget(limits: &Limits, recent: &Recent) -> usize {
    epoch_budget(limits, recent) / 2
}

/// Output that comes within this of the release of the output before it answers it: a
/// client waits for each reply (or a sender for each acknowledgement) before it goes on.
pub const ANSWER: Duration = Duration::from_millis(10);
/// A guest under output pressure stays so while its output ends an epoch at least this often
/// (20 times a second: a service's replies, not a computation's progress lines).
pub const TALK: Duration = Duration::from_millis(50);

/// An epoch as it ended, for [`pressed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    pub why: EpochEnd,
    pub length: Duration,
    /// Pages its checkpoint copies.
    pub pages: usize,
    /// Time since the last epoch before it that output ended.
    pub since_output: Duration,
    /// Its output came within [`ANSWER`] of the last release of output: someone waits for
    /// each of the guest's outputs before going on.
    pub answers: bool,
}

/// Whether the guest is under output pressure after the epoch `done`. Output ended it, that
/// output answered the output before it (a client waits for each reply, so every reply's
/// wait for its checkpoint slows the client), and the guest dirtied at least half the rate
/// at which the pair ships (when the pair is the bottleneck a guest's epochs last about as
/// long as shipping their predecessor, so it dirties at about that rate), a quarter once
/// under pressure (held at the reply budget it dirties at about the rate the pair ships).
/// Under pressure, any epoch keeps it while the guest still dirties that fast and output
/// ended an epoch within [`TALK`] before (holding the guest delays its answers, which then
/// need not come within [`ANSWER`]). A computation that prints its progress now and then
/// answers nobody and keeps its long epochs, however fast it dirties. Nor is a guest whose
/// epoch dirtied fewer pages than the smallest reply budget: holding it at the budget would
/// never stop it, and the rate measured from such small checkpoints is their fixed round trip
/// more than the pair's speed (a program printing lines, each epoch a few dozen pages, would
/// otherwise look pressed and get one checkpoint in flight for nothing).
pub fn pressed(limits: &Limits, recent: &Recent, done: &Done) -> bool {
    if limits.min >= limits.max || done.pages < MIN_REPLY_BUDGET {
        return false;
    }
    let rate = u128::from(recent.ship_rate.unwrap_or(DEFAULT_SHIP_RATE));
    let dirtied = usize_to_u128(done.pages) * usize_to_u128(PAGE_SIZE) * 1_000_000;
    let shippable = rate * done.length.as_micros();
    let fast = if recent.pressed {
        4 * dirtied >= shippable
    } else {
        2 * dirtied >= shippable
    };
    let talks = recent.pressed && done.since_output < TALK;
    fast && (talks || (done.why == EpochEnd::Output && done.answers))
}

/// Decides what the epoch loop does, given what it observes.
pub fn next(obs: &Observation, limits: &Limits) -> Next {
    if obs.oldest_unacked >= limits.lag {
        return Next::Hold(Hold::StandbyBehind);
    }
    let epoch_full = obs.epoch_bytes >= limits.epoch_bytes;
    // Under output pressure the checkpoint that output waits for must not queue behind
    // others on the link and in the standby: one at a time.
    let in_flight = if obs.recent.pressed {
        1
    } else {
        limits.unacked_epochs
    };
    let can_seal = obs.sender_ready && obs.unacked < in_flight;
    if can_seal {
        if let Some(why) = due(obs, limits, epoch_full) {
            return Next::Checkpoint(why);
        }
    }
    if epoch_full {
        return Next::Hold(Hold::EpochFull);
    }
    if obs.recent.pressed
        && obs
            .dirty_pages
            .is_some_and(|d| d >= reply_budget(limits, &obs.recent))
    {
        // Not sealed above: the last checkpoint is not acknowledged yet, or the epoch is
        // younger than the minimum.
        return Next::Hold(Hold::Throttle);
    }
    if obs.held_bytes >= limits.held_bytes {
        return Next::Hold(Hold::HeldFull);
    }
    Next::Run {
        look_in: look_in(obs, limits, can_seal),
    }
}

/// Why the running epoch should end now, if it should.
fn due(obs: &Observation, limits: &Limits, epoch_full: bool) -> Option<EpochEnd> {
    if epoch_full {
        return Some(EpochEnd::Bytes);
    }
    if obs.elapsed < limits.min {
        return None;
    }
    if obs.output_waiting.is_some() {
        return Some(EpochEnd::Output);
    }
    if obs
        .dirty_pages
        .is_some_and(|d| d >= epoch_budget(limits, &obs.recent))
    {
        return Some(EpochEnd::Dirty);
    }
    if obs.elapsed >= limits.max {
        return Some(EpochEnd::Max);
    }
    if obs.elapsed >= silent_length(limits, &obs.recent) {
        return Some(EpochEnd::Amortized);
    }
    None
}

/// How often the running epoch's dirty pages are counted.
fn poll(recent: &Recent) -> Duration {
    if recent.pressed {
        PRESSED_POLL
    } else {
        DIRTY_POLL
    }
}

/// How long the guest may run before the policy must look again: until the next deadline
/// (the minimum interval with output waiting, else the silent length), at most the dirty
/// poll interval while dirty pages are counted; while the epoch cannot be sealed, until the
/// sender or the standby has moved on (both wake the loop) or a poll interval.
fn look_in(obs: &Observation, limits: &Limits, can_seal: bool) -> Duration {
    if !can_seal {
        return poll(&obs.recent);
    }
    let deadline = match obs.output_waiting {
        Some(_) => limits.min,
        None => silent_length(limits, &obs.recent),
    };
    let mut wait = deadline.saturating_sub(obs.elapsed);
    if obs.dirty_pages.is_some() {
        wait = wait.min(poll(&obs.recent));
    }
    wait.max(MIN_LOOK)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Small figures that keep every rule apart: epochs of 2..500 ms, a 100 ms ship bound at
    /// 40 MiB/s measured (1024 pages), 1% overhead, 10 us faults.
    fn limits() -> Limits {
        Limits {
            min: 2 * MS,
            max: 500 * MS,
            ship: 100 * MS,
            reply: 10 * MS,
            overhead: 0.01,
            fault: Duration::from_micros(10),
            epoch_bytes: 1000,
            held_bytes: 5000,
            unacked_epochs: 4,
            lag: 300 * MS,
        }
    }

    /// A checkpoint of 0.5 ms pause and 100 faults (1.5 ms of cost: 150 ms silent epochs),
    /// shipped at 40 MiB/s.
    fn recent() -> Recent {
        Recent {
            ship_rate: Some(40 << 20),
            pause: Duration::from_micros(500),
            faults: 100,
            pressed: false,
        }
    }

    fn obs(elapsed_ms: u64) -> Observation {
        Observation {
            elapsed: Duration::from_millis(elapsed_ms),
            sender_ready: true,
            dirty_pages: Some(10),
            recent: recent(),
            ..Observation::default()
        }
    }

    fn waiting(elapsed_ms: u64) -> Observation {
        Observation {
            output_waiting: Some(Duration::ZERO),
            ..obs(elapsed_ms)
        }
    }

    fn look_in(next: Next) -> Duration {
        match next {
            Next::Run { look_in } => look_in,
            other => panic!("expected Run, got {other:?}"),
        }
    }

    #[test]
    fn the_derived_figures_follow_the_measurements() {
        let (l, r) = (limits(), recent());
        assert_eq!(dirty_budget(&l, &r), 1024, "40 MiB/s for 100 ms");
        assert_eq!(silent_length(&l, &r), 150 * MS, "1.5 ms of cost at 1%");
        let twice = Recent {
            ship_rate: Some(80 << 20),
            ..r
        };
        assert_eq!(dirty_budget(&l, &twice), 2048);
        let busy = Recent { faults: 1000, ..r };
        assert_eq!(silent_length(&l, &busy), 500 * MS, "capped at the maximum");
        let idle = Recent {
            pause: Duration::ZERO,
            faults: 0,
            ..r
        };
        assert_eq!(silent_length(&l, &idle), 2 * MS, "raised to the minimum");
    }

    #[test]
    fn output_ends_an_epoch_once_it_is_the_minimum_interval_old() {
        assert_eq!(look_in(next(&waiting(0), &limits())), 2 * MS);
        assert_eq!(
            look_in(next(&waiting(1), &limits())),
            MS,
            "the loop looks again when the minimum interval is over"
        );
        assert_eq!(
            next(&waiting(2), &limits()),
            Next::Checkpoint(EpochEnd::Output)
        );
        let late = Observation {
            output_waiting: Some(30 * MS),
            ..obs(40)
        };
        assert_eq!(next(&late, &limits()), Next::Checkpoint(EpochEnd::Output));
    }

    #[test]
    fn a_silent_epoch_lasts_until_its_checkpoint_cost_is_amortized() {
        assert!(matches!(next(&obs(149), &limits()), Next::Run { .. }));
        assert_eq!(
            next(&obs(150), &limits()),
            Next::Checkpoint(EpochEnd::Amortized)
        );
    }

    #[test]
    fn a_silent_guest_that_dirties_fast_gets_the_maximum() {
        let heavy = |elapsed| Observation {
            recent: Recent {
                faults: 4096,
                pause: 4 * MS,
                ..recent()
            },
            dirty_pages: Some(1000),
            ..obs(elapsed)
        };
        assert!(matches!(next(&heavy(499), &limits()), Next::Run { .. }));
        assert_eq!(
            next(&heavy(500), &limits()),
            Next::Checkpoint(EpochEnd::Max)
        );
    }

    #[test]
    fn the_dirty_budget_ends_an_epoch_early() {
        let o = Observation {
            dirty_pages: Some(1024),
            ..obs(3)
        };
        assert_eq!(next(&o, &limits()), Next::Checkpoint(EpochEnd::Dirty));
        let o = Observation {
            dirty_pages: Some(1023),
            ..obs(3)
        };
        assert!(matches!(next(&o, &limits()), Next::Run { .. }));
    }

    #[test]
    fn the_dirty_budget_has_a_floor_and_a_default_rate() {
        let slow = Recent {
            ship_rate: Some(1 << 20),
            ..recent()
        };
        assert_eq!(dirty_budget(&limits(), &slow), MIN_DIRTY_BUDGET);
        let unmeasured = Recent {
            ship_rate: None,
            ..recent()
        };
        assert_eq!(
            dirty_budget(&limits(), &unmeasured),
            usize::try_from(DEFAULT_SHIP_RATE / 10).unwrap() / PAGE_SIZE
        );
    }

    #[test]
    fn without_a_dirty_count_the_budget_does_not_apply_and_the_loop_does_not_poll() {
        let o = Observation {
            dirty_pages: None,
            ..obs(3)
        };
        assert_eq!(look_in(next(&o, &limits())), 147 * MS);
        assert_eq!(
            look_in(next(&obs(3), &limits())),
            DIRTY_POLL,
            "dirty pages are counted every poll interval"
        );
    }

    #[test]
    fn nothing_but_the_byte_bound_ends_an_epoch_before_the_minimum_interval() {
        let l = Limits {
            min: 10 * MS,
            ..limits()
        };
        let early = Observation {
            dirty_pages: Some(1 << 20),
            ..waiting(9)
        };
        assert!(matches!(next(&early, &l), Next::Run { .. }));
        let full = Observation {
            epoch_bytes: 1000,
            ..early
        };
        assert_eq!(next(&full, &l), Next::Checkpoint(EpochEnd::Bytes));
    }

    #[test]
    fn fixed_epochs_end_at_their_period_whatever_else_happens() {
        let l = Limits::new(EpochBounds::fixed(40), 300 * MS);
        assert_eq!((l.min, l.max), (40 * MS, 40 * MS));
        let o = Observation {
            recent: Recent::default(),
            ..waiting(39)
        };
        assert!(matches!(next(&o, &l), Next::Run { .. }));
        let o = Observation {
            recent: Recent::default(),
            ..obs(40)
        };
        assert_eq!(next(&o, &l), Next::Checkpoint(EpochEnd::Max));
        assert_eq!(
            next(&waiting(40), &l),
            Next::Checkpoint(EpochEnd::Output),
            "output at the period names it"
        );
    }

    #[test]
    fn the_defaults_and_bounds_out_of_order() {
        let l = Limits::new(EpochBounds::default(), 300 * MS);
        assert_eq!((l.min, l.max), (2 * MS, 500 * MS));
        assert_eq!((l.ship, l.fault), (200 * MS, FAULT_COST));
        // A stencil rewriting 16 MiB (4096 pages) per epoch fits the default budget, and
        // its checkpoints (4 ms pause, a quarter of its pages faulting) get the maximum.
        let stencil = Recent {
            ship_rate: None,
            pause: 4 * MS,
            faults: 1024,
            pressed: false,
        };
        assert!(dirty_budget(&l, &stencil) > 4096);
        assert_eq!(silent_length(&l, &stencil), l.max);
        let l = Limits::new(
            EpochBounds {
                min_ms: 90,
                max_ms: 50,
            },
            300 * MS,
        );
        assert_eq!((l.min, l.max), (50 * MS, 50 * MS));
        let l = Limits::new(
            EpochBounds {
                min_ms: 0,
                max_ms: 0,
            },
            300 * MS,
        );
        assert_eq!((l.min, l.max), (Duration::ZERO, MS));
    }

    #[test]
    fn pages_stay_writable_within_half_the_budget() {
        assert_eq!(hot_budget(&limits(), &recent()), 512);
        let pressed = Recent {
            pressed: true,
            ..recent()
        };
        // 40 MiB/s for 10 ms is 102 pages: the floor applies.
        assert_eq!(reply_budget(&limits(), &pressed), MIN_REPLY_BUDGET);
        assert_eq!(hot_budget(&limits(), &pressed), MIN_REPLY_BUDGET / 2);
        let fast = Recent {
            ship_rate: Some(400 << 20),
            ..pressed
        };
        assert_eq!(reply_budget(&limits(), &fast), 1024);
    }

    #[test]
    fn a_guest_that_answers_and_dirties_about_as_fast_as_the_pair_ships_is_under_pressure() {
        let (l, r) = (limits(), recent());
        // 40 MiB/s: 1024 pages in 100 ms is the rate, 512 half of it, 256 a quarter.
        let done = |why, pages, since_ms, answers| Done {
            why,
            length: 100 * MS,
            pages,
            since_output: since_ms * MS,
            answers,
        };
        assert!(pressed(&l, &r, &done(EpochEnd::Output, 512, 0, true)));
        assert!(
            !pressed(&l, &r, &done(EpochEnd::Output, 511, 0, true)),
            "dirties slowly"
        );
        assert!(
            !pressed(&l, &r, &done(EpochEnd::Output, 4096, 0, false)),
            "prints its progress, answers nobody"
        );
        assert!(
            !pressed(&l, &r, &done(EpochEnd::Max, 4096, 600, false)),
            "silent"
        );
        let under = Recent { pressed: true, ..r };
        assert!(
            pressed(&l, &under, &done(EpochEnd::Dirty, 256, 49, false)),
            "output came within TALK, a quarter of the rate keeps it"
        );
        assert!(
            pressed(&l, &under, &done(EpochEnd::Output, 256, 49, false)),
            "a held guest's answer may come late"
        );
        assert!(
            !pressed(&l, &under, &done(EpochEnd::Dirty, 800, 50, false)),
            "it went quiet"
        );
        assert!(
            !pressed(&l, &under, &done(EpochEnd::Dirty, 255, 0, false)),
            "it slowed down"
        );
        assert!(
            !pressed(&l, &under, &done(EpochEnd::Output, 4096, 150, false)),
            "progress lines now and then answer nobody"
        );
        let fixed = Limits::new(EpochBounds::fixed(100), 300 * MS);
        assert!(!pressed(
            &fixed,
            &under,
            &done(EpochEnd::Output, 4096, 0, true)
        ));
        // 68 pages in a 2 ms epoch at a rate measured from checkpoints that small: fast by
        // the rate, but below any reply budget.
        let slow = Recent {
            ship_rate: Some(10 << 20),
            ..r
        };
        let small = Done {
            length: 2 * MS,
            ..done(EpochEnd::Output, 68, 0, true)
        };
        assert!(
            !pressed(&l, &slow, &small),
            "prints lines, dirties a few pages"
        );
        assert!(pressed(
            &l,
            &slow,
            &Done {
                pages: MIN_REPLY_BUDGET,
                ..small
            }
        ));
    }

    #[test]
    fn under_pressure_the_reply_budget_ends_epochs_and_holds_the_guest_until_the_sender_is_free() {
        let under = |dirty, sender_ready, elapsed| Observation {
            sender_ready,
            dirty_pages: Some(dirty),
            recent: Recent {
                pressed: true,
                ..recent()
            },
            ..obs(elapsed)
        };
        let l = limits();
        assert_eq!(
            next(&under(256, true, 2), &l),
            Next::Checkpoint(EpochEnd::Dirty)
        );
        assert_eq!(next(&under(256, false, 5), &l), Next::Hold(Hold::Throttle));
        assert_eq!(
            next(&under(256, true, 1), &l),
            Next::Hold(Hold::Throttle),
            "before the minimum interval too"
        );
        assert_eq!(look_in(next(&under(255, false, 5), &l)), PRESSED_POLL);
        let in_flight = Observation {
            unacked: 1,
            ..under(256, true, 5)
        };
        assert_eq!(
            next(&in_flight, &l),
            Next::Hold(Hold::Throttle),
            "one checkpoint in flight at a time"
        );
        let free = Observation {
            recent: recent(),
            ..under(5000, false, 5)
        };
        assert!(
            matches!(next(&free, &l), Next::Run { .. }),
            "without pressure the guest runs on"
        );
    }

    #[test]
    fn an_epoch_ends_only_when_the_sender_can_take_it() {
        let busy = Observation {
            sender_ready: false,
            epoch_bytes: 999,
            dirty_pages: Some(5000),
            ..waiting(600)
        };
        assert_eq!(look_in(next(&busy, &limits())), DIRTY_POLL);
        let behind = Observation {
            unacked: 4,
            ..obs(600)
        };
        assert!(matches!(next(&behind, &limits()), Next::Run { .. }));
    }

    #[test]
    fn an_epoch_full_of_writes_ends_early() {
        let o = Observation {
            epoch_bytes: 1000,
            ..obs(0)
        };
        assert_eq!(next(&o, &limits()), Next::Checkpoint(EpochEnd::Bytes));
    }

    #[test]
    fn a_full_epoch_that_cannot_be_sent_holds_the_guest() {
        let busy = Observation {
            sender_ready: false,
            epoch_bytes: 1000,
            ..obs(10)
        };
        assert_eq!(next(&busy, &limits()), Next::Hold(Hold::EpochFull));
        let behind = Observation {
            unacked: 4,
            epoch_bytes: 1000,
            ..obs(10)
        };
        assert_eq!(next(&behind, &limits()), Next::Hold(Hold::EpochFull));
    }

    #[test]
    fn a_standby_that_lags_holds_the_guest_whatever_else_is_due() {
        let o = Observation {
            oldest_unacked: 300 * MS,
            epoch_bytes: 1000,
            ..waiting(500)
        };
        assert_eq!(next(&o, &limits()), Next::Hold(Hold::StandbyBehind));
        let o = Observation {
            oldest_unacked: 299 * MS,
            ..obs(500)
        };
        assert_eq!(next(&o, &limits()), Next::Checkpoint(EpochEnd::Max));
    }

    #[test]
    fn held_output_at_its_bound_holds_the_guest_once_its_epoch_is_sealed() {
        // Output waits and the sender is free: seal first (it adds nothing held)...
        let o = Observation {
            held_bytes: 5000,
            ..waiting(2)
        };
        assert_eq!(next(&o, &limits()), Next::Checkpoint(EpochEnd::Output));
        // ...then wait, paused, for acknowledgements to release what is held.
        let o = Observation {
            held_bytes: 5000,
            ..obs(0)
        };
        assert_eq!(next(&o, &limits()), Next::Hold(Hold::HeldFull));
    }

    #[test]
    fn the_ship_rate_counts_each_checkpoint_from_when_the_pair_could_start_on_it() {
        let t0 = Instant::now();
        let mut m = ShipMeter::default();
        assert_eq!(m.rate(), None);
        // 1 MiB sealed at 0, acknowledged at 10 ms.
        m.acked(1 << 20, t0, t0 + 10 * MS);
        assert_eq!(m.rate(), Some(100 << 20));
        // Sealed at 5 ms while the first was in flight: counted from 10 ms, acked at 20 ms.
        m.acked(1 << 20, t0 + 5 * MS, t0 + 20 * MS);
        assert_eq!(m.rate(), Some(100 << 20));
        // Two acknowledged at once: the second took no time of its own.
        m.acked(1 << 20, t0 + 21 * MS, t0 + 30 * MS);
        m.acked(1 << 20, t0 + 22 * MS, t0 + 30 * MS);
        assert_eq!(
            m.rate(),
            Some((4u64 << 20) * 1000 / 29),
            "4 MiB in 10 + 10 + 9 + 0 ms"
        );
        // Only the last SHIP_WINDOW count.
        for i in 0..SHIP_WINDOW {
            let at = t0 + 100 * MS * u32::try_from(i + 1).unwrap();
            m.acked(2 << 20, at, at + 10 * MS);
        }
        assert_eq!(m.rate(), Some(200 << 20));
    }

    #[test]
    fn faults_are_averaged_over_a_hot_window() {
        let mut m = TrackingMeter::default();
        assert_eq!(m.per_epoch(), 0);
        // A working set of 4900 pages, at the longest window, faults every 49th epoch.
        let window = usize::from(MAX_HOT_EPOCHS) + 1;
        for _ in 0..3 {
            m.epoch(4900);
            for _ in 1..window {
                m.epoch(0);
            }
            assert_eq!(m.per_epoch(), 100);
        }
        m.epoch(4900);
        assert_eq!(m.per_epoch(), 100, "the window slides");
    }

    #[test]
    fn a_due_deadline_never_spins_the_loop() {
        let l = Limits {
            min: Duration::ZERO,
            ..limits()
        };
        let o = Observation {
            sender_ready: true,
            dirty_pages: None,
            recent: Recent {
                pause: Duration::ZERO,
                faults: 0,
                ..recent()
            },
            ..Observation::default()
        };
        // Silent length zero, elapsed zero: the amortized rule ends it at once.
        assert_eq!(next(&o, &l), Next::Checkpoint(EpochEnd::Amortized));
        assert_eq!(super::look_in(&o, &l, true), MIN_LOOK);
    }
}
