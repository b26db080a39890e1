//! Test helpers: guest memory, and a minimal driver that negotiates through MMIO registers and
//! lays out split virtqueues in guest memory.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::virtio::GuestMemory;
use crate::devices::MmioDevice;

pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;

/// 16 MiB of guest memory at address 0.
pub fn test_memory() -> GuestMemory {
    GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
}

pub fn rd(d: &mut impl MmioDevice, off: u64) -> u32 {
    let mut b = [0u8; 4];
    d.read(off, &mut b);
    u32::from_le_bytes(b)
}

pub fn wr(d: &mut impl MmioDevice, off: u64, v: u32) {
    d.write(off, &v.to_le_bytes());
}

/// ACKNOWLEDGE, DRIVER, features (VERSION_1 | `features`), FEATURES_OK.
pub fn negotiate(d: &mut impl MmioDevice, features: u64) {
    let f = features | (1 << 32);
    wr(d, 0x070, 1);
    wr(d, 0x070, 1 | 2);
    wr(d, 0x024, 0);
    wr(d, 0x020, (f & 0xffff_ffff) as u32);
    wr(d, 0x024, 1);
    wr(d, 0x020, (f >> 32) as u32);
    wr(d, 0x070, 1 | 2 | 8);
    assert_eq!(rd(d, 0x070), 1 | 2 | 8, "FEATURES_OK refused");
}

pub fn driver_ok(d: &mut impl MmioDevice) {
    wr(d, 0x070, 1 | 2 | 8 | 4);
    assert_eq!(rd(d, 0x070), 1 | 2 | 8 | 4, "activation failed");
}

/// Where a split virtqueue lives: descriptors at `base`, avail ring at +0x1000, used at +0x2000.
#[derive(Clone, Copy, Debug)]
pub struct QueueLayout {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub size: u16,
}

impl QueueLayout {
    pub fn new(base: u64, size: u16) -> Self {
        QueueLayout {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            size,
        }
    }
}

pub fn setup_queue(d: &mut impl MmioDevice, index: u32, l: &QueueLayout) {
    wr(d, 0x030, index);
    wr(d, 0x038, u32::from(l.size));
    wr(d, 0x080, (l.desc & 0xffff_ffff) as u32);
    wr(d, 0x084, (l.desc >> 32) as u32);
    wr(d, 0x090, (l.avail & 0xffff_ffff) as u32);
    wr(d, 0x094, (l.avail >> 32) as u32);
    wr(d, 0x0a0, (l.used & 0xffff_ffff) as u32);
    wr(d, 0x0a4, (l.used >> 32) as u32);
    wr(d, 0x044, 1);
}

/// The driver side of one split virtqueue.
#[derive(Clone, Debug)]
pub struct DriverQueue {
    pub layout: QueueLayout,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl DriverQueue {
    pub fn new(layout: QueueLayout) -> Self {
        DriverQueue {
            layout,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// Writes a raw descriptor at `index`.
    pub fn write_desc(
        &self,
        mem: &GuestMemory,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let a = GuestAddress(self.layout.desc + 16 * u64::from(index));
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, a).unwrap();
    }

    /// Publishes `head` in the avail ring.
    pub fn publish(&mut self, mem: &GuestMemory, head: u16) {
        let slot = self.avail_idx % self.layout.size;
        mem.write_obj(
            head,
            GuestAddress(self.layout.avail + 4 + 2 * u64::from(slot)),
        )
        .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.layout.avail + 2))
            .unwrap();
    }

    /// Adds a chain of (addr, len, device-writable) buffers and publishes it; returns the head.
    pub fn add_chain(&mut self, mem: &GuestMemory, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let idx = self.next_desc;
            let next = (idx + 1) % self.layout.size;
            let mut flags = if write { VRING_DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            self.write_desc(mem, idx, addr, len, flags, next);
            self.next_desc = next;
        }
        self.publish(mem, head);
        head
    }

    /// New used-ring entries (id, len) since the last call.
    pub fn take_used(&mut self, mem: &GuestMemory) -> Vec<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.layout.used + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let slot = u64::from(self.used_seen % self.layout.size);
            let e = GuestAddress(self.layout.used + 4 + 8 * slot);
            let id: u32 = mem.read_obj(e).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(e.0 + 4)).unwrap();
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}
