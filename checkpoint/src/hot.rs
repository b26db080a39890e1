//! Which dirty pages stay writable between epochs. Under PVM a write to a write-protected page
//! costs a fault of several microseconds, far more than copying the page into one more
//! checkpoint; so a page found dirty stays writable (and is copied every epoch) for a few
//! epochs before it is write-protected again to see whether the guest still writes it.

use vmm::cast::u64_to_usize;
use vmm::memory::DirtyLog;

use crate::wire::PAGE_SIZE;

/// Epochs a page found dirty stays writable before it is write-protected again.
pub const HOT_EPOCHS: u8 = 3;

/// Per guest page: epochs left before it is write-protected again (0: write-protected).
#[derive(Debug, Default)]
pub struct HotPages {
    left: Vec<u8>,
    /// Pages the last `rearm` left writable.
    writable: usize,
}

impl HotPages {
    /// Of the pages of an epoch's harvest `log`, those to write-protect again: pages writable
    /// for `HOT_EPOCHS` epochs, and those beyond the first `keep` (in address order) that would
    /// stay writable, whose window ends early (see `crate::policy::hot_budget`). A page that
    /// is not re-armed stays in every harvest, so the log keeps naming it until then.
    pub fn rearm(&mut self, log: &DirtyLog, keep: usize) -> DirtyLog {
        let mut writable = 0;
        let rearmed = log.select(|gpa| {
            let page = u64_to_usize(gpa) / PAGE_SIZE;
            if page >= self.left.len() {
                self.left.resize(page + 1, 0);
            }
            let left = &mut self.left[page];
            let rearm = if *left == 0 {
                *left = HOT_EPOCHS;
                false
            } else {
                *left -= 1;
                *left == 0
            };
            if rearm {
                return true;
            }
            if writable >= keep {
                *left = 0;
                return true;
            }
            writable += 1;
            false
        });
        self.writable = writable;
        rearmed
    }

    /// Pages the last harvest left writable: the next harvest names them whether or not the
    /// guest wrote them, and the guest writes them without a fault.
    pub fn writable(&self) -> usize {
        self.writable
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn log(pages: &[u64]) -> DirtyLog {
        let mut bits = vec![0u64; 2];
        for &p in pages {
            bits[u64_to_usize(p / 64)] |= 1 << (p % 64);
        }
        let mut log = DirtyLog::default();
        log.add_region(GuestAddress(0), 128 * 4096, bits);
        log
    }

    #[test]
    fn a_dirty_page_is_rearmed_after_its_window_and_starts_a_new_one_when_dirty_again() {
        let mut hot = HotPages::default();
        // Page 5 is dirty and, never re-armed, stays in the harvests of its window.
        for _ in 0..HOT_EPOCHS {
            assert_eq!(hot.rearm(&log(&[5, 70]), usize::MAX).count(), 0);
        }
        let rearmed: Vec<u64> = hot.rearm(&log(&[5, 70]), usize::MAX).pages().collect();
        assert_eq!(rearmed, vec![5 * 4096, 70 * 4096]);
        // Written again after re-arming: a new window.
        assert_eq!(hot.rearm(&log(&[5]), usize::MAX).count(), 0);
    }

    #[test]
    fn pages_beyond_the_budget_are_rearmed_at_once_and_start_afresh() {
        let mut hot = HotPages::default();
        let rearmed: Vec<u64> = hot.rearm(&log(&[1, 2, 3]), 2).pages().collect();
        assert_eq!(rearmed, vec![3 * 4096], "the first two stay writable");
        assert_eq!(hot.writable(), 2);
        // Page 3's window starts again when it is dirty again; 1 and 2 go on with theirs.
        let rearmed: Vec<u64> = hot.rearm(&log(&[1, 2, 3]), 3).pages().collect();
        assert!(rearmed.is_empty());
        assert_eq!(
            hot.rearm(&log(&[1, 2, 3]), 0).count(),
            3,
            "no room: all re-armed"
        );
    }
}
