//! The virtio-mmio transport, modern interface (version 2), virtio 1.x spec §4.2.2.
//!
//! The transport owns the registers and the driver's queue configuration. When the driver sets
//! DRIVER_OK after a successful FEATURES_OK negotiation, it validates the queues and hands copies
//! of them to the [`VirtioDevice`], which owns them from then on (it advances `next_avail` and
//! `next_used`); saving asks the device for their live state.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{DeviceError, GuestMemory, Interrupt, QueueSnapshot, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::MmioDevice;

/// "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// Modern (non-legacy) virtio-mmio.
pub const MMIO_VERSION: u32 = 2;
/// Vendor ID reported to the guest ("FTVM").
pub const MMIO_VENDOR_ID: u32 = 0x4d56_5446;
/// Size of one device's MMIO window; config space starts at 0x100.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_SHM_SEL: u64 = 0x0ac;
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_BASE_HIGH: u64 = 0x0bc;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const REG_CONFIG: u64 = 0x100;

/// Errors restoring a transport from saved state.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("saved state has {saved} queues but the device has {device}")]
    QueueCount { saved: usize, device: usize },
    #[error("saved queue {index} has max size {saved} but the device offers {device}")]
    QueueMaxSize {
        index: usize,
        saved: u16,
        device: u16,
    },
    #[error("saved queue {index} is invalid: {source}")]
    InvalidQueue {
        index: usize,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("cannot restore the device: {0}")]
    Device(#[from] DeviceError),
}

/// Saved state of the transport registers and queues.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TransportState {
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub activated: bool,
    pub queues: Vec<QueueSnapshot>,
}

/// Saved state of a transport and its device.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct MmioState<S> {
    pub transport: TransportState,
    pub device: S,
}

/// A virtio-mmio transport around device `D`; put it on the MMIO bus at a
/// [`MMIO_WINDOW_SIZE`]-byte window.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    /// The driver's queue configuration (register view). Once activated, the device owns the
    /// live copies.
    queues: Vec<Queue>,
    config_generation: u32,
    activated: bool,
}

fn new_queues(max_sizes: &[u16]) -> Vec<Queue> {
    max_sizes
        .iter()
        .map(|&max| {
            // A device offering an invalid max size is a programming error, not guest input;
            // fall back to a queue size that is always valid rather than panicking.
            Queue::new(max).unwrap_or_else(|e| {
                tracing::error!("virtio device queue max size {max} is invalid ({e}); using 256");
                Queue::new(256).unwrap_or_default()
            })
        })
        .collect()
}

