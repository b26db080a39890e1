//! virtio-blk over a [`BlockBackend`], plus [`RawFileBackend`] for raw image files.
//!
//! Requests are processed synchronously on the vCPU thread that wrote QueueNotify: every
//! available chain is executed, its used entry added, and the interrupt signalled once per batch
//! (VM exits are expensive here, so a guest kicks once per batch too).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{DescriptorChain, Queue, QueueState, QueueT, Reader, Writer};

use super::{read_config_bytes, DeviceError, GuestMemory, Interrupt, VirtioDevice};
use crate::cast::usize_to_u64;
use crate::devices::BlockBackend;

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Queue size offered to the driver.
pub const BLOCK_QUEUE_SIZE: u16 = 256;
/// Largest piece of a request staged in host memory at once (bounds allocation per request).
const CHUNK: usize = 128 * 1024;
const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// Errors opening a disk image or restoring a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("disk image {0} does not exist")]
    NotFound(PathBuf),
    #[error("disk image {path} cannot be opened read-write: {source}")]
    NotWritable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open disk image {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk image {path} is {size} bytes, not a multiple of 512")]
    BadSize { path: PathBuf, size: u64 },
    #[error("disk image {path} is not a regular file")]
    NotAFile { path: PathBuf },
}

/// A raw disk image file, accessed with positioned reads and writes.
#[derive(Debug)]
pub struct RawFileBackend {
    file: File,
    size: u64,
}

impl RawFileBackend {
    /// Opens `path` read-write.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, BlockError> {
        Self::open_with(path.as_ref(), true)
    }

    /// Opens `path` read-only (pair with a read-only [`Block`]).
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<Self, BlockError> {
        Self::open_with(path.as_ref(), false)
    }

    fn open_with(path: &Path, writable: bool) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|source| match source.kind() {
                io::ErrorKind::NotFound => BlockError::NotFound(path.to_owned()),
                _ if writable
                    && (source.kind() == io::ErrorKind::PermissionDenied
                        || source.raw_os_error() == Some(libc::EROFS)) =>
                {
                    BlockError::NotWritable {
                        path: path.to_owned(),
                        source,
                    }
                }
                _ => BlockError::Open {
                    path: path.to_owned(),
                    source,
                },
            })?;
        let meta = file.metadata().map_err(|source| BlockError::Open {
            path: path.to_owned(),
            source,
        })?;
        if !meta.is_file() {
            return Err(BlockError::NotAFile {
                path: path.to_owned(),
            });
        }
        let size = meta.len();
        if !size.is_multiple_of(SECTOR_SIZE) {
            return Err(BlockError::BadSize {
                path: path.to_owned(),
                size,
            });
        }
        Ok(RawFileBackend { file, size })
    }
}

impl BlockBackend for RawFileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// Saved state of a block device (its guest-visible configuration).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct BlockState {
    pub capacity_sectors: u64,
    pub read_only: bool,
    pub id: Vec<u8>,
}

struct Active {
    mem: GuestMemory,
    queue: Queue,
    interrupt: Arc<Interrupt>,
}

/// The virtio-blk device model.
pub struct Block {
    backend: Box<dyn BlockBackend>,
    read_only: bool,
    id: [u8; ID_BYTES],
    capacity_sectors: u64,
    queue_sizes: [u16; 1],
    active: Option<Active>,
}

