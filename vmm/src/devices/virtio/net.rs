//! virtio-net: one RX queue (0) and one TX queue (1), VIRTIO_NET_F_MAC, no offloads.
//!
//! Every buffer starts with a 12-byte `virtio_net_hdr_v1` (VERSION_1 layout). TX runs on the
//! vCPU thread that kicks queue 1: each chain's frame (header skipped) goes to the
//! [`FrameSink`]. RX runs on a worker thread started at activation: it waits (epoll) on the
//! frame source, a wake eventfd (written on each kick of queue 0, on resume and by
//! [`NetControl::wake`]) and a stop eventfd, and copies frames into RX buffers while the guest
//! has some. With no buffers, frames stay queued in the source (the tap), not dropped.
//!
//! # Backpressure
//! A sink that has no room ([`FrameSink::has_room`], e.g. an output-commit buffer at its bound)
//! stalls TX: the guest's frames stay in its ring, unread, and the guest sees a full queue. The
//! sink's owner calls [`NetControl::wake`] when room frees; the worker then transmits the rest.
//!
//! # Pausing (checkpoints)
//! All guest-memory writes (RX buffers, both used rings) happen while a thread holds the
//! device's mutex and only when the device is not paused. [`Net::pause`] (or
//! [`NetControl::pause`], which needs no access to the transport) takes that mutex and sets the
//! paused flag, so when it returns no write is in progress and none will start until
//! [`Net::resume`].

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::tap::{Tap, TapError};
use super::{read_config_bytes, DeviceError, GuestMemory, Interrupt, VirtioDevice};
use crate::devices::FrameSink;

/// Parses a MAC address written `52:54:00:12:34:56`: `--net mac=` and a node's config.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!("bad MAC '{s}'"));
    }
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).map_err(|_| format!("bad MAC '{s}'"))?;
    }
    Ok(mac)
}

/// Queue size offered for both queues.
pub const NET_QUEUE_SIZE: u16 = 256;
pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
/// Size of `virtio_net_hdr_v1`.
pub const NET_HDR_LEN: usize = 12;
/// Largest frame accepted (64 KiB tap MTU plus Ethernet header); larger TX frames are dropped.
pub const MAX_FRAME_LEN: usize = 65_550;
/// Frames the RX worker delivers per lock hold, so pause() never waits long.
const RX_BUDGET: usize = 64;

const TOKEN_STOP: u64 = 0;
const TOKEN_KICK: u64 = 1;
const TOKEN_SOURCE: u64 = 2;

/// Errors creating a net device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot create net device eventfd: {0}")]
    EventFd(#[source] io::Error),
    #[error(transparent)]
    Tap(#[from] TapError),
}

/// Where received frames come from. Must be nonblocking: `recv_frame` returns `WouldBlock` when
/// no frame is queued, and the fd becomes readable when one is.
pub trait FrameSource: Send + AsRawFd {
    /// Reads exactly one frame into `buf`.
    fn recv_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
}

impl FrameSource for Tap {
    fn recv_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_frame(buf)
    }
}

/// Saved state of a net device (its guest-visible configuration).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct NetState {
    pub mac: [u8; 6],
}

struct ActiveQueue {
    mem: GuestMemory,
    queue: Queue,
    interrupt: Arc<Interrupt>,
}

/// Why a delivery pass stopped.
#[derive(Debug, PartialEq, Eq)]
enum RxOutcome {
    /// The source has no more frames: wait for it.
    Drained,
    /// The guest has no RX buffers (or the device is inactive): wait for a kick.
    NoBuffers,
    /// Paused: wait for resume.
    Paused,
    /// Budget used up: release the lock and go on.
    Budget,
}

struct Inner {
    source: Box<dyn FrameSource>,
    sink: Box<dyn FrameSink>,
    paused: bool,
    rx: Option<ActiveQueue>,
    tx: Option<ActiveQueue>,
    /// TX chains wait in the ring (a full sink, or a kick while paused) for the worker.
    tx_stalled: bool,
}

struct Shared {
    inner: Mutex<Inner>,
    /// Wakes the worker: the guest kicked the RX queue, the device resumed, or the sink has
    /// room again.
    kick: EventFd,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere must not wedge the device; the data stays consistent per frame.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wake(&self) {
        if let Err(e) = self.kick.write(1) {
            tracing::warn!("virtio-net: cannot wake the device's worker: {e}");
        }
    }
}

