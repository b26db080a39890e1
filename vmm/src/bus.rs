//! The I/O buses: port I/O and MMIO exits routed to the device whose window they hit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

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
    pio_exits: AtomicU64,
    mmio_exits: AtomicU64,
}

/// How many VM exits the buses have served (each costs 30-50 us under PVM).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ExitCounts {
    pub pio: u64,
    pub mmio: u64,
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

    pub fn exit_counts(&self) -> ExitCounts {
        ExitCounts {
            pio: self.pio_exits.load(Ordering::Relaxed),
            mmio: self.mmio_exits.load(Ordering::Relaxed),
        }
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) {
        self.pio_exits.fetch_add(1, Ordering::Relaxed);
        match find(&self.pio, port.into()) {
            Some((w, off)) => lock(&w.device).write(off, data),
            None => tracing::trace!(port, "write to unclaimed port"),
        }
    }

    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        self.pio_exits.fetch_add(1, Ordering::Relaxed);
        match find(&self.pio, port.into()) {
            Some((w, off)) => lock(&w.device).read(off, data),
            None => data.fill(0xff),
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.mmio_exits.fetch_add(1, Ordering::Relaxed);
        match find(&self.mmio, addr) {
            Some((w, off)) => lock(&w.device).write(off, data),
            None => tracing::warn!(addr, "MMIO write outside every device"),
        }
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        self.mmio_exits.fetch_add(1, Ordering::Relaxed);
        match find(&self.mmio, addr) {
            Some((w, off)) => lock(&w.device).read(off, data),
            None => data.fill(0xff),
        }
    }
}
