//! A split virtqueue (virtio 1.x spec, section 2.7), driver side, polled.
//!
//! The rings live in one zeroed, page-aligned heap allocation that is never freed (devices
//! keep their queues for the whole run). All ring accesses the device can see are volatile,
//! with a release fence before publishing the avail index and an acquire fence after reading
//! the used index.
use alloc::alloc::{alloc_zeroed, Layout};
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
/// Driver to device: do not interrupt us, we poll.
const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Device to driver: no notification needed right now.
const USED_F_NO_NOTIFY: u16 = 1;

#[repr(C)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

#[repr(C)]
struct UsedElem {
    id: u32,
    len: u32,
}

/// One buffer of a chain: guest address, length, and whether the device writes it.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub device_writes: bool,
}

impl Buf {
    /// A buffer the device reads.
    pub fn read(data: &[u8]) -> Self {
        Buf {
            addr: data.as_ptr() as u64,
            len: data.len() as u32,
            device_writes: false,
        }
    }

    /// A buffer the device writes.
    pub fn write(data: &mut [u8]) -> Self {
        Buf {
            addr: data.as_mut_ptr() as u64,
            len: data.len() as u32,
            device_writes: true,
        }
    }
}

/// A split virtqueue.
pub struct Virtqueue {
    index: u16,
    size: u16,
    desc: *mut Desc,
    /// flags, idx, ring[size], used_event: all u16.
    avail: *mut u16,
    /// flags: u16, idx: u16, ring[size]: UsedElem, avail_event: u16.
    used: *mut u8,
    free_head: u16,
    num_free: u16,
    /// Our copy of avail.idx (the next slot to fill).
    avail_idx: u16,
    /// The next used.idx entry to consume.
    last_used: u16,
}

// SAFETY: the raw pointers refer to a heap allocation owned by this queue alone.
unsafe impl Send for Virtqueue {}

impl Virtqueue {
    /// Allocates queue `index` with `size` entries (a power of two, at most 32768).
    pub fn new(index: u16, size: u16) -> Self {
        assert!(
            size.is_power_of_two() && size <= 32768,
            "bad virtqueue size {size}"
        );
        let n = size as usize;
        let avail_off = 16 * n;
        let used_off = (avail_off + 2 * (3 + n) + 4095) & !4095;
        let total = used_off + 4 + 8 * n + 2;
        let layout = Layout::from_size_align(total, 4096).expect("virtqueue layout");
        // SAFETY: the layout has a non-zero size.
        let mem = unsafe { alloc_zeroed(layout) };
        assert!(!mem.is_null(), "out of memory for a virtqueue");
        let desc = mem as *mut Desc;
        for i in 0..size {
            // SAFETY: i < size, inside the descriptor table; builds the free list.
            unsafe { addr_of_mut!((*desc.add(i as usize)).next).write(i.wrapping_add(1)) };
        }
        // SAFETY: offsets are inside the allocation (see `total`).
        let (avail, used) = unsafe { (mem.add(avail_off) as *mut u16, mem.add(used_off)) };
        // SAFETY: avail.flags is the first u16 of the driver area.
        unsafe { write_volatile(avail, AVAIL_F_NO_INTERRUPT) };
        Virtqueue {
            index,
            size,
            desc,
            avail,
            used,
            free_head: 0,
            num_free: size,
            avail_idx: 0,
            last_used: 0,
        }
    }

    /// The queue's index within its device.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// The number of entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest addresses of the descriptor table, driver (avail) and device (used) areas.
    pub fn addresses(&self) -> (u64, u64, u64) {
        (self.desc as u64, self.avail as u64, self.used as u64)
    }

    /// Free descriptors.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// The descriptor id the next [`add`](Self::add) will use as its head, if any is free.
    /// Drivers that tie one buffer to each descriptor use it to pick the buffer.
    pub fn peek_head(&self) -> Option<u16> {
        (self.num_free > 0).then_some(self.free_head)
    }

    /// Chains `bufs` into free descriptors and makes the chain available to the device (no
    /// notification: see [`notify_needed`](Self::notify_needed)). Returns the head id, or
    /// `None` when there are not enough free descriptors.
    pub fn add(&mut self, bufs: &[Buf]) -> Option<u16> {
        if bufs.is_empty() || bufs.len() > self.num_free as usize {
            return None;
        }
        let head = self.free_head;
        let mut id = head;
        for (i, buf) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let d = self.desc_ptr(id);
            // SAFETY: `id` is a free descriptor (< size); the device does not read it until
            // the chain is published below. `next` already links to the next free one.
            unsafe {
                write_volatile(addr_of_mut!((*d).addr), buf.addr);
                write_volatile(addr_of_mut!((*d).len), buf.len);
                let flags = if buf.device_writes { DESC_F_WRITE } else { 0 }
                    | if last { 0 } else { DESC_F_NEXT };
                write_volatile(addr_of_mut!((*d).flags), flags);
                let next = read_volatile(addr_of_mut!((*d).next));
                if last {
                    self.free_head = next;
                } else {
                    id = next;
                }
            }
        }
        self.num_free -= bufs.len() as u16;
        let slot = (self.avail_idx % self.size) as usize;
        // SAFETY: ring[slot] is inside the driver area (offset 2 u16s + slot).
        unsafe { write_volatile(self.avail.add(2 + slot), head) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // The descriptors and ring entry must be visible before the new index.
        fence(Ordering::Release);
        // SAFETY: avail.idx is the second u16 of the driver area.
        unsafe { write_volatile(self.avail.add(1), self.avail_idx) };
        Some(head)
    }