/// A handle that pauses, resumes and wakes a net device without access to its transport.
#[derive(Clone)]
pub struct NetControl(Arc<Shared>);

impl NetControl {
    /// Returns once no guest-memory write is in progress; none starts until `resume`.
    pub fn pause(&self) {
        self.0.lock().paused = true;
    }

    pub fn resume(&self) {
        self.0.lock().paused = false;
        self.0.wake();
    }

    pub fn is_paused(&self) -> bool {
        self.0.lock().paused
    }

    /// The sink has room again: transmit the frames a full sink left in the ring.
    pub fn wake(&self) {
        self.0.wake();
    }

    /// A handle that wakes the device while it exists and does not keep it alive: for the
    /// device's own sink to hold (a strong one would be a cycle that leaks the device, its
    /// tap included, when the VM goes).
    pub fn waker(&self) -> NetWaker {
        NetWaker(Arc::downgrade(&self.0))
    }
}

/// See [`NetControl::waker`].
#[derive(Clone)]
pub struct NetWaker(std::sync::Weak<Shared>);

impl NetWaker {
    pub fn wake(&self) {
        if let Some(shared) = self.0.upgrade() {
            shared.wake();
        }
    }
}

impl Inner {
    /// Copies queued frames into the guest's RX buffers, at most [`RX_BUDGET`] of them.
    fn deliver(&mut self, buf: &mut [u8]) -> RxOutcome {
        if self.paused {
            return RxOutcome::Paused;
        }
        let Some(rx) = self.rx.as_mut() else {
            return RxOutcome::NoBuffers;
        };
        let mut delivered = 0;
        let outcome = loop {
            if delivered == RX_BUDGET {
                break RxOutcome::Budget;
            }
            // Check for a buffer before reading, so that without one the frame stays queued.
            match rx.queue.avail_idx(&rx.mem, Ordering::Acquire) {
                Ok(idx) if idx.0 != rx.queue.next_avail() => {}
                Ok(_) => break RxOutcome::NoBuffers,
                Err(e) => {
                    tracing::warn!("virtio-net: cannot read RX avail index: {e}");
                    break RxOutcome::NoBuffers;
                }
            }
            let n = match self.source.recv_frame(&mut buf[NET_HDR_LEN..]) {
                Ok(0) => break RxOutcome::Drained,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break RxOutcome::Drained,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("virtio-net: RX read failed: {e}");
                    break RxOutcome::Drained;
                }
            };
            // virtio_net_hdr_v1: no offloads, num_buffers = 1 (last two bytes).
            buf[..NET_HDR_LEN].fill(0);
            buf[NET_HDR_LEN - 2..NET_HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
            let Some(chain) = rx.queue.pop_descriptor_chain(&rx.mem) else {
                tracing::warn!("virtio-net: RX avail ring is invalid; frame dropped");
                break RxOutcome::NoBuffers;
            };
            let head = chain.head_index();
            let packet = &buf[..NET_HDR_LEN + n];
            let len = match chain.writer(&rx.mem) {
                Ok(mut w) if w.available_bytes() >= packet.len() => {
                    match io::Write::write_all(&mut w, packet) {
                        // At most NET_HDR_LEN + MAX_FRAME_LEN bytes, the size of `buf`.
                        Ok(()) => u32::try_from(packet.len()).unwrap_or(u32::MAX),
                        Err(e) => {
                            tracing::warn!("virtio-net: RX write failed: {e}");
                            0
                        }
                    }
                }
                Ok(w) => {
                    tracing::warn!(
                        "virtio-net: RX buffer of {} bytes too small for a {}-byte packet; dropped",
                        w.available_bytes(),
                        packet.len()
                    );
                    0
                }
                Err(e) => {
                    tracing::warn!("virtio-net: bad RX buffer: {e}; frame dropped");
                    0
                }
            };
            if let Err(e) = rx.queue.add_used(&rx.mem, head, len) {
                tracing::warn!("virtio-net: cannot add RX used entry: {e}");
                break RxOutcome::NoBuffers;
            }
            delivered += 1;
        };
        if delivered > 0 {
            rx.interrupt.signal_used_queue();
        }
        outcome
    }

