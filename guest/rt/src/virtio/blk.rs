//! A polling virtio-blk driver (virtio 1.x spec, section 5.2) with a batched API: many
//! requests are made available, the device is notified ONCE, then the used ring is polled.
use alloc::alloc::{alloc_zeroed, Layout};
use alloc::vec;
use alloc::vec::Vec;

use super::mmio::{Mmio, DEVICE_ID_BLK};
use super::queue::{Buf, Virtqueue};
use super::Error;

/// Bytes per sector (the unit of virtio-blk addresses, whatever the device's block size).
pub const SECTOR_SIZE: usize = 512;

const F_SIZE_MAX: u64 = 1 << 1;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;

const S_OK: u8 = 0;
/// A status the device never writes, to spot requests it did not complete.
const S_PENDING: u8 = 0xff;

/// Largest data buffer per request (split above it; also bounded by the device's size_max).
const MAX_REQUEST_BYTES: usize = 256 * 1024;
/// Largest queue we ask for.
const MAX_QUEUE_SIZE: u16 = 256;

#[repr(C)]
#[derive(Clone, Copy)]
struct ReqHeader {
    kind: u32,
    reserved: u32,
    sector: u64,
}

/// One request of a batch.
pub enum Request<'a> {
    /// Read `buf.len()` bytes (a multiple of [`SECTOR_SIZE`]) from `sector`.
    Read { sector: u64, buf: &'a mut [u8] },
    /// Write `buf` (a multiple of [`SECTOR_SIZE`]) at `sector`.
    Write { sector: u64, buf: &'a [u8] },
    /// Make everything written so far durable.
    Flush,
}

/// A virtio-blk device.
pub struct VirtioBlk {
    mmio: Mmio,
    queue: Virtqueue,
    capacity: u64,
    features: u64,
    max_request: usize,
    /// Request header and status byte of the request whose chain starts at each descriptor.
    headers: *mut ReqHeader,
    status: *mut u8,
    /// Which request of the current batch each in-flight head belongs to.
    inflight: Vec<usize>,
}

impl VirtioBlk {
    /// Initialises the virtio-blk device at `mmio_base`.
    ///
    /// # Safety
    /// `mmio_base` must be a virtio-mmio window ftvmm listed in the boot block, driven by
    /// nothing else.
    pub unsafe fn new(mmio_base: u64) -> Result<Self, Error> {
        // SAFETY: forwarded from the caller.
        let mmio = unsafe { Mmio::probe(mmio_base, DEVICE_ID_BLK)? };
        let features = mmio.negotiate(F_SIZE_MAX | F_RO | F_FLUSH)?;
        let max = mmio.queue_max(0);
        if max == 0 {
            mmio.fail();
            return Err(Error::QueueUnavailable(0));
        }
        let size = prev_power_of_two(max.min(MAX_QUEUE_SIZE));
        let queue = Virtqueue::new(0, size);
        mmio.setup_queue(&queue);
        let capacity = mmio.config_u64(0);
        let mut max_request = MAX_REQUEST_BYTES;
        if features & F_SIZE_MAX != 0 {
            let size_max = mmio.config_u32(8) as usize / SECTOR_SIZE * SECTOR_SIZE;
            if size_max > 0 {
                max_request = max_request.min(size_max);
            }
        }
        let n = size as usize;
        let layout = Layout::from_size_align(n * (16 + 1), 16).expect("layout");
        // SAFETY: non-zero size; never freed (the device lives for the whole run).
        let mem = unsafe { alloc_zeroed(layout) };
        assert!(!mem.is_null(), "out of memory for virtio-blk");
        mmio.driver_ok();
        Ok(VirtioBlk {
            mmio,
            queue,
            capacity,
            features,
            max_request,
            headers: mem as *mut ReqHeader,
            // SAFETY: the status bytes follow the n headers inside the allocation.
            status: unsafe { mem.add(n * 16) },
            inflight: vec![usize::MAX; n],
        })
    }

    /// Disk size in sectors of [`SECTOR_SIZE`] bytes.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity
    }

    /// Disk size in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity.saturating_mul(SECTOR_SIZE as u64)
    }

    /// Whether the device is read-only.
    pub fn read_only(&self) -> bool {
        self.features & F_RO != 0
    }

    /// Whether the device has a volatile cache that [`Request::Flush`] writes back.
    pub fn has_flush(&self) -> bool {
        self.features & F_FLUSH != 0
    }

    /// Reads sectors starting at `sector` into `buf` (split into as many requests as needed,
    /// all in one batch).
    pub fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), Error> {
        let chunk = self.max_request;
        let mut reqs: Vec<Request> = buf
            .chunks_mut(chunk)
            .enumerate()
            .map(|(i, b)| Request::Read {
                sector: sector + (i * chunk / SECTOR_SIZE) as u64,
                buf: b,
            })
            .collect();
        self.execute(&mut reqs)
    }

    /// Writes `buf` at `sector` (split into as many requests as needed, all in one batch).
    pub fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), Error> {
        let chunk = self.max_request;
        let mut reqs: Vec<Request> = buf
            .chunks(chunk)
            .enumerate()
            .map(|(i, b)| Request::Write {
                sector: sector + (i * chunk / SECTOR_SIZE) as u64,
                buf: b,
            })
            .collect();
        self.execute(&mut reqs)
    }

    /// Flushes the device's write cache (a no-op when it has none).
    pub fn flush(&mut self) -> Result<(), Error> {
        if !self.has_flush() {
            return Ok(());
        }
        self.execute(&mut [Request::Flush])
    }

    /// Runs a batch: as many requests as the queue holds are made available, the device is
    /// notified once, and the used ring is polled until they complete; repeated until all
    /// are done. Requests are independent (the device may complete them in any order); put a
    /// [`Request::Flush`] in a later batch to order it after writes. Returns the first error.
    pub fn execute(&mut self, reqs: &mut [Request]) -> Result<(), Error> {
        for req in reqs.iter() {
            self.check(req)?;
        }
        let mut result = Ok(());
        let mut next = 0;
        let mut outstanding = 0usize;
        while next < reqs.len() || outstanding > 0 {
            let mut added = false;
            while next < reqs.len() {
                match self.submit(&mut reqs[next], next) {
                    Some(()) => {
                        next += 1;
                        outstanding += 1;
                        added = true;
                    }
                    None => break,
                }
            }
            if added && self.queue.notify_needed() {
                self.mmio.notify(self.queue.index());
            }
            // Poll until at least one completes, then reap everything that has.
            loop {
                let mut reaped = false;
                while let Some((head, _len)) = self.queue.pop_used() {
                    reaped = true;
                    outstanding -= 1;
                    self.inflight[head as usize] = usize::MAX;
                    // SAFETY: head < queue size; the device wrote the status before
                    // publishing the used entry (and pop_used fenced).
                    let status =
                        unsafe { core::ptr::read_volatile(self.status.add(head as usize)) };
                    if status != S_OK && result.is_ok() {
                        result = Err(Error::Io(status));
                    }
                }
                if reaped || outstanding == 0 {
                    break;
                }
                core::hint::spin_loop();
            }
        }
        result
    }

    fn check(&self, req: &Request) -> Result<(), Error> {
        let (sector, len) = match req {
            Request::Read { sector, buf } => (*sector, buf.len()),
            Request::Write { sector, buf } => {
                if self.read_only() {
                    return Err(Error::ReadOnly);
                }
                (*sector, buf.len())
            }
            Request::Flush => return Ok(()),
        };
        if len == 0 || len % SECTOR_SIZE != 0 || len > u32::MAX as usize {
            return Err(Error::BadLength);
        }
        let end = sector
            .checked_add((len / SECTOR_SIZE) as u64)
            .ok_or(Error::OutOfRange)?;
        if end > self.capacity {
            return Err(Error::OutOfRange);
        }
        Ok(())
    }

    /// Makes one request available; `None` when the queue is full.
    fn submit(&mut self, req: &mut Request, index: usize) -> Option<()> {
        let needed = if matches!(req, Request::Flush) { 2 } else { 3 };
        let head = self.queue.peek_head()?;
        if (self.queue.num_free() as usize) < needed {
            return None;
        }
        let (kind, sector) = match req {
            Request::Read { sector, .. } => (T_IN, *sector),
            Request::Write { sector, .. } => (T_OUT, *sector),
            Request::Flush => (T_FLUSH, 0),
        };
        // SAFETY: head < queue size; this slot belongs to the chain we are about to add,
        // and no in-flight request uses it (its descriptor is free).
        let (header, status) = unsafe {
            let h = self.headers.add(head as usize);
            h.write_volatile(ReqHeader {
                kind,
                reserved: 0,
                sector,
            });
            let s = self.status.add(head as usize);
            s.write_volatile(S_PENDING);
            (h, s)
        };
        let header = Buf {
            addr: header as u64,
            len: 16,
            device_writes: false,
        };
        let status = Buf {
            addr: status as u64,
            len: 1,
            device_writes: true,
        };
        let added = match req {
            Request::Read { buf, .. } => self.queue.add(&[header, Buf::write(buf), status]),
            Request::Write { buf, .. } => self.queue.add(&[header, Buf::read(buf), status]),
            Request::Flush => self.queue.add(&[header, status]),
        };
        debug_assert_eq!(added, Some(head));
        self.inflight[head as usize] = index;
        Some(())
    }
}

fn prev_power_of_two(n: u16) -> u16 {
    if n.is_power_of_two() {
        n
    } else {
        1 << (15 - n.leading_zeros())
    }
}