impl Block {
    /// A block device over `backend`. `id` (GET_ID) is truncated to 20 bytes. A backend whose
    /// size is not a multiple of 512 exposes only its whole sectors.
    pub fn new(backend: Box<dyn BlockBackend>, read_only: bool, id: &str) -> Self {
        let mut id_bytes = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        let capacity_sectors = backend.size() / SECTOR_SIZE;
        Block {
            backend,
            read_only,
            id: id_bytes,
            capacity_sectors,
            queue_sizes: [BLOCK_QUEUE_SIZE],
            active: None,
        }
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn config_bytes(&self) -> [u8; 8] {
        // virtio_blk_config starts with `capacity`; no feature exposing the later fields is
        // offered, so they read as zero.
        self.capacity_sectors.to_le_bytes()
    }

    /// Processes every available request, then signals the interrupt once.
    fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let req = RequestContext {
            backend: self.backend.as_mut(),
            read_only: self.read_only,
            id: &self.id,
            capacity_bytes: self.capacity_sectors * SECTOR_SIZE,
        };
        let mut req = req;
        let mut completed = 0usize;
        while let Some(chain) = active.queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = req.execute(mem, chain);
            if let Err(e) = active.queue.add_used(mem, head, len) {
                // A bad head index (guest bug) loses only that chain; go on with the rest.
                tracing::warn!("virtio-blk: cannot add used entry for chain {head}: {e}");
                continue;
            }
            completed += 1;
        }
        if completed > 0 {
            active.interrupt.signal_used_queue();
        }
    }
}

/// What executing one request needs, borrowed from the device.
struct RequestContext<'a> {
    backend: &'a mut dyn BlockBackend,
    read_only: bool,
    id: &'a [u8; ID_BYTES],
    capacity_bytes: u64,
}

type Chain<'m> = DescriptorChain<&'m GuestMemory>;

impl RequestContext<'_> {
    /// Executes one request chain; returns the number of bytes written to the guest (the used
    /// length). A chain without a writable status byte completes with length 0 and no status.
    fn execute(&mut self, mem: &GuestMemory, chain: Chain<'_>) -> u32 {
        let mut data = match chain.clone().writer(mem) {
            Ok(w) if w.available_bytes() >= 1 => w,
            Ok(_) => {
                tracing::warn!("virtio-blk: request without a status byte dropped");
                return 0;
            }
            Err(e) => {
                tracing::warn!("virtio-blk: request with bad writable buffers dropped: {e}");
                return 0;
            }
        };
        let status_at = data.available_bytes() - 1;
        let mut status_w = match data.split_at(status_at) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!("virtio-blk: cannot locate status byte: {e}");
                return 0;
            }
        };
        let status = match chain.reader(mem) {
            Ok(mut reader) => self.dispatch(&mut reader, &mut data),
            Err(e) => {
                tracing::warn!("virtio-blk: request with bad readable buffers: {e}");
                VIRTIO_BLK_S_IOERR
            }
        };
        let written = data.bytes_written();
        // The status codes (VIRTIO_BLK_S_*) are below 256: their low byte is all of them.
        let used = match status_w.write_all(&status.to_le_bytes()[..1]) {
            Ok(()) => written + 1,
            Err(e) => {
                tracing::warn!("virtio-blk: cannot write status byte: {e}");
                written
            }
        };
        // The chain is at most 4 GiB (virtio-queue enforces it), so this fits in u32.
        u32::try_from(used).unwrap_or(u32::MAX)
    }

    fn dispatch(&mut self, reader: &mut Reader<'_, Bs<'_>>, data: &mut Writer<'_, Bs<'_>>) -> u32 {
        let mut hdr = [0u8; 16];
        if reader.read_exact(&mut hdr).is_err() {
            tracing::warn!("virtio-blk: request header shorter than 16 bytes");
            return VIRTIO_BLK_S_IOERR;
        }
        let req_type = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&hdr[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);
        let result = match req_type {
            VIRTIO_BLK_T_IN => self.read(sector, data),
            VIRTIO_BLK_T_OUT => self.write(sector, reader),
            VIRTIO_BLK_T_FLUSH => self.backend.flush(),
            VIRTIO_BLK_T_GET_ID => {
                let n = data.available_bytes().min(ID_BYTES);
                data.write_all(&self.id[..n])
            }
            other => {
                tracing::debug!("virtio-blk: unsupported request type {other}");
                return VIRTIO_BLK_S_UNSUPP;
            }
        };
        match result {
            Ok(()) => VIRTIO_BLK_S_OK,
            Err(e) => {
                tracing::warn!("virtio-blk: request type {req_type} at sector {sector}: {e}");
                VIRTIO_BLK_S_IOERR
            }
        }
    }

    /// Checks that `len` bytes at `sector` are whole sectors inside the image.
    fn range(&self, sector: u64, len: usize) -> io::Result<u64> {
        let len = usize_to_u64(len);
        let offset = sector.checked_mul(SECTOR_SIZE).filter(|o| {
            len.is_multiple_of(SECTOR_SIZE)
                && o.checked_add(len)
                    .is_some_and(|end| end <= self.capacity_bytes)
        });
        offset.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{len} bytes at sector {sector} are not whole sectors inside the {}-byte image",
                    self.capacity_bytes
                ),
            )
        })
    }

    fn read(&mut self, sector: u64, data: &mut Writer<'_, Bs<'_>>) -> io::Result<()> {
        let total = data.available_bytes();
        let mut offset = self.range(sector, total)?;
        let mut buf = vec![0u8; total.min(CHUNK)];
        let mut left = total;
        while left > 0 {
            let n = left.min(CHUNK);
            self.backend.read_at(offset, &mut buf[..n])?;
            data.write_all(&buf[..n])?;
            offset += usize_to_u64(n);
            left -= n;
        }
        Ok(())
    }

    fn write(&mut self, sector: u64, reader: &mut Reader<'_, Bs<'_>>) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "write to a read-only disk",
            ));
        }
        let total = reader.available_bytes();
        let mut offset = self.range(sector, total)?;
        let mut buf = vec![0u8; total.min(CHUNK)];
        let mut left = total;
        while left > 0 {
            let n = left.min(CHUNK);
            reader.read_exact(&mut buf[..n])?;
            self.backend.write_at(offset, &buf[..n])?;
            offset += usize_to_u64(n);
            left -= n;
        }
        Ok(())
    }
}

