//! A polling virtio-net driver (virtio 1.x spec, section 5.1) and its `smoltcp` device.
//!
//! Batching: frames smoltcp transmits are only queued; receive buffers smoltcp has consumed
//! are only put back. [`VirtioNet::flush`] then notifies each queue at most once, so a poll
//! round costs at most two VM exits however many frames it moved. Call it after every
//! `Interface::poll`.
use alloc::alloc::{alloc_zeroed, Layout};

use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use super::mmio::{Mmio, DEVICE_ID_NET};
use super::queue::{Buf, Virtqueue};
use super::Error;

const F_MAC: u64 = 1 << 5;

/// `struct virtio_net_hdr_v1` (with num_buffers): 12 bytes before every frame.
pub const HEADER_LEN: usize = 12;
/// The largest Ethernet frame without FCS (1500-byte MTU).
pub const MAX_FRAME: usize = 1514;
const BUF_LEN: usize = HEADER_LEN + MAX_FRAME;
const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
const MAX_QUEUE_SIZE: u16 = 256;

/// One direction: a queue whose descriptor `i` always points at buffer `i`.
struct Side {
    queue: Virtqueue,
    bufs: *mut u8,
    /// Buffers were added since the last notification.
    pending: bool,
}

// SAFETY: `bufs` is a heap allocation owned by this side alone.
unsafe impl Send for Side {}

impl Side {
    fn new(mmio: &Mmio, index: u16) -> Result<Self, Error> {
        let max = mmio.queue_max(index);
        if max == 0 {
            return Err(Error::QueueUnavailable(index));
        }
        let mut size = max.min(MAX_QUEUE_SIZE);
        if !size.is_power_of_two() {
            size = 1 << (15 - size.leading_zeros());
        }
        let queue = Virtqueue::new(index, size);
        let layout = Layout::from_size_align(BUF_LEN * size as usize, 64).expect("layout");
        // SAFETY: non-zero size; never freed (the device lives for the whole run). Zeroed,
        // so every transmit header starts as "no offloads".
        let bufs = unsafe { alloc_zeroed(layout) };
        assert!(!bufs.is_null(), "out of memory for virtio-net buffers");
        mmio.setup_queue(&queue);
        Ok(Side {
            queue,
            bufs,
            pending: false,
        })
    }

    fn buf(&mut self, id: u16) -> &mut [u8] {
        // SAFETY: id < queue size and the allocation holds size buffers; callers only touch
        // buffers whose descriptor is not owned by the device.
        unsafe { core::slice::from_raw_parts_mut(self.bufs.add(id as usize * BUF_LEN), BUF_LEN) }
    }

    /// Gives the buffer of the next free descriptor to the device (receive side).
    fn post_rx(&mut self) -> bool {
        let Some(id) = self.queue.peek_head() else {
            return false;
        };
        let buf = Buf::write(self.buf(id));
        self.queue.add(&[buf]);
        self.pending = true;
        true
    }
}

/// A virtio-net device.
pub struct VirtioNet {
    mmio: Mmio,
    rx: Side,
    tx: Side,
    mac: [u8; 6],
}

impl VirtioNet {
    /// Initialises the virtio-net device at `mmio_base` and fills its receive queue.
    ///
    /// # Safety
    /// `mmio_base` must be a virtio-mmio window ftvmm listed in the boot block, driven by
    /// nothing else.
    pub unsafe fn new(mmio_base: u64) -> Result<Self, Error> {
        // SAFETY: forwarded from the caller.
        let mmio = unsafe { Mmio::probe(mmio_base, DEVICE_ID_NET)? };
        let features = mmio.negotiate(F_MAC)?;
        let (rx, tx) = match (Side::new(&mmio, RX_QUEUE), Side::new(&mmio, TX_QUEUE)) {
            (Ok(rx), Ok(tx)) => (rx, tx),
            (Err(e), _) | (_, Err(e)) => {
                mmio.fail();
                return Err(e);
            }
        };
        let mut mac = [0x02, 0, 0, 0, 0, 0x01];
        if features & F_MAC != 0 {
            for (i, byte) in mac.iter_mut().enumerate() {
                *byte = mmio.config_u8(i);
            }
        }
        let mut net = VirtioNet { mmio, rx, tx, mac };
        while net.rx.post_rx() {}
        net.mmio.driver_ok();
        net.flush();
        Ok(net)
    }

    /// The MAC address (from config space, or 02:00:00:00:00:01 if the device has none).
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Notifies the device of everything queued since the last call: at most one exit per
    /// queue. Call after each poll round.
    pub fn flush(&mut self) {
        for side in [&mut self.tx, &mut self.rx] {
            if side.pending {
                side.pending = false;
                if side.queue.notify_needed() {
                    self.mmio.notify(side.queue.index());
                }
            }
        }
    }

    /// Reclaims sent buffers; if none is free, kicks the device first (once per full queue,
    /// still batched) so that it sends and releases them.
    fn tx_space(&mut self) -> bool {
        while self.tx.queue.pop_used().is_some() {}
        if self.tx.queue.peek_head().is_some() {
            return true;
        }
        if self.tx.pending {
            self.tx.pending = false;
            self.mmio.notify(TX_QUEUE);
            while self.tx.queue.pop_used().is_some() {}
        }
        self.tx.queue.peek_head().is_some()
    }
}

/// A received frame, still in its receive buffer; the buffer goes back to the device when
/// the token is consumed or dropped.
pub struct RxToken<'a> {
    rx: &'a mut Side,
    id: u16,
    len: usize,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let (id, len) = (self.id, self.len);
        let frame = &self.rx.buf(id)[HEADER_LEN..HEADER_LEN + len];
        f(frame)
        // `self` drops here and reposts the buffer.
    }
}

impl Drop for RxToken<'_> {
    fn drop(&mut self) {
        // The descriptor freed by pop_used is the next free one, so this reposts the same
        // buffer (descriptor i <-> buffer i).
        self.rx.post_rx();
    }
}

/// Room for one frame to send.
pub struct TxToken<'a> {
    tx: &'a mut Side,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        assert!(len <= MAX_FRAME, "frame of {len} bytes exceeds the MTU");
        let id = self
            .tx
            .queue
            .peek_head()
            .expect("tx token without a free descriptor");
        let buf = self.tx.buf(id);
        // The header stays all zero: no checksum offload, no segmentation.
        buf[..HEADER_LEN].fill(0);
        let result = f(&mut buf[HEADER_LEN..HEADER_LEN + len]);
        let desc = Buf {
            addr: buf.as_ptr() as u64,
            len: (HEADER_LEN + len) as u32,
            device_writes: false,
        };
        self.tx.queue.add(&[desc]);
        self.tx.pending = true;
        result
    }
}

impl Device for VirtioNet {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        // A reply may be needed, so only take a frame when there is room to answer.
        if !self.tx_space() {
            return None;
        }
        let (id, written) = self.rx.queue.pop_used()?;
        let len = (written as usize).clamp(HEADER_LEN, BUF_LEN) - HEADER_LEN;
        Some((
            RxToken {
                rx: &mut self.rx,
                id,
                len,
            },
            TxToken { tx: &mut self.tx },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<Self::TxToken<'_>> {
        if !self.tx_space() {
            return None;
        }
        Some(TxToken { tx: &mut self.tx })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        caps
    }
}
