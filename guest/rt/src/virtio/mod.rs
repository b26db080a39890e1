//! Polling virtio drivers over modern (version 2) virtio-mmio transports.
//!
//! No interrupts: the guest runs with interrupts off, so drivers ask the device not to
//! interrupt (`VRING_AVAIL_F_NO_INTERRUPT`) and poll the used rings in memory (no VM exit).
//! The only exits are register accesses at set-up and one queue notification per batch.
//! Physical addresses equal virtual ones (identity map), so buffers are handed over as-is.
pub mod blk;
pub mod mmio;
#[cfg(feature = "net")]
pub mod net;
pub mod queue;

/// Why a device could not be driven.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// No virtio-mmio magic at the address.
    NotVirtio,
    /// A legacy (version 1) transport; only modern ones are supported.
    UnsupportedVersion(u32),
    /// A different kind of device than expected (the virtio device id found).
    WrongDevice(u32),
    /// The device does not offer VIRTIO_F_VERSION_1.
    NotModern,
    /// The device refused the negotiated features.
    FeaturesRejected,
    /// The queue is missing or already in use.
    QueueUnavailable(u16),
    /// The device reported an I/O error (virtio-blk status byte).
    Io(u8),
    /// A buffer is not a whole number of sectors, or empty.
    BadLength,
    /// The request goes past the end of the disk.
    OutOfRange,
    /// The device is read-only.
    ReadOnly,
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::NotVirtio => write!(f, "no virtio-mmio device"),
            Error::UnsupportedVersion(v) => write!(f, "virtio-mmio version {v} unsupported"),
            Error::WrongDevice(id) => write!(f, "unexpected virtio device id {id}"),
            Error::NotModern => write!(f, "device lacks VIRTIO_F_VERSION_1"),
            Error::FeaturesRejected => write!(f, "device rejected the features"),
            Error::QueueUnavailable(q) => write!(f, "virtqueue {q} unavailable"),
            Error::Io(s) => write!(f, "device I/O error (status {s})"),
            Error::BadLength => write!(f, "buffer length is not a whole number of sectors"),
            Error::OutOfRange => write!(f, "request past the end of the disk"),
            Error::ReadOnly => write!(f, "device is read-only"),
        }
    }
}
