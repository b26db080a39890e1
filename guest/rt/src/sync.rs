//! SMP helpers: a spinlock (vCPUs cannot sleep; there is no scheduler) and a spin barrier.
use core::hint::spin_loop;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// A test-and-test-and-set spinlock usable with `lock_api`.
pub struct RawSpinLock(AtomicBool);

// SAFETY: `lock` only returns once it has atomically changed `false` to `true` (Acquire), and
// `unlock` stores `false` (Release), so at most one holder exists at a time.
unsafe impl lock_api::RawMutex for RawSpinLock {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: Self = RawSpinLock(AtomicBool::new(false));
    type GuardMarker = lock_api::GuardSend;

    fn lock(&self) {
        while !self.try_lock() {
            while self.0.load(Ordering::Relaxed) {
                spin_loop();
            }
        }
    }

    fn try_lock(&self) -> bool {
        self.0
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    unsafe fn unlock(&self) {
        self.0.store(false, Ordering::Release);
    }
}

/// A mutex that spins.
pub type SpinLock<T> = lock_api::Mutex<RawSpinLock, T>;
/// The guard of a [`SpinLock`].
pub type SpinLockGuard<'a, T> = lock_api::MutexGuard<'a, RawSpinLock, T>;

/// A reusable spin barrier for a fixed number of participants (sense by generation count).
pub struct Barrier {
    parties: AtomicU32,
    arrived: AtomicU32,
    generation: AtomicU32,
}

impl Barrier {
    /// A barrier for `parties` participants (0 is treated as 1).
    pub const fn new(parties: u32) -> Self {
        Barrier {
            parties: AtomicU32::new(if parties == 0 { 1 } else { parties }),
            arrived: AtomicU32::new(0),
            generation: AtomicU32::new(0),
        }
    }

    /// Sets the number of participants; only while nobody waits (used once at start-up).
    pub fn set_parties(&self, parties: u32) {
        self.parties.store(parties.max(1), Ordering::Release);
    }

    /// Waits until all participants have called `wait` for this round. Returns `true` on
    /// exactly one participant (the last to arrive). Memory written by any participant before
    /// `wait` is visible to all after it.
    pub fn wait(&self) -> bool {
        let generation = self.generation.load(Ordering::Acquire);
        let parties = self.parties.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == parties {
            // Reset before releasing: nobody can arrive for the next round until the
            // generation changes.
            self.arrived.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
            true
        } else {
            while self.generation.load(Ordering::Acquire) == generation {
                spin_loop();
            }
            false
        }
    }
}
