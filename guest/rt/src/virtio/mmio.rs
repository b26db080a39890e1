//! The virtio-mmio (version 2) register interface (virtio 1.x spec, section 4.2.2).
use core::ptr::{read_volatile, write_volatile};

use super::queue::Virtqueue;
use super::Error;

const MAGIC: usize = 0x000;
const VERSION: usize = 0x004;
const DEVICE_ID: usize = 0x008;
const DEVICE_FEATURES: usize = 0x010;
const DEVICE_FEATURES_SEL: usize = 0x014;
const DRIVER_FEATURES: usize = 0x020;
const DRIVER_FEATURES_SEL: usize = 0x024;
const QUEUE_SEL: usize = 0x030;
const QUEUE_NUM_MAX: usize = 0x034;
const QUEUE_NUM: usize = 0x038;
const QUEUE_READY: usize = 0x044;
const QUEUE_NOTIFY: usize = 0x050;
const STATUS: usize = 0x070;
const QUEUE_DESC_LOW: usize = 0x080;
const QUEUE_DESC_HIGH: usize = 0x084;
const QUEUE_DRIVER_LOW: usize = 0x090;
const QUEUE_DRIVER_HIGH: usize = 0x094;
const QUEUE_DEVICE_LOW: usize = 0x0a0;
const QUEUE_DEVICE_HIGH: usize = 0x0a4;
const CONFIG_GENERATION: usize = 0x0fc;
const CONFIG: usize = 0x100;

/// "virt" in little endian.
const MAGIC_VALUE: u32 = 0x7472_6976;

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_FAILED: u32 = 128;

/// Feature bit: the device follows virtio 1.x (required for modern devices).
pub const F_VERSION_1: u64 = 1 << 32;

/// Virtio device ids.
pub const DEVICE_ID_NET: u32 = 1;
/// Virtio device ids.
pub const DEVICE_ID_BLK: u32 = 2;

/// One virtio-mmio window. Every access is a VM exit, so drivers touch it only at set-up and
/// to notify.
pub struct Mmio {
    base: usize,
}

impl Mmio {
    /// Checks that `base` holds a modern virtio-mmio device with id `device_id`.
    ///
    /// # Safety
    /// `base` must be the (identity-mapped) address of a virtio-mmio window given by ftvmm,
    /// and nothing else may drive that device.
    pub unsafe fn probe(base: u64, device_id: u32) -> Result<Self, Error> {
        let mmio = Mmio {
            base: base as usize,
        };
        if mmio.read(MAGIC) != MAGIC_VALUE {
            return Err(Error::NotVirtio);
        }
        let version = mmio.read(VERSION);
        if version != 2 {
            return Err(Error::UnsupportedVersion(version));
        }
        let id = mmio.read(DEVICE_ID);
        if id != device_id {
            return Err(Error::WrongDevice(id));
        }
        Ok(mmio)
    }

    fn read(&self, offset: usize) -> u32 {
        // SAFETY: `probe`'s contract: a device window, 4-byte aligned register offsets.
        unsafe { read_volatile((self.base + offset) as *const u32) }
    }

    fn write(&self, offset: usize, value: u32) {
        // SAFETY: as in `read`.
        unsafe { write_volatile((self.base + offset) as *mut u32, value) }
    }

    fn set_status(&self, bits: u32) {
        let status = self.read(STATUS);
        self.write(STATUS, status | bits);
    }

    /// Resets the device and negotiates features (section 3.1.1 steps 1-6): the result is
    /// `offered & wanted`, always including VERSION_1.
    pub fn negotiate(&self, wanted: u64) -> Result<u64, Error> {
        self.write(STATUS, 0);
        while self.read(STATUS) != 0 {
            core::hint::spin_loop();
        }
        self.set_status(STATUS_ACKNOWLEDGE);
        self.set_status(STATUS_DRIVER);
        self.write(DEVICE_FEATURES_SEL, 0);
        let low = self.read(DEVICE_FEATURES) as u64;
        self.write(DEVICE_FEATURES_SEL, 1);
        let high = self.read(DEVICE_FEATURES) as u64;
        let offered = low | high << 32;
        if offered & F_VERSION_1 == 0 {
            self.set_status(STATUS_FAILED);
            return Err(Error::NotModern);
        }
        let features = offered & (wanted | F_VERSION_1);
        self.write(DRIVER_FEATURES_SEL, 0);
        self.write(DRIVER_FEATURES, features as u32);
        self.write(DRIVER_FEATURES_SEL, 1);
        self.write(DRIVER_FEATURES, (features >> 32) as u32);
        self.set_status(STATUS_FEATURES_OK);
        if self.read(STATUS) & STATUS_FEATURES_OK == 0 {
            self.set_status(STATUS_FAILED);
            return Err(Error::FeaturesRejected);
        }
        Ok(features)
    }

    /// The largest size the device accepts for queue `index` (0: no such queue).
    pub fn queue_max(&self, index: u16) -> u16 {
        self.write(QUEUE_SEL, index as u32);
        if self.read(QUEUE_READY) != 0 {
            return 0;
        }
        self.read(QUEUE_NUM_MAX).min(u16::MAX as u32) as u16
    }

    /// Tells the device where queue `queue` lives and enables it.
    pub fn setup_queue(&self, queue: &Virtqueue) {
        let (desc, driver, device) = queue.addresses();
        self.write(QUEUE_SEL, queue.index() as u32);
        self.write(QUEUE_NUM, queue.size() as u32);
        self.write(QUEUE_DESC_LOW, desc as u32);
        self.write(QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.write(QUEUE_DRIVER_LOW, driver as u32);
        self.write(QUEUE_DRIVER_HIGH, (driver >> 32) as u32);
        self.write(QUEUE_DEVICE_LOW, device as u32);
        self.write(QUEUE_DEVICE_HIGH, (device >> 32) as u32);
        self.write(QUEUE_READY, 1);
    }

    /// Marks the driver ready; the device may use its queues from now on.
    pub fn driver_ok(&self) {
        self.set_status(STATUS_DRIVER_OK);
    }

    /// Marks the device failed (after a set-up error).
    pub fn fail(&self) {
        self.set_status(STATUS_FAILED);
    }

    /// Notifies the device that queue `index` has new buffers (one VM exit).
    pub fn notify(&self, index: u16) {
        self.write(QUEUE_NOTIFY, index as u32);
    }

    /// Reads the byte at `offset` of the device-specific configuration space.
    pub fn config_u8(&self, offset: usize) -> u8 {
        // SAFETY: as in `read`; config space allows byte accesses.
        unsafe { read_volatile((self.base + CONFIG + offset) as *const u8) }
    }

    /// Reads a 32-bit field of the configuration space.
    pub fn config_u32(&self, offset: usize) -> u32 {
        self.read(CONFIG + offset)
    }

    /// Reads a 64-bit field of the configuration space consistently (section 4.2.2.2: retry
    /// while the configuration generation changes).
    pub fn config_u64(&self, offset: usize) -> u64 {
        loop {
            let before = self.read(CONFIG_GENERATION);
            let low = self.read(CONFIG + offset) as u64;
            let high = self.read(CONFIG + offset + 4) as u64;
            if self.read(CONFIG_GENERATION) == before {
                return low | high << 32;
            }
        }
    }
}
