//! The global allocator: talc over the free RAM the boot block describes (region 0 from
//! `heap_start`, and all of region 1 when RAM continues above the MMIO hole).
use guest_abi::BootInfo;
use talc::{ErrOnOom, Span, Talc, Talck};

use crate::sync::RawSpinLock;

#[cfg_attr(not(test), global_allocator)]
static ALLOCATOR: Talck<RawSpinLock, ErrOnOom> = Talck::new(Talc::new(ErrOnOom));

/// Hands the free RAM to the allocator. Returns the number of bytes claimed.
///
/// # Safety
/// Once only, before any allocation, and the memory described as free must really be unused.
pub(crate) unsafe fn init(boot: &BootInfo) -> u64 {
    let mut talc = ALLOCATOR.lock();
    let mut claimed = 0;
    for (i, region) in boot.mem_regions().iter().enumerate() {
        let end = region.start.saturating_add(region.size);
        let start = if i == 0 {
            boot.heap_start.max(region.start)
        } else {
            region.start
        };
        // Never hand out page 0 (null) even if a region claims it.
        let start = start.max(0x1000);
        if end <= start + 4096 {
            continue;
        }
        let span = Span::new(start as *mut u8, end as *mut u8);
        // SAFETY: the boot block says this RAM is free and identity-mapped; the caller
        // guarantees this runs once.
        if let Ok(span) = unsafe { talc.claim(span) } {
            claimed += span.size() as u64;
        }
    }
    claimed
}
