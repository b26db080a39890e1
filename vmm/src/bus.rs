//! The I/O buses: port I/O and MMIO exits routed to the device whose window they hit.

use std::sync::{Arc, Mutex};

use crate::devices::MmioDevice;

/// A device shared between the bus (vCPU threads) and its owner (save/restore, workers).
pub type SharedDevice = Arc<Mutex<dyn MmioDevice>>;

struct Window {
    base: u64,
    len: u64,
    device: SharedDevice,
}

/// Port I/O and MMIO windows; accesses outside every window read as all-ones and are ignored.
#[derive(Default)]
pub struct Bus {
    pio: Vec<Window>,
    mmio: Vec<Window>,
}

fn find(windows: &[Window], addr: u64) -> Option<(&Window, u64)> {
    windows
        .iter()
        .find(|w| addr >= w.base && addr - w.base < w.len)
        .map(|w| (w, addr - w.base))
}

fn lock(device: &SharedDevice) -> std::sync::MutexGuard<'_, dyn MmioDevice + 'static> {
    // A device whose lock was poisoned by a panicking thread keeps serving: its state is
    // plain registers, and the VM's outcome already records the fault.
    device.lock().unwrap_or_else(|e| e.into_inner())
}

impl Bus {
    pub fn add_pio(&mut self, base: u16, len: u16, device: SharedDevice) {
        self.pio.push(Window {
            base: base.into(),
            len: len.into(),
            device,
        });
    }

    pub fn add_mmio(&mut self, base: u64, len: u64, device: SharedDevice) {
        self.mmio.push(Window { base, len, device });
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) {
        match find(&self.pio, port.into()) {
            Some((w, off)) => lock(&w.device).write(off, data),
            None => tracing::trace!(port, "write to unclaimed port"),
        }
    }

    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        match find(&self.pio, port.into()) {
            Some((w, off)) => lock(&w.device).read(off, data),
            None => data.fill(0xff),
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        match find(&self.mmio, addr) {
            Some((w, off)) => lock(&w.device).write(off, data),
            None => tracing::warn!(addr, "MMIO write outside every device"),
        }
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match find(&self.mmio, addr) {
            Some((w, off)) => lock(&w.device).read(off, data),
            None => data.fill(0xff),
        }
    }
}