/// Copies a queue (virtio-queue's `Queue` is not `Clone`).
fn copy_queue(q: &Queue) -> Result<Queue, virtio_queue::Error> {
    Queue::try_from(q.state())
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// A transport for `device` whose queues live in `mem`. No irq eventfd: set one with
    /// [`MmioTransport::set_irq`] if the guest uses interrupts.
    pub fn new(device: D, mem: GuestMemory) -> Self {
        let queues = new_queues(device.queue_max_sizes());
        MmioTransport {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new(None)),
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            config_generation: 0,
            activated: false,
        }
    }

    /// Sets (or clears) the eventfd signalled when the device raises an interrupt.
    pub fn set_irq(&self, irq: Option<EventFd>) {
        self.interrupt.set_irq(irq);
    }

    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// Device status register value.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Stops the device's background guest-memory writes (see [`VirtioDevice::pause`]).
    pub fn pause(&mut self) {
        self.device.pause();
    }

    pub fn resume(&mut self) {
        self.device.resume();
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | (1u64 << VIRTIO_F_VERSION_1)
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue configuration may change only before DRIVER_OK and while the queue is not ready.
    fn queue_config_writable(&mut self) -> Option<&mut Queue> {
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            tracing::warn!("virtio-mmio: queue config write after DRIVER_OK ignored");
            return None;
        }
        let sel = self.queue_sel;
        match self.selected_queue() {
            Some(q) if !q.ready() => Some(q),
            Some(_) => {
                tracing::warn!("virtio-mmio: write to ready queue {sel} ignored");
                None
            }
            None => {
                tracing::warn!("virtio-mmio: write to nonexistent queue {sel} ignored");
                None
            }
        }
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            REG_MAGIC => MMIO_MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => MMIO_VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => (self.offered_features() & 0xffff_ffff) as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            // No shared memory regions: their length reads as -1.
            REG_SHM_LEN_LOW..=REG_SHM_BASE_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::warn!("virtio-mmio: read of unknown/write-only register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES => self.write_driver_features(v),
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM => {
                if let Some(q) = self.queue_config_writable() {
                    // Queue::set_size rejects (and logs) sizes that are not a power of two or
                    // exceed the maximum; activation then fails on the invalid queue.
                    match u16::try_from(v) {
                        Ok(size) => q.set_size(size),
                        Err(_) => tracing::warn!("virtio-mmio: queue size {v} ignored"),
                    }
                }
            }
            REG_QUEUE_READY => {
                if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
                    tracing::warn!("virtio-mmio: QueueReady write after DRIVER_OK ignored");
                } else if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            REG_QUEUE_NOTIFY => self.notify(v),
            REG_INTERRUPT_ACK => self.interrupt.ack(v),
            REG_STATUS => self.set_status(v),
            REG_QUEUE_DESC_LOW => self.with_queue(|q| q.set_desc_table_address(Some(v), None)),
            REG_QUEUE_DESC_HIGH => self.with_queue(|q| q.set_desc_table_address(None, Some(v))),
            REG_QUEUE_DRIVER_LOW => self.with_queue(|q| q.set_avail_ring_address(Some(v), None)),
            REG_QUEUE_DRIVER_HIGH => self.with_queue(|q| q.set_avail_ring_address(None, Some(v))),
            REG_QUEUE_DEVICE_LOW => self.with_queue(|q| q.set_used_ring_address(Some(v), None)),
            REG_QUEUE_DEVICE_HIGH => self.with_queue(|q| q.set_used_ring_address(None, Some(v))),
            REG_SHM_SEL => {}
            _ => tracing::warn!("virtio-mmio: write of unknown/read-only register {offset:#x}"),
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.queue_config_writable() {
            f(q);
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        // Features may be written only between DRIVER and FEATURES_OK (§3.1.1).
        if self.status & VIRTIO_CONFIG_S_DRIVER == 0
            || self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
        {
            tracing::warn!(
                "virtio-mmio: DriverFeatures write in status {:#x} ignored",
                self.status
            );
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
            sel => tracing::warn!("virtio-mmio: DriverFeatures write with select {sel} ignored"),
        }
    }

    fn notify(&mut self, index: u32) {
        if !self.activated {
            tracing::warn!("virtio-mmio: notify of queue {index} before DRIVER_OK ignored");
            return;
        }
        match u16::try_from(index) {
            Ok(i) if usize::from(i) < self.queues.len() => self.device.queue_notify(i),
            _ => tracing::warn!("virtio-mmio: notify of nonexistent queue {index} ignored"),
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if v & old != old {
            // The driver may only add bits; clearing needs a reset (§2.1.2).
            tracing::warn!("virtio-mmio: status {v:#x} clears bits of {old:#x}; ignored");
            return;
        }
        let mut new = v;
        let added = new & !old;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.offered_features();
            let acked = self.driver_features;
            if acked & !offered != 0 || acked & (1u64 << VIRTIO_F_VERSION_1) == 0 {
                // Leaving FEATURES_OK clear tells the driver the subset is unsupported.
                tracing::warn!(
                    "virtio-mmio: driver features {acked:#x} not acceptable (offered {offered:#x})"
                );
                new &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            if new & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
                tracing::warn!("virtio-mmio: DRIVER_OK without FEATURES_OK ignored");
                new &= !VIRTIO_CONFIG_S_DRIVER_OK;
            } else if let Err(e) = self.activate() {
                tracing::warn!("virtio-mmio: device activation failed: {e}");
                new |= VIRTIO_CONFIG_S_NEEDS_RESET;
                self.interrupt.signal_config_change();
            }
        }
        self.status = new;
    }

    fn activate(&mut self) -> Result<(), String> {
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            if !q.is_valid(&self.mem) {
                return Err(format!("queue {i} is not ready or not in guest memory"));
            }
            queues.push(copy_queue(q).map_err(|e| format!("queue {i}: {e}"))?);
        }
        self.device
            .activate(
                self.mem.clone(),
                queues,
                self.interrupt.clone(),
                self.driver_features,
            )
            .map_err(|e| e.to_string())?;
        self.activated = true;
        Ok(())
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
        }
        self.activated = false;
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt.set_status(0);
        for q in &mut self.queues {
            q.reset();
        }
    }

    /// Snapshot of the transport and device. For a consistent snapshot the vCPUs must not be
    /// running and the device paused (see [`VirtioDevice::pause`]).
    pub fn save_state(&self) -> MmioState<D::State> {
        let queues: Vec<QueueSnapshot> = if self.activated {
            self.device
                .queue_states()
                .into_iter()
                .map(Into::into)
                .collect()
        } else {
            self.queues.iter().map(|q| q.state().into()).collect()
        };
        MmioState {
            transport: TransportState {
                status: self.status,
                device_features_sel: self.device_features_sel,
                driver_features_sel: self.driver_features_sel,
                driver_features: self.driver_features,
                queue_sel: self.queue_sel,
                interrupt_status: self.interrupt.status(),
                config_generation: self.config_generation,
                activated: self.activated,
                queues,
            },
            device: self.device.save_state(),
        }
    }

    /// Restores a snapshot, typically into a freshly constructed transport in another process
    /// with the same guest memory contents. An activated device is re-activated with the saved
    /// queue positions, so the guest continues mid-queue.
    pub fn restore_state(&mut self, state: &MmioState<D::State>) -> Result<(), MmioError> {
        let t = &state.transport;
        let max_sizes = self.device.queue_max_sizes().to_vec();
        if t.queues.len() != max_sizes.len() {
            return Err(MmioError::QueueCount {
                saved: t.queues.len(),
                device: max_sizes.len(),
            });
        }
        let mut queues = Vec::with_capacity(t.queues.len());
        for (index, (snap, &max)) in t.queues.iter().zip(&max_sizes).enumerate() {
            if snap.max_size != max {
                return Err(MmioError::QueueMaxSize {
                    index,
                    saved: snap.max_size,
                    device: max,
                });
            }
            let q = Queue::try_from(QueueState::from(*snap))
                .map_err(|source| MmioError::InvalidQueue { index, source })?;
            queues.push(q);
        }

        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        self.device.restore_state(&state.device)?;
        if t.activated {
            let mut live = Vec::with_capacity(queues.len());
            for (index, q) in queues.iter().enumerate() {
                live.push(
                    copy_queue(q).map_err(|source| MmioError::InvalidQueue { index, source })?,
                );
            }
            self.device.activate(
                self.mem.clone(),
                live,
                self.interrupt.clone(),
                t.driver_features,
            )?;
        }
        self.queues = queues;
        self.status = t.status;
        self.device_features_sel = t.device_features_sel;
        self.driver_features_sel = t.driver_features_sel;
        self.driver_features = t.driver_features;
        self.queue_sel = t.queue_sel;
        self.interrupt.set_status(t.interrupt_status);
        self.config_generation = t.config_generation;
        self.activated = t.activated;
        Ok(())
    }
}

