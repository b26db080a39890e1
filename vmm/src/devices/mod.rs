//! Devices: the UART and virtio-mmio transports with virtio-blk and virtio-net.
//!
//! Devices never know where their outputs go: console bytes and network frames are handed to
//! sinks, disk I/O to a backend, all traits defined here so that output commit and disk
//! replication can plug in from above without this crate knowing of them.

pub mod console;
pub mod power;
pub mod serial;
pub mod virtio;

use std::io;

/// Guest memory as devices see it: every write through it marks the VMM-side dirty bitmap,
/// so that a checkpoint sees device DMA as well as vCPU writes.
pub type GuestMemory = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// A device on the MMIO bus, addressed by offset within its window.
pub trait MmioDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Where a device's outgoing byte stream (console) goes.
pub trait ConsoleSink: Send {
    fn write_console(&mut self, bytes: &[u8]);
}

/// Where a network device's transmitted frames go.
pub trait FrameSink: Send {
    fn send_frame(&mut self, frame: &[u8]);
    /// Whether the sink takes another frame now. When it does not, the device leaves the
    /// guest's frames in its queue (backpressure) until the sink's owner wakes it.
    fn has_room(&self) -> bool {
        true
    }
}

/// Storage behind a virtio-blk device.
pub trait BlockBackend: Send {
    /// Size of the image in bytes.
    fn size(&self) -> u64;
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&mut self) -> io::Result<()>;
}