/// The bitmap slice type of [`GuestMemory`] (what the Reader/Writer carry to mark pages dirty).
type Bs<'a> = vm_memory::bitmap::BS<'a, vm_memory::bitmap::AtomicBitmap>;

impl VirtioDevice for Block {
    type State = BlockState;

    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_BLK_F_FLUSH;
        if self.read_only {
            f |= 1u64 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::warn!("virtio-blk: write to read-only config space at {offset:#x} ignored");
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        mut queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
        _acked_features: u64,
    ) -> Result<(), DeviceError> {
        if queues.len() != 1 {
            return Err(DeviceError::QueueCount {
                expected: 1,
                got: queues.len(),
            });
        }
        let queue = queues.remove(0);
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        Ok(())
    }

    fn queue_notify(&mut self, index: u16) {
        if index == 0 {
            self.process_queue();
        }
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn queue_states(&self) -> Vec<QueueState> {
        self.active
            .as_ref()
            .map(|a| vec![a.queue.state()])
            .unwrap_or_default()
    }

    fn save_state(&self) -> BlockState {
        BlockState {
            capacity_sectors: self.capacity_sectors,
            read_only: self.read_only,
            id: self.id.to_vec(),
        }
    }

    fn restore_state(&mut self, state: &BlockState) -> Result<(), DeviceError> {
        // The guest has already seen capacity and the RO flag: a different disk is a
        // configuration error, not something to paper over.
        if state.capacity_sectors != self.capacity_sectors {
            return Err(DeviceError::StateMismatch(format!(
                "disk has {} sectors, checkpoint has {}",
                self.capacity_sectors, state.capacity_sectors
            )));
        }
        if state.read_only != self.read_only {
            return Err(DeviceError::StateMismatch(format!(
                "disk read-only is {}, checkpoint has {}",
                self.read_only, state.read_only
            )));
        }
        let n = state.id.len().min(ID_BYTES);
        self.id = [0u8; ID_BYTES];
        self.id[..n].copy_from_slice(&state.id[..n]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cast::u64_to_usize;
    use crate::devices::virtio::mmio::MmioTransport;
    use crate::devices::virtio::testutil::*;
    use crate::devices::MmioDevice;
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
    use vmm_sys_util::tempfile::TempFile;

    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x80_0000;
    const STATUS: u64 = 0x20_0000;

    fn image(sectors: u64) -> TempFile {
        let f = TempFile::new().unwrap();
        let bytes: Vec<u8> = (0..sectors * SECTOR_SIZE)
            .map(|i| (i % 251) as u8)
            .collect();
        f.as_file().write_all_at(&bytes, 0).unwrap();
        f
    }

    struct Rig {
        mem: GuestMemory,
        t: MmioTransport<Block>,
        q: DriverQueue,
        req: u64,
    }

    impl Rig {
        fn new(path: &Path, read_only: bool) -> Rig {
            let mem = test_memory();
            let backend = RawFileBackend::open(path).unwrap();
            let mut t = MmioTransport::new(
                Block::new(Box::new(backend), read_only, "ftvmm-disk-0"),
                mem.clone(),
            );
            let mut feats = 1 << VIRTIO_BLK_F_FLUSH;
            if read_only {
                feats |= 1 << VIRTIO_BLK_F_RO;
            }
            negotiate(&mut t, feats);
            let layout = QueueLayout::new(0x1_0000, 16);
            setup_queue(&mut t, 0, &layout);
            driver_ok(&mut t);
            Rig {
                mem,
                t,
                q: DriverQueue::new(layout),
                req: 0,
            }
        }

        /// Posts one request with `data` buffers, notifies, and returns (status, used len).
        fn request(&mut self, ty: u32, sector: u64, data: &[(u64, u32, bool)]) -> (u8, u32) {
            let slot = self.req % 8;
            self.req += 1;
            let hdr = HDR + slot * 0x100;
            let status = STATUS + slot;
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&ty.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
            self.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
            let mut chain = vec![(hdr, 16, false)];
            chain.extend_from_slice(data);
            chain.push((status, 1, true));
            let head = self.q.add_chain(&self.mem, &chain);
            wr(&mut self.t, 0x050, 0);
            let used = self.q.take_used(&self.mem);
            assert_eq!(used.len(), 1);
            assert_eq!(used[0].0, u32::from(head));
            (self.mem.read_obj(GuestAddress(status)).unwrap(), used[0].1)
        }
    }

    #[test]
    fn read_write_flush_get_id_roundtrip() {
        let img = image(64);
        let mut r = Rig::new(img.as_path(), false);
        // Config space: capacity in sectors.
        let mut cap = [0u8; 8];
        r.t.read(0x100, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 64);

        // Read sectors 2..4 into two buffers.
        let (s, len) = r.request(
            VIRTIO_BLK_T_IN,
            2,
            &[(DATA, 512, true), (DATA + 0x1000, 512, true)],
        );
        assert_eq!((s, len), (0, 1025));
        let mut got = vec![0u8; 512];
        r.mem
            .read_slice(&mut got, GuestAddress(DATA + 0x1000))
            .unwrap();
        let expect: Vec<u8> = (3 * 512..4 * 512u64).map(|i| (i % 251) as u8).collect();
        assert_eq!(got, expect);

        // Write sector 5 and read it back through the file.
        r.mem
            .write_slice(&[0xabu8; 512], GuestAddress(DATA))
            .unwrap();
        assert_eq!(
            r.request(VIRTIO_BLK_T_OUT, 5, &[(DATA, 512, false)]),
            (0, 1)
        );
        let mut file_bytes = [0u8; 512];
        img.as_file()
            .read_exact_at(&mut file_bytes, 5 * 512)
            .unwrap();
        assert_eq!(file_bytes, [0xab; 512]);

        assert_eq!(r.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (0, 1));

        let (s, len) = r.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, true)]);
        assert_eq!((s, len), (0, 21));
        let mut id = [0u8; 20];
        r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..12], b"ftvmm-disk-0");

        assert_eq!(u32::from(r.request(99, 0, &[]).0), VIRTIO_BLK_S_UNSUPP);
    }

    #[test]
    fn batch_is_processed_on_one_notify() {
        let img = image(8);
        let mut r = Rig::new(img.as_path(), false);
        for i in 0..4u64 {
            let hdr = HDR + i * 0x100;
            let mut h = [0u8; 16];
            h[8..16].copy_from_slice(&i.to_le_bytes());
            r.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
            r.q.add_chain(
                &r.mem,
                &[
                    (hdr, 16, false),
                    (DATA + i * 512, 512, true),
                    (STATUS + i, 1, true),
                ],
            );
        }
        let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        r.t.set_irq(Some(irq.try_clone().unwrap()));
        wr(&mut r.t, 0x050, 0);
        assert_eq!(r.q.take_used(&r.mem).len(), 4);
        assert_eq!(irq.read().unwrap(), 1, "one signal per batch");
        assert_eq!(rd(&mut r.t, 0x060), 1);
    }

    #[test]
    fn out_of_range_and_misaligned_requests_fail() {
        let img = image(8);
        let mut r = Rig::new(img.as_path(), false);
        assert_eq!(r.request(VIRTIO_BLK_T_IN, 8, &[(DATA, 512, true)]).0, 1);
        assert_eq!(r.request(VIRTIO_BLK_T_IN, 7, &[(DATA, 1024, true)]).0, 1);
        assert_eq!(
            r.request(VIRTIO_BLK_T_OUT, u64::MAX, &[(DATA, 512, false)])
                .0,
            1
        );
        assert_eq!(r.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 100, true)]).0, 1);
        // Still serving afterwards.
        assert_eq!(r.request(VIRTIO_BLK_T_IN, 7, &[(DATA, 512, true)]).0, 0);
    }

    #[test]
    fn read_only_rejects_writes() {
        let img = image(8);
        let mut r = Rig::new(img.as_path(), true);
        assert_eq!(
            rd(&mut r.t, 0x010) & (1 << VIRTIO_BLK_F_RO),
            1 << VIRTIO_BLK_F_RO
        );
        r.mem
            .write_slice(&[0xcdu8; 512], GuestAddress(DATA))
            .unwrap();
        assert_eq!(r.request(VIRTIO_BLK_T_OUT, 1, &[(DATA, 512, false)]).0, 1);
        let mut b = [0u8; 512];
        img.as_file().read_exact_at(&mut b, 512).unwrap();
        assert_ne!(b, [0xcd; 512]);
        assert_eq!(r.request(VIRTIO_BLK_T_IN, 1, &[(DATA, 512, true)]).0, 0);
    }

    #[test]
    fn malformed_chains_do_not_panic() {
        let img = image(8);
        let mut r = Rig::new(img.as_path(), false);
        // Short header.
        let mut q = r.q.clone();
        q.add_chain(&r.mem, &[(HDR, 8, false), (STATUS, 1, true)]);
        // No writable descriptor at all.
        q.add_chain(&r.mem, &[(HDR, 16, false)]);
        // Buffer outside guest memory.
        q.add_chain(
            &r.mem,
            &[
                (HDR, 16, false),
                (0x4000_0000, 512, true),
                (STATUS + 1, 1, true),
            ],
        );
        // Descriptor loop: 0 -> 1 -> 0.
        q.write_desc(&r.mem, 10, HDR, 16, VRING_DESC_F_NEXT, 11);
        q.write_desc(
            &r.mem,
            11,
            STATUS + 2,
            1,
            VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
            10,
        );
        q.publish(&r.mem, 10);
        // Head index out of the table: no used entry possible, but the batch goes on.
        q.publish(&r.mem, 200);
        // A good request after the bad ones in the same batch.
        let mut h = [0u8; 16];
        h[8..16].copy_from_slice(&3u64.to_le_bytes());
        r.mem.write_slice(&h, GuestAddress(HDR + 0x100)).unwrap();
        q.add_chain(
            &r.mem,
            &[
                (HDR + 0x100, 16, false),
                (DATA, 512, true),
                (STATUS + 3, 1, true),
            ],
        );
        r.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        r.mem.write_obj(0xffu8, GuestAddress(STATUS + 3)).unwrap();
        wr(&mut r.t, 0x050, 0);
        let used = q.take_used(&r.mem);
        assert_eq!(used.len(), 5, "{used:?}");
        assert_eq!(r.mem.read_obj::<u8>(GuestAddress(STATUS + 3)).unwrap(), 0);
        let s: u8 = r.mem.read_obj(GuestAddress(STATUS)).unwrap();
        assert_eq!(s, 1);
        assert_eq!(used[1].1, 0);
    }

    #[test]
    fn read_marks_target_pages_dirty() {
        let img = image(16);
        let mut r = Rig::new(img.as_path(), false);
        let mem = r.mem.clone();
        let region = mem.find_region(GuestAddress(DATA)).unwrap();
        let base = region.start_addr().0;
        let dirty = |a: u64| region.bitmap().dirty_at(u64_to_usize(a - base));
        assert!(!dirty(DATA) && !dirty(DATA + 0x1000) && !dirty(DATA + 0x2000));
        assert_eq!(
            r.request(VIRTIO_BLK_T_IN, 0, &[(DATA + 0x800, 0x1000, true)])
                .0,
            0
        );
        assert!(dirty(DATA), "first target page dirty");
        assert!(dirty(DATA + 0x1000), "second target page dirty");
        assert!(!dirty(DATA + 0x2000), "untouched page stays clean");
    }

    #[test]
    fn save_restore_continues_serving() {
        let img = image(16);
        let mut r = Rig::new(img.as_path(), false);
        for i in 0..3 {
            assert_eq!(r.request(VIRTIO_BLK_T_IN, i, &[(DATA, 512, true)]).0, 0);
        }
        // Post (but do not notify) one request before the snapshot, as a guest mid-batch would.
        let mut h = [0u8; 16];
        h[8..16].copy_from_slice(&4u64.to_le_bytes());
        r.mem.write_slice(&h, GuestAddress(HDR + 0x700)).unwrap();
        r.q.add_chain(
            &r.mem,
            &[
                (HDR + 0x700, 16, false),
                (DATA + 0x1000, 512, true),
                (STATUS + 7, 1, true),
            ],
        );

        let state = r.t.save_state();
        let json = serde_json::to_string(&state).unwrap();
        let state: crate::devices::virtio::mmio::MmioState<BlockState> =
            serde_json::from_str(&json).unwrap();
        assert!(state.transport.activated);
        assert_eq!(state.transport.queues[0].next_avail, 3);

        // New device on the same memory and image; the old one is gone.
        let backend = RawFileBackend::open(img.as_path()).unwrap();
        let mut t2 = MmioTransport::new(Block::new(Box::new(backend), false, "x"), r.mem.clone());
        t2.restore_state(&state).unwrap();
        assert_eq!(t2.save_state(), state);
        r.t = t2;
        wr(&mut r.t, 0x050, 0);
        let used = r.q.take_used(&r.mem);
        assert_eq!(used.len(), 1);
        assert_eq!(r.mem.read_obj::<u8>(GuestAddress(STATUS + 7)).unwrap(), 0);
        let (s, _) = r.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, true)]);
        assert_eq!(s, 0);
        let mut id = [0u8; 12];
        r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"ftvmm-disk-0", "id restored from state");

        // A disk of another size is refused.
        let other = image(8);
        let mut t3 = MmioTransport::new(
            Block::new(
                Box::new(RawFileBackend::open(other.as_path()).unwrap()),
                false,
                "x",
            ),
            r.mem.clone(),
        );
        assert!(t3.restore_state(&state).is_err());
    }

    #[test]
    fn raw_file_open_errors() {
        let missing = RawFileBackend::open("/nonexistent/ftvmm.img").unwrap_err();
        assert!(matches!(missing, BlockError::NotFound(_)));
        assert!(missing.to_string().contains("does not exist"));
        let odd = TempFile::new().unwrap();
        odd.as_file().set_len(1000).unwrap();
        let e = RawFileBackend::open(odd.as_path()).unwrap_err();
        assert!(matches!(e, BlockError::BadSize { size: 1000, .. }), "{e}");
        let e = RawFileBackend::open("/tmp").unwrap_err();
        assert!(e.to_string().contains("/tmp"), "{e}");
    }
}