impl<D: VirtioDevice> MmioDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            self.device.read_config(offset - REG_CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            tracing::warn!(
                "virtio-mmio: {}-byte read at {offset:#x} is not an aligned 32-bit access",
                data.len()
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            self.device.write_config(offset - REG_CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::warn!(
                "virtio-mmio: {}-byte write at {offset:#x} ignored",
                data.len()
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            tracing::warn!("virtio-mmio: misaligned write at {offset:#x} ignored");
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testutil::*;

    /// A device that records what the transport does to it.
    #[derive(Default)]
    struct Dummy {
        activated: Option<Vec<QueueState>>,
        notified: Vec<u16>,
        resets: usize,
        config: [u8; 8],
    }

    impl VirtioDevice for Dummy {
        type State = [u8; 8];
        fn device_type(&self) -> u32 {
            42
        }
        fn features(&self) -> u64 {
            1 << 3
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            crate::devices::virtio::read_config_bytes(&self.config, offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            let o = crate::cast::u64_to_usize(offset);
            if o + data.len() <= self.config.len() {
                self.config[o..o + data.len()].copy_from_slice(data);
            }
        }
        fn activate(
            &mut self,
            _mem: GuestMemory,
            queues: Vec<Queue>,
            _interrupt: Arc<Interrupt>,
            _acked: u64,
        ) -> Result<(), DeviceError> {
            self.activated = Some(queues.iter().map(|q| q.state()).collect());
            Ok(())
        }
        fn queue_notify(&mut self, index: u16) {
            self.notified.push(index);
        }
        fn reset(&mut self) {
            self.activated = None;
            self.resets += 1;
        }
        fn queue_states(&self) -> Vec<QueueState> {
            self.activated.clone().unwrap_or_default()
        }
        fn save_state(&self) -> [u8; 8] {
            self.config
        }
        fn restore_state(&mut self, s: &[u8; 8]) -> Result<(), DeviceError> {
            self.config = *s;
            Ok(())
        }
    }

    #[test]
    fn identity_registers() {
        let mut t = MmioTransport::new(Dummy::default(), test_memory());
        assert_eq!(rd(&mut t, 0x000), MMIO_MAGIC_VALUE);
        assert_eq!(rd(&mut t, 0x004), 2);
        assert_eq!(rd(&mut t, 0x008), 42);
        assert_eq!(rd(&mut t, 0x00c), MMIO_VENDOR_ID);
        // Features: low word has the device's bit 3, high word VERSION_1 (bit 32).
        wr(&mut t, 0x014, 0);
        assert_eq!(rd(&mut t, 0x010), 1 << 3);
        wr(&mut t, 0x014, 1);
        assert_eq!(rd(&mut t, 0x010), 1);
        wr(&mut t, 0x030, 1);
        assert_eq!(rd(&mut t, 0x034), 16);
        wr(&mut t, 0x030, 7);
        assert_eq!(rd(&mut t, 0x034), 0);
    }

    #[test]
    fn bad_accesses_are_ignored() {
        let mut t = MmioTransport::new(Dummy::default(), test_memory());
        let mut b = [0xffu8; 2];
        t.read(0x000, &mut b);
        assert_eq!(b, [0, 0]);
        let mut b4 = [0xffu8; 4];
        t.read(0x002, &mut b4);
        assert_eq!(b4, [0; 4]);
        t.write(0x070, &[1, 0]);
        t.write(0x071, &[1, 0, 0, 0]);
        t.write(0x0f0, &[1, 0, 0, 0]);
        assert_eq!(rd(&mut t, 0x0f0), 0);
        assert_eq!(rd(&mut t, 0x070), 0);
        // Notify before DRIVER_OK does not reach the device.
        wr(&mut t, 0x050, 0);
        assert!(t.device().notified.is_empty());
    }

    #[test]
    fn feature_negotiation() {
        let mut t = MmioTransport::new(Dummy::default(), test_memory());
        wr(&mut t, 0x070, 1);
        wr(&mut t, 0x070, 1 | 2);
        // Without VERSION_1 FEATURES_OK is refused.
        wr(&mut t, 0x024, 0);
        wr(&mut t, 0x020, 1 << 3);
        wr(&mut t, 0x070, 1 | 2 | 8);
        assert_eq!(rd(&mut t, 0x070) & 8, 0);
        // Status 0 resets; a feature the device did not offer is refused too.
        wr(&mut t, 0x070, 0);
        wr(&mut t, 0x070, 1 | 2);
        wr(&mut t, 0x024, 1);
        wr(&mut t, 0x020, 1 | 2);
        wr(&mut t, 0x070, 1 | 2 | 8);
        assert_eq!(rd(&mut t, 0x070) & 8, 0);
        wr(&mut t, 0x070, 0);
        wr(&mut t, 0x070, 1 | 2);
        wr(&mut t, 0x024, 1);
        wr(&mut t, 0x020, 1);
        wr(&mut t, 0x024, 0);
        wr(&mut t, 0x020, 1 << 3);
        wr(&mut t, 0x070, 1 | 2 | 8);
        assert_eq!(rd(&mut t, 0x070), 1 | 2 | 8);
        // Feature writes after FEATURES_OK are ignored.
        wr(&mut t, 0x020, 0);
        assert_eq!(
            t.save_state().transport.driver_features,
            (1 << 32) | (1 << 3)
        );
    }

    #[test]
    fn activation_reset_and_state() {
        let mem = test_memory();
        let mut t = MmioTransport::new(Dummy::default(), mem.clone());
        // DRIVER_OK with unconfigured queues fails into NEEDS_RESET.
        negotiate(&mut t, 0);
        wr(&mut t, 0x070, 1 | 2 | 8 | 4);
        assert_ne!(rd(&mut t, 0x070) & 0x40, 0);
        assert!(!t.is_activated());
        assert_ne!(rd(&mut t, 0x060) & 2, 0);

        wr(&mut t, 0x070, 0);
        assert_eq!(rd(&mut t, 0x060), 0);
        negotiate(&mut t, 0);
        let layouts = [
            QueueLayout::new(0x1_0000, 16),
            QueueLayout::new(0x2_0000, 8),
        ];
        for (i, l) in (0..).zip(&layouts) {
            setup_queue(&mut t, i, l);
        }
        wr(&mut t, 0x070, 1 | 2 | 8 | 4);
        assert_eq!(rd(&mut t, 0x070), 1 | 2 | 8 | 4);
        assert!(t.is_activated());
        let qs = t.device().activated.clone().unwrap();
        assert_eq!(qs[1].size, 8);
        assert_eq!(qs[1].desc_table, 0x2_0000);
        assert!(qs[0].ready);
        // Queue config is frozen after DRIVER_OK.
        wr(&mut t, 0x030, 1);
        wr(&mut t, 0x038, 4);
        assert_eq!(t.save_state().transport.queues[1].size, 8);

        wr(&mut t, 0x050, 1);
        assert_eq!(t.device().notified, vec![1]);
        wr(&mut t, 0x050, 9);
        assert_eq!(t.device().notified, vec![1]);

        t.write(0x100, &[7, 8]);
        let mut c = [0u8; 4];
        t.read(0x100, &mut c);
        assert_eq!(c, [7, 8, 0, 0]);

        // Save, restore into a new transport, and compare.
        let s = t.save_state();
        let mut t2 = MmioTransport::new(Dummy::default(), mem);
        t2.restore_state(&s).unwrap();
        assert!(t2.is_activated());
        assert_eq!(t2.save_state(), s);
        assert_eq!(t2.device().activated, t.device().activated);

        wr(&mut t, 0x070, 0);
        assert_eq!(t.device().resets, 1);
        assert!(!t.is_activated());
        assert_eq!(rd(&mut t, 0x044), 0);
    }

    #[test]
    fn restore_rejects_mismatched_state() {
        let t = MmioTransport::new(Dummy::default(), test_memory());
        let mut s = t.save_state();
        s.transport.queues.pop();
        let mut t2 = MmioTransport::new(Dummy::default(), test_memory());
        assert!(matches!(
            t2.restore_state(&s),
            Err(MmioError::QueueCount { .. })
        ));
        let mut s = t.save_state();
        s.transport.queues[0].size = 3;
        assert!(matches!(
            t2.restore_state(&s),
            Err(MmioError::InvalidQueue { .. })
        ));
    }

    #[test]
    fn interrupt_status_and_ack() {
        let t = MmioTransport::new(Dummy::default(), test_memory());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        t.set_irq(Some(irq.try_clone().unwrap()));
        t.interrupt().signal_used_queue();
        assert_eq!(irq.read().unwrap(), 1);
        let mut t = t;
        assert_eq!(rd(&mut t, 0x060), 1);
        wr(&mut t, 0x064, 1);
        assert_eq!(rd(&mut t, 0x060), 0);
    }
}