    /// Sends the frames the guest queued to the sink, until the ring is empty or the sink is
    /// full (then the rest wait, see the module docs).
    fn transmit(&mut self) {
        if self.paused {
            self.tx_stalled = true;
            return;
        }
        let Some(tx) = self.tx.as_mut() else {
            return;
        };
        self.tx_stalled = false;
        let mut frame = Vec::new();
        let mut completed = 0usize;
        loop {
            if !self.sink.has_room() {
                self.tx_stalled = true;
                break;
            }
            let Some(chain) = tx.queue.pop_descriptor_chain(&tx.mem) else {
                break;
            };
            let head = chain.head_index();
            match chain.reader(&tx.mem) {
                Ok(mut r) => {
                    let total = r.available_bytes();
                    if total < NET_HDR_LEN || total - NET_HDR_LEN > MAX_FRAME_LEN {
                        tracing::warn!("virtio-net: TX packet of {total} bytes dropped");
                    } else {
                        let mut hdr = [0u8; NET_HDR_LEN];
                        frame.resize(total - NET_HDR_LEN, 0);
                        let read = io::Read::read_exact(&mut r, &mut hdr)
                            .and_then(|()| io::Read::read_exact(&mut r, &mut frame));
                        match read {
                            Ok(()) => self.sink.send_frame(&frame),
                            Err(e) => tracing::warn!("virtio-net: TX read failed: {e}"),
                        }
                    }
                }
                Err(e) => tracing::warn!("virtio-net: bad TX chain: {e}"),
            }
            // TX buffers are device-readable only: the used length is 0.
            if let Err(e) = tx.queue.add_used(&tx.mem, head, 0) {
                // A bad head index (guest bug) loses only that chain; go on with the rest.
                tracing::warn!("virtio-net: cannot add TX used entry: {e}");
                continue;
            }
            completed += 1;
        }
        if completed > 0 {
            tx.interrupt.signal_used_queue();
        }
    }
}

struct Worker {
    stop: EventFd,
    handle: JoinHandle<()>,
}

/// The worker loop; see the module docs.
fn worker(shared: Arc<Shared>, stop: EventFd, source_fd: RawFd) {
    let epoll = match Epoll::new() {
        Ok(e) => e,
        Err(e) => {
            tracing::error!("virtio-net: RX worker cannot create epoll: {e}");
            return;
        }
    };
    let add = |fd: RawFd, token: u64| {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
    };
    if let Err(e) = add(stop.as_raw_fd(), TOKEN_STOP)
        .and_then(|()| add(shared.kick.as_raw_fd(), TOKEN_KICK))
        .and_then(|()| add(source_fd, TOKEN_SOURCE))
    {
        tracing::error!("virtio-net: RX worker cannot register fds: {e}");
        return;
    }
    let mut armed = true;
    let mut buf = vec![0u8; NET_HDR_LEN + MAX_FRAME_LEN];
    let mut events = [EpollEvent::default(); 4];
    loop {
        let outcome = {
            let mut inner = shared.lock();
            if inner.tx_stalled {
                inner.transmit();
            }
            inner.deliver(&mut buf)
        };
        // Watch the source only while frames can be delivered; otherwise a level-triggered
        // readable tap would spin this loop. A kick (new buffers, resume) re-arms it.
        let want_armed = matches!(outcome, RxOutcome::Drained | RxOutcome::Budget);
        if want_armed != armed {
            let r = if want_armed {
                add(source_fd, TOKEN_SOURCE)
            } else {
                epoll.ctl(ControlOperation::Delete, source_fd, EpollEvent::default())
            };
            match r {
                Ok(()) => armed = want_armed,
                Err(e) => tracing::warn!("virtio-net: RX worker epoll update failed: {e}"),
            }
        }
        let timeout = if outcome == RxOutcome::Budget { 0 } else { -1 };
        let n = match epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("virtio-net: RX worker epoll failed: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_STOP => return,
                TOKEN_KICK => {
                    // Reset the counter; the delivery pass at the loop head does the work.
                    let _ = shared.kick.read();
                }
                _ => {}
            }
        }
    }
}

/// The source a device has for the instant its source is being replaced.
struct NoSource(RawFd);

