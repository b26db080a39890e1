//! What the guest receives, logged to the standby as it arrives, so that a failover loses
//! none of it.
//!
//! A checkpoint holds the guest as it was when it paused; the frames it received afterwards
//! (a client's request, a stream's next segments) reached only the primary, and a standby that
//! resumes from that checkpoint would make every sender wait for its retransmission timer
//! (200 ms and more). So the primary numbers each frame it delivers to the guest, sends it on
//! the control connection at once ([`crate::wire::Message::Input`]), and records in each
//! checkpoint how many frames the guest had received by then
//! ([`crate::staging::CheckpointState::input`]). The standby keeps the frames after its last
//! committed checkpoint and, if it takes over, delivers them to the resumed guest before
//! anything its own tap receives: to the guest's peers the failover looks like a short delay.
//!
//! The standby acknowledges what it holds ([`crate::wire::Message::InputAck`]); the primary
//! then lets go of the guest's pure TCP acknowledgements of that input before their epoch
//! commits (see [`netbuf::acks`]): a resumed guest receives the same input again, so what
//! they told the sender stays true.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use netbuf::Received;
use vmm::devices::virtio::net::FrameSource;

/// Frames the primary queues for the standby at most; beyond, it stops logging for the rest
/// of the protection (a standby that far behind is about to be judged slow anyway).
const QUEUED_BYTES: usize = 16 << 20;
/// Frames a standby keeps at most after its last committed checkpoint.
const KEPT_BYTES: usize = 64 << 20;

/// The primary's count and log of the frames its guest receives; clones share it.
#[derive(Clone)]
pub struct InputLog {
    shared: Arc<LogShared>,
}

struct LogShared {
    queue: Mutex<Queue>,
    ready: Condvar,
    /// Frames delivered to the guest so far (the number the next one gets), shared with the
    /// frame gate, which tags what the guest sends with it.
    received: Received,
}

struct Queue {
    /// Frames are queued for the standby.
    recording: bool,
    /// Number of the first queued frame.
    first: u64,
    frames: Vec<Vec<u8>>,
    bytes: usize,
}

impl InputLog {
    /// A log whose first frame is number `delivered` (the count of the checkpoint a resumed
    /// guest comes from, so that the numbers go on where its standby expects them).
    pub fn new(delivered: u64) -> Self {
        Self {
            shared: Arc::new(LogShared {
                queue: Mutex::new(Queue {
                    recording: false,
                    first: delivered,
                    frames: Vec::new(),
                    bytes: 0,
                }),
                ready: Condvar::new(),
                received: {
                    let received = Received::default();
                    received.set(delivered);
                    received
                },
            }),
        }
    }

