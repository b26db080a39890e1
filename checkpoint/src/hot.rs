//! Which dirty pages stay writable between epochs. Under PVM a write to a write-protected page
//! costs a fault of about 12 us (shadow paging), far more than copying the page into one more
//! checkpoint; so a page found dirty stays writable (and is copied every epoch) for a window of
//! epochs before it is write-protected again to see whether the guest still writes it. A page
//! that faults again soon after (within its last window) gets a window twice as long, up to
//! [`MAX_HOT_EPOCHS`]: a buffer the guest rewrites every few epochs (a network stream's
//! receive ring) or every epoch (a grid) stops faulting every few epochs, while a page written
//! once costs its first window's copies only.

use vmm::cast::u64_to_usize;
use vmm::memory::DirtyLog;

use crate::wire::PAGE_SIZE;

/// Epochs a page found dirty stays writable before it is write-protected again, the first
/// time (or when it was quiet for longer than its last window).
pub const HOT_EPOCHS: u8 = 3;
/// The longest window a page that keeps faulting again grows to.
pub const MAX_HOT_EPOCHS: u8 = 48;

/// One guest page's window.
#[derive(Debug, Default, Clone, Copy)]
struct Page {
    /// Epochs left before it is write-protected again (0: write-protected).
    left: u8,
    /// Its last window's length (0: never dirty).
    window: u8,
    /// The epoch (modulo 256) it was last write-protected again.
    rearmed: u8,
}

/// The windows of the guest's pages.
#[derive(Debug, Default)]
pub struct HotPages {
    pages: Vec<Page>,
    /// Harvests so far, modulo 256.
    epoch: u8,
    /// Pages the last `rearm` left writable.
    writable: usize,
}

impl HotPages {
    /// Of the pages of an epoch's harvest `log`, those to write-protect again: pages whose
    /// window ends, and those beyond the first `keep` (in address order) that would stay
    /// writable, whose window ends early (see `crate::policy::hot_budget`). A page that is not
    /// re-armed stays in every harvest, so the log keeps naming it until then.
    pub fn rearm(&mut self, log: &DirtyLog, keep: usize) -> DirtyLog {
        self.epoch = self.epoch.wrapping_add(1);
        let epoch = self.epoch;
        let mut writable = 0;
        let rearmed = log.select(|gpa| {
            let index = u64_to_usize(gpa) / PAGE_SIZE;
            if index >= self.pages.len() {
                self.pages.resize(index + 1, Page::default());
            }
            let page = &mut self.pages[index];
            let rearm = if page.left == 0 {
                // Write-protected, so the guest wrote it (a fault): a new window, twice the
                // last if the page came back within the last's length.
                let back_soon = page.window > 0 && epoch.wrapping_sub(page.rearmed) <= page.window;
                page.window = if back_soon {
                    page.window.saturating_mul(2).min(MAX_HOT_EPOCHS)
                } else {
                    HOT_EPOCHS
                };
                page.left = page.window;
                false
            } else {
                page.left -= 1;
                page.left == 0
            };
            if !rearm && writable < keep {
                writable += 1;
                return false;
            }
            page.left = 0;
            page.rearmed = epoch;
            true
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

    /// The lengths of the windows page 5 gets while the guest writes it every epoch, over
    /// `epochs` harvests.
    fn windows_written_every_epoch(hot: &mut HotPages, epochs: usize) -> Vec<usize> {
        let mut windows = Vec::new();
        let mut open = 0;
        for _ in 0..epochs {
            open += 1;
            if hot.rearm(&log(&[5]), usize::MAX).count() == 1 {
                windows.push(open - 1);
                open = 0;
            }
        }
        windows
    }

    #[test]
    fn a_page_that_faults_again_soon_gets_twice_the_window_up_to_the_longest() {
        let mut hot = HotPages::default();
        // Each window ends with a re-arm, and the next epoch's write faults at once.
        let windows = windows_written_every_epoch(&mut hot, 400);
        assert_eq!(windows[..5], [3, 6, 12, 24, 48]);
        assert!(windows[5..]
            .iter()
            .all(|&w| w == usize::from(MAX_HOT_EPOCHS)));
    }

    #[test]
    fn a_page_quiet_for_longer_than_its_window_starts_again_from_the_first() {
        let mut hot = HotPages::default();
        assert_eq!(windows_written_every_epoch(&mut hot, 11), [3, 6]);
        // Write-protected, and not written for 7 epochs, longer than its last window.
        for _ in 0..7 {
            assert_eq!(hot.rearm(&log(&[]), usize::MAX).count(), 0);
        }
        assert_eq!(windows_written_every_epoch(&mut hot, 8), [3]);
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