impl AsRawFd for NoSource {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

impl FrameSource for NoSource {
    fn recv_frame(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }
}

/// The sink a device has for the instant its sink is being replaced.
struct Unplugged;

impl FrameSink for Unplugged {
    fn send_frame(&mut self, _frame: &[u8]) {}
}

/// The virtio-net device model.
pub struct Net {
    mac: [u8; 6],
    queue_sizes: [u16; 2],
    shared: Arc<Shared>,
    source_fd: RawFd,
    worker: Option<Worker>,
}

impl Net {
    /// A net device with MAC `mac`, receiving from `source` and transmitting to `sink`.
    pub fn new(
        mac: [u8; 6],
        source: Box<dyn FrameSource>,
        sink: Box<dyn FrameSink>,
    ) -> Result<Net, NetError> {
        let kick = EventFd::new(libc::EFD_NONBLOCK).map_err(NetError::EventFd)?;
        let source_fd = source.as_raw_fd();
        Ok(Net {
            mac,
            queue_sizes: [NET_QUEUE_SIZE, NET_QUEUE_SIZE],
            shared: Arc::new(Shared {
                inner: Mutex::new(Inner {
                    source,
                    sink,
                    paused: false,
                    rx: None,
                    tx: None,
                    tx_stalled: false,
                }),
                kick,
            }),
            source_fd,
            worker: None,
        })
    }