    /// The count of delivered frames, shared (see [`netbuf::FrameGateSink`]).
    pub fn received(&self) -> Received {
        self.shared.received.clone()
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.shared.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Frames delivered to the guest so far (read while it is paused: what its checkpoint
    /// has received).
    pub fn delivered(&self) -> u64 {
        self.shared.received.get()
    }

    /// Queues frames for the standby from now on (`on`), or no longer.
    pub fn record(&self, on: bool) {
        let mut q = self.lock();
        q.recording = on;
        q.first = self.delivered();
        q.frames.clear();
        q.bytes = 0;
        drop(q);
        self.shared.ready.notify_all();
    }

    /// The frames queued since the last call and the number of the first, waiting up to
    /// `wait` for one; None if none came or logging stopped.
    pub fn next_batch(&self, wait: Duration) -> Option<(u64, Vec<Vec<u8>>)> {
        let q = self.lock();
        let (mut q, _) = self
            .shared
            .ready
            .wait_timeout_while(q, wait, |q| q.recording && q.frames.is_empty())
            .unwrap_or_else(|e| e.into_inner());
        if q.frames.is_empty() {
            return None;
        }
        let first = q.first;
        let frames = std::mem::take(&mut q.frames);
        q.first += vmm::cast::usize_to_u64(frames.len());
        q.bytes = 0;
        Some((first, frames))
    }

    /// `source` with every frame it yields counted (and queued while recording).
    pub fn wrap(&self, source: Box<dyn FrameSource>) -> Box<dyn FrameSource> {
        Box::new(LoggedSource {
            inner: source,
            log: self.clone(),
        })
    }

    fn delivering(&self, frame: &[u8]) {
        // Under the queue's lock, so that queued frames keep consecutive numbers; before the
        // frame is in the guest's memory, so that whatever the guest sends in answer is tagged
        // with a count that includes it.
        let mut q = self.lock();
        self.shared.received.add_one();
        if !q.recording {
            return;
        }
        if q.bytes + frame.len() > QUEUED_BYTES {
            tracing::warn!("the standby is far behind the guest's input: no longer logging it");
            q.recording = false;
            q.frames.clear();
            q.bytes = 0;
            return;
        }
        q.bytes += frame.len();
        q.frames.push(frame.to_vec());
        drop(q);
        self.shared.ready.notify_one();
    }
}

/// A source whose frames an [`InputLog`] counts: the net device writes each frame it reads
/// into the guest's memory under the same lock, so a frame counted before a pause is in the
/// checkpoint taken during it.
struct LoggedSource {
    inner: Box<dyn FrameSource>,
    log: InputLog,
}

impl AsRawFd for LoggedSource {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

impl FrameSource for LoggedSource {
    fn recv_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.recv_frame(buf)?;
        self.log.delivering(&buf[..n]);
        Ok(n)
    }
}

/// The standby's copy of the primary's input log since its last committed checkpoint.
#[derive(Debug, Default)]
pub struct ReceivedInput {
    /// Number of the first kept frame.
    first: u64,
    frames: VecDeque<Vec<u8>>,
    bytes: usize,
    /// A frame is missing (the primary stopped logging, or this node could keep no more):
    /// nothing after it can be vouched for.
    broken: bool,
}

impl ReceivedInput {
    fn end(&self) -> u64 {
        self.first + vmm::cast::usize_to_u64(self.frames.len())
    }

    /// Keeps frames `first..` (numbered as the primary numbered them), dropping those before
    /// `committed` (the count of the last committed checkpoint: its guest has them). Returns
    /// the number before which this node holds every frame, the primary's to acknowledge;
    /// None once a frame went missing.
    pub fn append(&mut self, first: u64, frames: Vec<Vec<u8>>, committed: u64) -> Option<u64> {
        if self.frames.is_empty() && !self.broken {
            self.first = first;
        }
        if first != self.end() {
            self.broken = true;
        }
        if self.broken {
            return None;
        }
        for frame in frames {
            self.bytes += frame.len();
            self.frames.push_back(frame);
        }
        while self.first < committed {
            let Some(frame) = self.frames.pop_front() else {
                self.first = committed;
                break;
            };
            self.bytes -= frame.len();
            self.first += 1;
        }
        if self.bytes > KEPT_BYTES {
            tracing::warn!("the guest's input since the last checkpoint outgrew this standby");
            self.broken = true;
            return None;
        }
        Some(self.end())
    }

    /// The frames a guest resumed from a checkpoint that had received `from` frames must get
    /// again, in order: those kept from `from` on, up to the first missing one.
    pub fn since(mut self, from: u64) -> VecDeque<Vec<u8>> {
        if from < self.first {
            // The checkpoint is older than what is kept (it cannot be: frames are dropped
            // only once a checkpoint that has them commits); deliver nothing rather than a
            // stream with a hole.
            return VecDeque::new();
        }
        let skip = vmm::cast::u64_to_usize(from - self.first).min(self.frames.len());
        self.frames.drain(..skip);
        self.frames
    }
}

/// A source that yields `frames` before those of `inner`: a resumed guest gets the input its
/// checkpoint missed before anything that came since.
pub struct ReplaySource {
    frames: VecDeque<Vec<u8>>,
    inner: Box<dyn FrameSource>,
}

impl ReplaySource {
    pub fn new(frames: VecDeque<Vec<u8>>, inner: Box<dyn FrameSource>) -> Self {
        Self { frames, inner }
    }
}

impl AsRawFd for ReplaySource {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

impl FrameSource for ReplaySource {
    fn recv_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.frames.pop_front() {
            Some(frame) => {
                let n = frame.len().min(buf.len());
                buf[..n].copy_from_slice(&frame[..n]);
                Ok(n)
            }
            None => self.inner.recv_frame(buf),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames from a list; the fd is never waited on here.
    struct Frames(VecDeque<Vec<u8>>);

    impl AsRawFd for Frames {
        fn as_raw_fd(&self) -> RawFd {
            -1
        }
    }

    impl FrameSource for Frames {
        fn recv_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let frame = self.0.pop_front().ok_or(io::ErrorKind::WouldBlock)?;
            buf[..frame.len()].copy_from_slice(&frame);
            Ok(frame.len())
        }
    }

    fn frames(range: std::ops::Range<u8>) -> VecDeque<Vec<u8>> {
        range.map(|i| vec![i; usize::from(i) + 1]).collect()
    }

    fn drain(source: &mut dyn FrameSource) -> Vec<Vec<u8>> {
        let mut buf = [0u8; 64];
        std::iter::from_fn(|| source.recv_frame(&mut buf).ok().map(|n| buf[..n].to_vec())).collect()
    }

    #[test]
    fn the_log_numbers_every_frame_and_queues_only_while_recording() {
        let log = InputLog::new(10);
        let mut source = log.wrap(Box::new(Frames(frames(0..5))));
        let mut buf = [0u8; 64];
        source.recv_frame(&mut buf).unwrap();
        assert_eq!(log.delivered(), 11);
        assert_eq!(log.next_batch(Duration::ZERO), None, "not recording");
        log.record(true);
        let rest = drain(&mut *source);
        assert_eq!(rest.len(), 4);
        assert_eq!(log.delivered(), 15);
        assert_eq!(log.next_batch(Duration::ZERO), Some((11, rest)));
        assert_eq!(log.next_batch(Duration::ZERO), None);
    }

    #[test]
    fn the_standby_keeps_what_follows_its_checkpoint() {
        let mut kept = ReceivedInput::default();
        assert_eq!(kept.append(5, frames(0..3).into(), 0), Some(8));
        // Checkpoint with 6 frames committed: frame 5 is in it.
        assert_eq!(kept.append(8, frames(3..4).into(), 6), Some(9));
        let again: Vec<_> = kept.since(7).into();
        assert_eq!(again, Vec::from(frames(2..4)));
    }

    #[test]
    fn a_missing_frame_stops_the_acknowledgements() {
        let mut kept = ReceivedInput::default();
        assert_eq!(kept.append(0, frames(0..2).into(), 0), Some(2));
        assert_eq!(
            kept.append(3, frames(3..4).into(), 0),
            None,
            "frame 2 is missing"
        );
        assert_eq!(kept.append(4, frames(4..5).into(), 0), None);
        // What came before the hole is still delivered, never what came after it.
        assert_eq!(kept.since(1).len(), 1);
    }

    #[test]
    fn replayed_frames_come_before_the_tap() {
        let tap = Frames(frames(10..12));
        let mut source = ReplaySource::new(frames(0..2), Box::new(tap));
        let got = drain(&mut source);
        let want: Vec<_> = frames(0..2).into_iter().chain(frames(10..12)).collect();
        assert_eq!(got, want);
    }
}
