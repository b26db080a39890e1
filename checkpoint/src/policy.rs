//! When the primary ends an epoch and when it makes the guest wait: the one place where the
//! epoch loop decides, a pure function of what it observes, so that it is tested without KVM.
//!
//! Today an epoch ends when its period is over or when the output and disk writes it holds
//! reach a bound, as soon as the sender can take it. When the sender cannot (the link or the
//! standby is behind) the epoch stretches, and the guest runs on, until what it holds reaches
//! its bound: then the guest waits, paused, until the standby catches up. A standby whose
//! oldest unacknowledged checkpoint is older than the lag bound also makes the guest wait: the
//! guest runs at the pace its standby can follow (which, when both share a host, also gives
//! the standby the CPU the guest took). Together these bound every buffer of the primary and
//! the lag of the standby, however slow it is.

use std::time::Duration;

/// The bounds the policy works within.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The epoch's period (`--epoch-ms`).
    pub period: Duration,
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
    /// The defaults for an epoch of `period`, the guest waiting for a standby that lags by
    /// more than `lag` (the failover timeout: then the standby is slow).
    pub fn new(period: Duration, lag: Duration) -> Self {
        Self {
            period,
            epoch_bytes: EPOCH_BYTES,
            held_bytes: HELD_BYTES,
            unacked_epochs: UNACKED_EPOCHS,
            lag,
        }
    }
}

/// Disk writes and console bytes in one epoch that end it early: a journal at disk speed
/// fills this in a fraction of a period, and the epoch's frames then stay well inside one
/// frame limit of the wire.
pub const EPOCH_BYTES: usize = 16 << 20;
/// Console bytes held at most while the standby is behind.
pub const HELD_BYTES: usize = 4 << 20;
/// Epochs in flight at most: a second and more of 40 ms epochs.
pub const UNACKED_EPOCHS: usize = 32;

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
}

/// Why an epoch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpochEnd {
    /// Its period was over.
    Period,
    /// It held as much output and disk writing as one epoch may.
    Bytes,
    /// A swap: the guest stops here and the standby resumes it.
    Swap,
}

/// Why the guest waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// The running epoch is full and the sender cannot take it yet.
    EpochFull,
    /// The standby acknowledges too slowly: held output is at its bound.
    HeldFull,
    /// The standby lags by more than the lag bound.
    StandbyBehind,
    /// A swap stopped it at an epoch's end: the standby resumes it.
    Swap,
}

/// What the epoch loop does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Let the guest run and look again soon.
    Run,
    /// End the epoch now: take its checkpoint.
    Checkpoint(EpochEnd),
    /// Keep the guest paused (pause it if it runs) and look again when the standby answers.
    Hold(Hold),
}

/// Decides what the epoch loop does, given what it observes.
pub fn next(obs: &Observation, limits: &Limits) -> Next {
    if obs.oldest_unacked >= limits.lag {
        return Next::Hold(Hold::StandbyBehind);
    }
    let epoch_full = obs.epoch_bytes >= limits.epoch_bytes;
    let can_seal = obs.sender_ready && obs.unacked < limits.unacked_epochs;
    if can_seal && epoch_full {
        return Next::Checkpoint(EpochEnd::Bytes);
    }
    if can_seal && obs.elapsed >= limits.period {
        return Next::Checkpoint(EpochEnd::Period);
    }
    if epoch_full {
        return Next::Hold(Hold::EpochFull);
    }
    if obs.held_bytes >= limits.held_bytes {
        return Next::Hold(Hold::HeldFull);
    }
    Next::Run
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            period: Duration::from_millis(40),
            epoch_bytes: 1000,
            held_bytes: 5000,
            unacked_epochs: 4,
            lag: Duration::from_millis(300),
        }
    }

    fn obs(elapsed_ms: u64) -> Observation {
        Observation {
            elapsed: Duration::from_millis(elapsed_ms),
            sender_ready: true,
            ..Observation::default()
        }
    }

    #[test]
    fn an_epoch_ends_at_its_period() {
        assert_eq!(next(&obs(39), &limits()), Next::Run);
        assert_eq!(
            next(&obs(40), &limits()),
            Next::Checkpoint(EpochEnd::Period)
        );
    }

    #[test]
    fn an_epoch_full_of_writes_ends_early() {
        let o = Observation {
            epoch_bytes: 1000,
            ..obs(3)
        };
        assert_eq!(next(&o, &limits()), Next::Checkpoint(EpochEnd::Bytes));
    }

    #[test]
    fn a_busy_sender_stretches_the_epoch_while_the_guest_runs() {
        let o = Observation {
            sender_ready: false,
            epoch_bytes: 999,
            ..obs(400)
        };
        assert_eq!(next(&o, &limits()), Next::Run);
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
    fn too_many_unacknowledged_epochs_stretch_the_epoch() {
        let o = Observation {
            unacked: 4,
            ..obs(100)
        };
        assert_eq!(next(&o, &limits()), Next::Run);
    }

    #[test]
    fn a_standby_that_lags_holds_the_guest_whatever_else_is_due() {
        let o = Observation {
            oldest_unacked: Duration::from_millis(300),
            ..obs(500)
        };
        assert_eq!(next(&o, &limits()), Next::Hold(Hold::StandbyBehind));
        let o = Observation {
            oldest_unacked: Duration::from_millis(299),
            ..obs(500)
        };
        assert_eq!(next(&o, &limits()), Next::Checkpoint(EpochEnd::Period));
    }

    #[test]
    fn held_output_at_its_bound_holds_the_guest_once_its_epoch_is_sealed() {
        // The period is over and the sender is free: seal first (it adds nothing held)...
        let o = Observation {
            held_bytes: 5000,
            ..obs(40)
        };
        assert_eq!(next(&o, &limits()), Next::Checkpoint(EpochEnd::Period));
        // ...then wait, paused, for acknowledgements to release what is held.
        let o = Observation {
            held_bytes: 5000,
            ..obs(0)
        };
        assert_eq!(next(&o, &limits()), Next::Hold(Hold::HeldFull));
    }
}