    /// A net device on `tap`: RX reads the tap, TX writes to a clone of its fd.
    pub fn with_tap(mac: [u8; 6], tap: Tap) -> Result<Net, NetError> {
        let sink = tap.try_clone()?;
        Self::new(mac, Box::new(tap), Box::new(sink))
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Puts `wrap` in front of the TX sink (e.g. an output-commit buffer that sends to the
    /// old sink): the sink becomes `wrap(old sink)`.
    pub fn wrap_sink(&mut self, wrap: impl FnOnce(Box<dyn FrameSink>) -> Box<dyn FrameSink>) {
        let mut inner = self.shared.lock();
        let old = std::mem::replace(&mut inner.sink, Box::new(Unplugged));
        inner.sink = wrap(old);
    }

    /// Puts `wrap` in front of the RX source (e.g. a log of what the guest receives, or
    /// frames to deliver before the tap's): the source becomes `wrap(old source)`, which must
    /// keep the old source's fd, the one the RX worker waits on.
    pub fn wrap_source(&mut self, wrap: impl FnOnce(Box<dyn FrameSource>) -> Box<dyn FrameSource>) {
        let mut inner = self.shared.lock();
        let old = std::mem::replace(&mut inner.source, Box::new(NoSource(self.source_fd)));
        inner.source = wrap(old);
        debug_assert_eq!(inner.source.as_raw_fd(), self.source_fd);
        drop(inner);
        // The new source may have frames before its fd is readable.
        self.shared.wake();
    }

    /// A handle to pause, resume and wake the device from another thread without the
    /// transport's lock.
    pub fn control(&self) -> NetControl {
        NetControl(self.shared.clone())
    }

    fn start_worker(&mut self) -> Result<(), DeviceError> {
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::Worker)?;
        let stop_clone = stop.try_clone().map_err(DeviceError::Worker)?;
        let shared = self.shared.clone();
        let fd = self.source_fd;
        let handle = std::thread::Builder::new()
            .name("ftvmm-net".into())
            .spawn(move || worker(shared, stop_clone, fd))
            .map_err(DeviceError::Worker)?;
        self.worker = Some(Worker { stop, handle });
        Ok(())
    }

    fn deactivate(&mut self) {
        let mut inner = self.shared.lock();
        inner.rx = None;
        inner.tx = None;
        inner.tx_stalled = false;
    }

    fn stop_worker(&mut self) {
        if let Some(w) = self.worker.take() {
            if let Err(e) = w.stop.write(1) {
                tracing::error!("virtio-net: cannot stop the worker: {e}");
                return;
            }
            if w.handle.join().is_err() {
                tracing::error!("virtio-net: the worker panicked");
            }
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

impl VirtioDevice for Net {
    type State = NetState;

    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn features(&self) -> u64 {
        1u64 << VIRTIO_NET_F_MAC
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // virtio_net_config: mac[6]; later fields need features we do not offer.
        read_config_bytes(&self.mac, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::warn!("virtio-net: config write at {offset:#x} ignored");
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
        _acked_features: u64,
    ) -> Result<(), DeviceError> {
        let [rx, tx]: [Queue; 2] =
            queues
                .try_into()
                .map_err(|q: Vec<Queue>| DeviceError::QueueCount {
                    expected: 2,
                    got: q.len(),
                })?;
        self.stop_worker();
        {
            let mut inner = self.shared.lock();
            inner.rx = Some(ActiveQueue {
                mem: mem.clone(),
                queue: rx,
                interrupt: interrupt.clone(),
            });
            inner.tx = Some(ActiveQueue {
                mem,
                queue: tx,
                interrupt,
            });
        }
        if let Err(e) = self.start_worker() {
            self.deactivate();
            return Err(e);
        }
        Ok(())
    }

    fn queue_notify(&mut self, index: u16) {
        match index {
            RX_QUEUE => self.shared.wake(),
            TX_QUEUE => self.shared.lock().transmit(),
            _ => tracing::warn!("virtio-net: notify of nonexistent queue {index}"),
        }
    }

    fn reset(&mut self) {
        self.stop_worker();
        self.deactivate();
    }

    fn queue_states(&self) -> Vec<QueueState> {
        let inner = self.shared.lock();
        match (inner.rx.as_ref(), inner.tx.as_ref()) {
            (Some(rx), Some(tx)) => vec![rx.queue.state(), tx.queue.state()],
            _ => Vec::new(),
        }
    }

    fn save_state(&self) -> NetState {
        NetState { mac: self.mac }
    }

    fn restore_state(&mut self, state: &NetState) -> Result<(), DeviceError> {
        self.mac = state.mac;
        Ok(())
    }

    fn pause(&mut self) {
        self.control().pause();
    }

    fn resume(&mut self) {
        self.control().resume();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::mmio::{MmioState, MmioTransport};
    use crate::devices::virtio::testutil::*;
    use crate::devices::MmioDevice;
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::sync::atomic::AtomicUsize;
    use std::time::{Duration, Instant};
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn macs() {
        assert_eq!(parse_mac("02:00:00:00:00:0a"), Ok([2, 0, 0, 0, 0, 10]));
        assert!(parse_mac("02:00:00:00:00").is_err());
        assert!(parse_mac("02:00:00:00:00:zz").is_err());
    }

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const RX_BUFS: u64 = 0x40_0000;
    const TX_BUFS: u64 = 0x60_0000;

    /// One end of a SOCK_SEQPACKET pair: preserves frame boundaries like a tap.
    struct SockSource(OwnedFd);

    impl AsRawFd for SockSource {
        fn as_raw_fd(&self) -> RawFd {
            self.0.as_raw_fd()
        }
    }

    impl FrameSource for SockSource {
        fn recv_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            // SAFETY: `buf` is valid for `buf.len()` bytes of writes.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            // Negative on failure, with errno set.
            usize::try_from(n).map_err(|_| io::Error::last_os_error())
        }
    }

    /// Returns (device end, peer end); the device end is nonblocking.
    fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors socketpair writes.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0);
        // SAFETY: fresh descriptors owned by nothing else.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: F_SETFL on `a`, which is open; its argument is an integer, not memory.
        unsafe { libc::fcntl(a.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        (a, b)
    }

    fn send(peer: &OwnedFd, frame: &[u8]) {
        // SAFETY: `frame` is valid for reads of its length.
        let n = unsafe { libc::send(peer.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(usize::try_from(n).ok(), Some(frame.len()));
    }

    /// Keeps the frames it gets; has room for at most `.1` of them.
    #[derive(Clone)]
    struct TestSink(Arc<Mutex<Vec<Vec<u8>>>>, Arc<AtomicUsize>);

    impl Default for TestSink {
        fn default() -> Self {
            Self(Arc::default(), Arc::new(AtomicUsize::new(usize::MAX)))
        }
    }

    impl FrameSink for TestSink {
        fn send_frame(&mut self, frame: &[u8]) {
            self.0.lock().unwrap().push(frame.to_vec());
        }
        fn has_room(&self) -> bool {
            self.0.lock().unwrap().len() < self.1.load(Ordering::SeqCst)
        }
    }

    struct Rig {
        mem: GuestMemory,
        t: MmioTransport<Net>,
        rxq: DriverQueue,
        txq: DriverQueue,
        peer: OwnedFd,
        dev_end: OwnedFd,
        sink: TestSink,
        next_rx: u64,
    }

    fn rig() -> Rig {
        let mem = test_memory();
        let (dev_end, peer) = seqpacket_pair();
        let sink = TestSink::default();
        let source = SockSource(dev_end.try_clone().unwrap());
        let net = Net::new(MAC, Box::new(source), Box::new(sink.clone())).unwrap();
        let mut t = MmioTransport::new(net, mem.clone());
        negotiate(&mut t, 1 << VIRTIO_NET_F_MAC);
        let rxl = QueueLayout::new(0x1_0000, 16);
        let txl = QueueLayout::new(0x2_0000, 16);
        setup_queue(&mut t, 0, &rxl);
        setup_queue(&mut t, 1, &txl);
        driver_ok(&mut t);
        Rig {
            mem,
            t,
            rxq: DriverQueue::new(rxl),
            txq: DriverQueue::new(txl),
            peer,
            dev_end,
            sink,
            next_rx: 0,
        }
    }

    impl Rig {
        /// Posts `n` RX buffers of `size` bytes and kicks the RX queue once.
        fn post_rx(&mut self, n: usize, size: u32) -> Vec<u64> {
            let mut addrs = Vec::new();
            for _ in 0..n {
                let a = RX_BUFS + (self.next_rx % 32) * 0x1_0000;
                self.next_rx += 1;
                self.rxq.add_chain(&self.mem, &[(a, size, true)]);
                addrs.push(a);
            }
            wr(&mut self.t, 0x050, 0);
            addrs
        }

        fn wait_rx_used(&mut self, n: usize) -> Vec<(u32, u32)> {
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut got = Vec::new();
            while got.len() < n && Instant::now() < deadline {
                got.extend(self.rxq.take_used(&self.mem));
                std::thread::sleep(Duration::from_millis(2));
            }
            got
        }

        fn rx_packet(&self, addr: u64, len: u32) -> (Vec<u8>, Vec<u8>) {
            let mut b = vec![0u8; len as usize];
            self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            let frame = b.split_off(NET_HDR_LEN);
            (b, frame)
        }
    }

    /// `len` bytes counting up from `i`, wrapping.
    fn frame(i: u8, len: usize) -> Vec<u8> {
        std::iter::successors(Some(i), |b| Some(b.wrapping_add(1)))
            .take(len)
            .collect()
    }

    #[test]
    fn config_space_has_mac() {
        let mut r = rig();
        let mut m = [0u8; 8];
        r.t.read(0x100, &mut m);
        assert_eq!(&m[..6], &MAC);
        assert_eq!(&m[6..], &[0, 0]);
        assert_eq!(rd(&mut r.t, 0x008), 1);
        wr(&mut r.t, 0x014, 0);
        assert_eq!(rd(&mut r.t, 0x010), 1 << VIRTIO_NET_F_MAC);
    }

    #[test]
    fn tx_delivers_frames_to_sink() {
        let mut r = rig();
        for i in 0..3u8 {
            let f = frame(i, 60 + usize::from(i));
            let base = TX_BUFS + u64::from(i) * 0x1000;
            r.mem
                .write_slice(&[0u8; NET_HDR_LEN], GuestAddress(base))
                .unwrap();
            // Header and first 20 bytes in one descriptor, the rest in another.
            r.mem
                .write_slice(&f[..20], GuestAddress(base + 12))
                .unwrap();
            r.mem
                .write_slice(&f[20..], GuestAddress(base + 0x800))
                .unwrap();
            r.txq.add_chain(
                &r.mem,
                &[
                    (base, 32, false),
                    (base + 0x800, u32::try_from(f.len() - 20).unwrap(), false),
                ],
            );
        }
        // A header-only-too-short packet is dropped but completed.
        r.txq.add_chain(&r.mem, &[(TX_BUFS + 0x8000, 4, false)]);
        wr(&mut r.t, 0x050, 1);
        let used = r.txq.take_used(&r.mem);
        assert_eq!(used.len(), 4);
        assert!(used.iter().all(|&(_, len)| len == 0));
        let frames = r.sink.0.lock().unwrap().clone();
        assert_eq!(
            frames,
            (0..3u8)
                .map(|i| frame(i, 60 + usize::from(i)))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn rx_delivers_frames_and_keeps_them_queued_without_buffers() {
        let mut r = rig();
        let addrs = r.post_rx(2, 2048);
        for i in 0..3u8 {
            send(&r.peer, &frame(i, 100));
        }
        let used = r.wait_rx_used(2);
        assert_eq!(used.len(), 2);
        for (k, &(id, len)) in used.iter().enumerate() {
            assert_eq!(id as usize, k);
            assert_eq!(len as usize, NET_HDR_LEN + 100);
            let (hdr, f) = r.rx_packet(addrs[k], len);
            assert_eq!(hdr, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
            assert_eq!(f, frame(u8::try_from(k).unwrap(), 100));
        }
        // The third frame waits in the source until the guest posts a buffer.
        std::thread::sleep(Duration::from_millis(50));
        assert!(r.rxq.take_used(&r.mem).is_empty());
        let addrs = r.post_rx(1, 2048);
        let used = r.wait_rx_used(1);
        assert_eq!(used.len(), 1);
        assert_eq!(r.rx_packet(addrs[0], used[0].1).1, frame(2, 100));
        assert_ne!(rd(&mut r.t, 0x060) & 1, 0);
    }

    #[test]
    fn rx_small_buffer_drops_frame_without_panic() {
        let mut r = rig();
        r.post_rx(1, 50);
        send(&r.peer, &frame(9, 100));
        let used = r.wait_rx_used(1);
        assert_eq!(used, vec![(0, 0)]);
        // Still works.
        r.post_rx(1, 2048);
        send(&r.peer, &frame(1, 64));
        assert_eq!(r.wait_rx_used(1).len(), 1);
    }

    /// Queues `n` 60-byte TX frames (ids `first..`) and kicks the TX queue once.
    fn queue_tx(r: &mut Rig, first: u8, n: u8) {
        for i in first..first + n {
            let base = TX_BUFS + u64::from(i) * 0x100;
            r.mem
                .write_slice(&[0u8; NET_HDR_LEN], GuestAddress(base))
                .unwrap();
            r.mem
                .write_slice(&frame(i, 60), GuestAddress(base + 12))
                .unwrap();
            r.txq.add_chain(&r.mem, &[(base, 72, false)]);
        }
        wr(&mut r.t, 0x050, 1);
    }

    #[test]
    fn a_full_sink_stalls_tx_until_woken_and_loses_nothing() {
        let mut r = rig();
        r.sink.1.store(2, Ordering::SeqCst);
        queue_tx(&mut r, 0, 5);
        assert_eq!(r.txq.take_used(&r.mem).len(), 2, "only what the sink takes");
        // Room for everything, then a wake: the worker sends the frames left in the ring.
        r.sink.1.store(usize::MAX, Ordering::SeqCst);
        r.t.device().control().wake();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut used = 0;
        while used < 3 && Instant::now() < deadline {
            used += r.txq.take_used(&r.mem).len();
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(used, 3);
        let frames = r.sink.0.lock().unwrap().clone();
        assert_eq!(frames, (0..5u8).map(|i| frame(i, 60)).collect::<Vec<_>>());
    }

    #[test]
    fn paused_rx_writes_no_guest_memory() {
        let mut r = rig();
        let ctl = r.t.device().control();
        r.t.pause();
        assert!(ctl.is_paused());
        let addrs = r.post_rx(1, 2048);
        send(&r.peer, &frame(3, 80));
        std::thread::sleep(Duration::from_millis(100));
        assert!(r.rxq.take_used(&r.mem).is_empty());
        let (_, f) = r.rx_packet(addrs[0], 20);
        assert_eq!(f, [0u8; 8], "buffer untouched while paused");
        ctl.resume();
        let used = r.wait_rx_used(1);
        assert_eq!(used.len(), 1);
        assert_eq!(r.rx_packet(addrs[0], used[0].1).1, frame(3, 80));
    }

    #[test]
    fn save_restore_continues_rx_and_tx() {
        let mut r = rig();
        r.post_rx(2, 2048);
        send(&r.peer, &frame(1, 70));
        assert_eq!(r.wait_rx_used(1).len(), 1);
        // One TX packet sent before the snapshot.
        r.mem
            .write_slice(&[0u8; NET_HDR_LEN], GuestAddress(TX_BUFS))
            .unwrap();
        r.mem
            .write_slice(&frame(5, 60), GuestAddress(TX_BUFS + 12))
            .unwrap();
        r.txq.add_chain(&r.mem, &[(TX_BUFS, 72, false)]);
        wr(&mut r.t, 0x050, 1);
        assert_eq!(r.txq.take_used(&r.mem).len(), 1);

        r.t.pause();
        let state = r.t.save_state();
        let json = serde_json::to_string(&state).unwrap();
        let state: MmioState<NetState> = serde_json::from_str(&json).unwrap();
        assert_eq!(state.transport.queues[0].next_avail, 1);
        assert_eq!(state.transport.queues[1].next_used, 1);
        assert_eq!(state.device.mac, MAC);

        // A fresh device (another "process") on the same memory and backend.
        let sink2 = TestSink::default();
        let source = SockSource(r.dev_end.try_clone().unwrap());
        let net2 = Net::new([0; 6], Box::new(source), Box::new(sink2.clone())).unwrap();
        let mut t2 = MmioTransport::new(net2, r.mem.clone());
        t2.restore_state(&state).unwrap();
        assert_eq!(t2.device().mac(), MAC);
        let old = std::mem::replace(&mut r.t, t2);
        drop(old);

        // RX continues into the buffer posted before the snapshot.
        send(&r.peer, &frame(2, 70));
        let used = r.wait_rx_used(1);
        assert_eq!(used, vec![(1, u32::try_from(NET_HDR_LEN + 70).unwrap())]);
        // TX continues.
        r.mem
            .write_slice(&frame(6, 60), GuestAddress(TX_BUFS + 0x1000 + 12))
            .unwrap();
        r.txq.add_chain(&r.mem, &[(TX_BUFS + 0x1000, 72, false)]);
        wr(&mut r.t, 0x050, 1);
        assert_eq!(r.txq.take_used(&r.mem).len(), 1);
        assert_eq!(sink2.0.lock().unwrap().clone(), vec![frame(6, 60)]);
    }

    #[test]
    fn reset_stops_worker_and_reactivates() {
        let mut r = rig();
        wr(&mut r.t, 0x070, 0);
        assert!(r.t.device().worker.is_none());
        assert!(r.t.device().queue_states().is_empty());
        // Renegotiate with fresh rings and get traffic through again.
        negotiate(&mut r.t, 1 << VIRTIO_NET_F_MAC);
        let rxl = QueueLayout::new(0x3_0000, 16);
        setup_queue(&mut r.t, 0, &rxl);
        setup_queue(&mut r.t, 1, &QueueLayout::new(0x4_0000, 16));
        driver_ok(&mut r.t);
        r.rxq = DriverQueue::new(rxl);
        r.post_rx(1, 2048);
        send(&r.peer, &frame(4, 64));
        assert_eq!(r.wait_rx_used(1).len(), 1);
    }

    /// End to end on a real tap (root only): the kernel's ARP request for a neighbour on the
    /// tap's subnet arrives in a guest RX buffer.
    #[test]
    fn rx_from_real_tap() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/dev/net/tun").exists() {
            return;
        }
        let name = format!("ftvn{}", std::process::id() % 100_000);
        let tap = Tap::open(&name).unwrap();
        let ok = std::process::Command::new("ip")
            .args(["addr", "add", "198.51.100.1/24", "dev", &name])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip addr add on {name} failed");
        let mem = test_memory();
        let mut t = MmioTransport::new(Net::with_tap(MAC, tap).unwrap(), mem.clone());
        negotiate(&mut t, 1 << VIRTIO_NET_F_MAC);
        let rxl = QueueLayout::new(0x1_0000, 16);
        setup_queue(&mut t, 0, &rxl);
        setup_queue(&mut t, 1, &QueueLayout::new(0x2_0000, 16));
        driver_ok(&mut t);
        let mut rxq = DriverQueue::new(rxl);
        for i in 0..8 {
            rxq.add_chain(&mem, &[(RX_BUFS + i * 0x1_0000, 2048, true)]);
        }
        wr(&mut t, 0x050, 0);
        let s = std::net::UdpSocket::bind("198.51.100.1:0").unwrap();
        let _ = s.send_to(b"x", "198.51.100.2:9");
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut arp = false;
        while !arp && Instant::now() < deadline {
            for (id, len) in rxq.take_used(&mem) {
                let mut b = vec![0u8; len as usize];
                mem.read_slice(&mut b, GuestAddress(RX_BUFS + u64::from(id) * 0x1_0000))
                    .unwrap();
                arp |= b.len() >= NET_HDR_LEN + 14
                    && b[NET_HDR_LEN + 12..NET_HDR_LEN + 14] == [0x08, 0x06];
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(arp, "ARP request from the host reached the guest");
    }
}