    /// Whether the device wants a notification for what was added (it may say it is busy
    /// polling). Call once per batch, then notify through the transport.
    pub fn notify_needed(&self) -> bool {
        // The avail index store must be ordered before reading the device's flags.
        fence(Ordering::SeqCst);
        // SAFETY: used.flags is the first u16 of the device area.
        let flags = unsafe { read_volatile(self.used as *const u16) };
        flags & USED_F_NO_NOTIFY == 0
    }

    /// Takes the next completed chain, if any: `(head id, bytes the device wrote)`. Its
    /// descriptors are free again once this returns.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        // SAFETY: used.idx is the second u16 of the device area.
        let used_idx = unsafe { read_volatile((self.used as *const u16).add(1)) };
        if used_idx == self.last_used {
            return None;
        }
        // Read the element only after seeing the index that covers it.
        fence(Ordering::Acquire);
        let slot = (self.last_used % self.size) as usize;
        // SAFETY: ring[slot] is inside the device area (after flags and idx).
        let (id, len) = unsafe {
            let elem = self.used.add(4 + 8 * slot) as *const UsedElem;
            (
                read_volatile(addr_of!((*elem).id)),
                read_volatile(addr_of!((*elem).len)),
            )
        };
        self.last_used = self.last_used.wrapping_add(1);
        let head = id as u16;
        assert!(
            head < self.size,
            "device returned descriptor {id} of {}",
            self.size
        );
        self.free_chain(head);
        Some((head, len))
    }

    fn free_chain(&mut self, head: u16) {
        let mut id = head;
        let mut count = 1;
        loop {
            let d = self.desc_ptr(id);
            // SAFETY: `id` < size (head checked; `next` fields were written by us).
            let (flags, next) = unsafe {
                (
                    read_volatile(addr_of_mut!((*d).flags)),
                    read_volatile(addr_of_mut!((*d).next)),
                )
            };
            if flags & DESC_F_NEXT == 0 {
                // SAFETY: as above; link the chain's tail to the old free list.
                unsafe { write_volatile(addr_of_mut!((*d).next), self.free_head) };
                break;
            }
            id = next;
            count += 1;
        }
        self.free_head = head;
        self.num_free += count;
    }

    fn desc_ptr(&self, id: u16) -> *mut Desc {
        debug_assert!(id < self.size);
        // SAFETY: callers pass ids < size, inside the descriptor table.
        unsafe { self.desc.add(id as usize) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plays the device: takes every available chain, returns it used with `written` bytes.
    fn device_complete(q: &Virtqueue, seen: &mut u16, written: u32) -> usize {
        let size = q.size() as usize;
        let mut done = 0;
        // SAFETY (test): reads and writes the rings like a device would, inside the allocation.
        unsafe {
            let avail_idx = read_volatile(q.avail.add(1));
            let used_idx_ptr = (q.used as *mut u16).add(1);
            while *seen != avail_idx {
                let head = read_volatile(q.avail.add(2 + (*seen as usize % size)));
                let mut id = head;
                while read_volatile(addr_of!((*q.desc.add(id as usize)).flags)) & DESC_F_NEXT != 0 {
                    id = read_volatile(addr_of!((*q.desc.add(id as usize)).next));
                }
                let used_idx = read_volatile(used_idx_ptr);
                let elem = q.used.add(4 + 8 * (used_idx as usize % size)) as *mut UsedElem;
                write_volatile(
                    elem,
                    UsedElem {
                        id: head as u32,
                        len: written,
                    },
                );
                write_volatile(used_idx_ptr, used_idx.wrapping_add(1));
                *seen = seen.wrapping_add(1);
                done += 1;
            }
        }
        done
    }

    #[test]
    fn chains_fill_and_recycle() {
        let mut q = Virtqueue::new(0, 8);
        let mut seen = 0u16;
        let mut data = [0u8; 16];
        let three = [
            Buf::read(&data[..4]),
            Buf::read(&data[4..8]),
            Buf::write(&mut data[8..]),
        ];
        // Many rounds so the 16-bit indices and the free list wrap around.
        for round in 0..30_000u32 {
            let a = q.add(&three).expect("room for one chain");
            let b = q.add(&three[..2]).expect("room for a second chain");
            assert_ne!(a, b);
            assert_eq!(q.num_free(), 3);
            assert!(q.add(&three[..]).is_some());
            assert!(q.add(&three[..1]).is_none(), "queue is full");
            assert!(q.pop_used().is_none());
            assert_eq!(device_complete(&q, &mut seen, round), 3);
            let mut heads = [q.pop_used(), q.pop_used(), q.pop_used()];
            assert!(q.pop_used().is_none());
            heads.sort();
            assert!(heads.iter().all(|h| h.map(|(_, len)| len) == Some(round)));
            assert_eq!(q.num_free(), 8);
        }
        assert!(q.notify_needed());
    }
}
