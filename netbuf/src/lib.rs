//! Epoch-gated output: what a guest sends out (console bytes, network frames) is held per epoch
//! and released, in order, only once the checkpoint of its epoch is acknowledged; a node that
//! loses its role discards what it holds and releases nothing more.
//!
//! A [`Gate`] sits between a device and the world. Devices push into it through the sink
//! traits that `vmm` defines ([`ConsoleGateSink`], [`FrameGateSink`]); the checkpointer seals
//! the running epoch at each checkpoint (the [`Held`] output travels inside the checkpoint, so
//! that a standby that takes over can release it again) and releases sealed epochs as
//! acknowledgements arrive. The guest's pure TCP acknowledgements of input its standby
//! already holds may leave sooner ([`acks`]).

pub mod acks;
mod announce;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use vmm::cast::usize_to_u64;
use vmm::devices::{ConsoleSink, FrameSink};

pub use announce::{announcements, GuestAddresses, Ipv4};

/// A unit of output a gate holds.
pub trait Output: Clone + Send + 'static {
    /// How far this item advances the output stream (bytes for a console, 1 for a frame), so
    /// that a held run of items knows its position in the stream.
    fn units(&self) -> u64;
    /// Memory the item occupies while held.
    fn held_bytes(&self) -> usize;
}

/// Where released output goes.
pub trait Release<T>: Send {
    fn release(&mut self, item: &T);
}

/// A chunk of the guest's console byte stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleChunk(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl Output for ConsoleChunk {
    fn units(&self) -> u64 {
        usize_to_u64(self.0.len())
    }
    fn held_bytes(&self) -> usize {
        self.0.len()
    }
}

impl Release<ConsoleChunk> for Box<dyn ConsoleSink> {
    fn release(&mut self, item: &ConsoleChunk) {
        self.write_console(&item.0);
    }
}

/// One Ethernet frame the guest transmitted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frame {
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
    /// Frames the guest had received when it sent this one (see [`Received`]).
    pub input: u64,
}

impl Output for Frame {
    fn units(&self) -> u64 {
        1
    }
    fn held_bytes(&self) -> usize {
        self.bytes.len()
    }
}

impl Release<Frame> for Box<dyn FrameSink> {
    fn release(&mut self, item: &Frame) {
        self.send_frame(&item.bytes);
    }
}

/// How many frames the guest has received, as whoever delivers them counts; clones share it.
#[derive(Clone, Debug, Default)]
pub struct Received(Arc<AtomicU64>);

impl Received {
    /// Another frame is about to reach the guest.
    pub fn add_one(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }

    /// Counting from `n`.
    pub fn set(&self, n: u64) {
        self.0.store(n, Ordering::SeqCst);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Output not yet known to be released, as carried by a checkpoint: the items and the stream
/// position of the first one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held<T> {
    /// Stream position (in [`Output::units`]) of the first item.
    pub first: u64,
    pub items: Vec<T>,
}

impl<T> Default for Held<T> {
    fn default() -> Self {
        Self {
            first: 0,
            items: Vec::new(),
        }
    }
}

impl<T: Output> Held<T> {
    /// Stream position just after the last item.
    pub fn end(&self) -> u64 {
        self.first + self.items.iter().map(Output::units).sum::<u64>()
    }
}

/// What a gate does with output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Protected: output waits for its epoch's acknowledgement.
    Held,
    /// Unprotected: output is released at once.
    Open,
    /// Deposed: output is dropped.
    Closed,
}

struct GateState<T> {
    mode: Mode,
    /// Output of the running (unsealed) epoch, and when its first item came.
    running: Vec<T>,
    running_since: Option<Instant>,
    /// Sealed epochs not yet released, oldest first.
    sealed: VecDeque<(u64, Vec<T>)>,
    /// Stream position of the first item not yet released.
    released: u64,
    /// Bytes of the items held (running and sealed).
    held: usize,
    out: Box<dyn Release<T>>,
    /// Told after output left, so that a producer waiting for room can go on.
    on_release: Option<Box<dyn Fn() + Send>>,
    /// Told when the running epoch gets its first item, so that whoever ends epochs when
    /// output waits need not poll for it.
    on_first: Option<Arc<dyn Fn() + Send + Sync>>,
    /// Acknowledged output stays held (a swap: the node taking over releases it).
    held_back: bool,
    /// The last [`Gate::release_early`] rule, for items pushed after it: an item it picks
    /// leaves at once instead of waiting for the next call. Forgotten when the gate's mode
    /// changes (a new standby holds none of the old one's input).
    early: Option<EarlyRule<T>>,
}

/// Which held items may leave before their epoch's acknowledgement (see
/// [`Gate::release_early`]).
type EarlyRule<T> = Box<dyn Fn(&T) -> bool + Send>;

impl<T: Output> GateState<T> {
    fn emit(&mut self, items: Vec<T>) {
        for item in &items {
            self.out.release(item);
            self.released += item.units();
        }
    }

    /// Emits items that were held.
    fn emit_held(&mut self, items: Vec<T>) {
        self.held -= items.iter().map(Output::held_bytes).sum::<usize>();
        self.emit(items);
    }

    /// Emits, in order, the held items `pick` chooses; whether any.
    fn release_picked(&mut self, pick: &dyn Fn(&T) -> bool) -> bool {
        let Self {
            sealed,
            running,
            running_since,
            out,
            held,
            released,
            ..
        } = self;
        let mut any = false;
        for items in sealed
            .iter_mut()
            .map(|(_, items)| items)
            .chain(std::iter::once(&mut *running))
        {
            items.retain(|item| {
                if !pick(item) {
                    return true;
                }
                out.release(item);
                *held -= item.held_bytes();
                *released += item.units();
                any = true;
                false
            });
        }
        if running.is_empty() {
            // Nothing of the running epoch waits for it to end any more.
            *running_since = None;
        }
        any
    }
}

/// An output gate; clones share it.
pub struct Gate<T> {
    state: Arc<Mutex<GateState<T>>>,
}

impl<T> Clone for Gate<T> {
    fn clone(&self) -> Self {
        Self {
            state: self.state.clone(),
        }
    }
}

impl<T: Output> Gate<T> {
    /// A gate in `mode` releasing to `out`; the stream so far has `position` units.
    pub fn new(out: Box<dyn Release<T>>, position: u64, mode: Mode) -> Self {
        Self {
            state: Arc::new(Mutex::new(GateState {
                mode,
                running: Vec::new(),
                running_since: None,
                sealed: VecDeque::new(),
                released: position,
                held: 0,
                out,
                on_release: None,
                on_first: None,
                held_back: false,
                early: None,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, GateState<T>> {
        // A panic while releasing leaves the queues consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Calls `hook` (outside the gate's lock) each time held output leaves.
    pub fn set_on_release(&self, hook: Box<dyn Fn() + Send>) {
        self.lock().on_release = Some(hook);
    }

    fn released_held(&self) {
        let st = self.lock();
        if let Some(hook) = st.on_release.as_ref() {
            // Called with the lock held so that the hook cannot race a replacement; hooks only
            // signal (e.g. write an eventfd) and never take the gate.
            hook();
        }
    }

    /// Calls `hook` (outside the gate's lock) each time the running epoch gets its first
    /// held item; None removes it.
    pub fn set_on_first(&self, hook: Option<Arc<dyn Fn() + Send + Sync>>) {
        self.lock().on_first = hook;
    }

    /// Takes output from a device.
    pub fn push(&self, item: T) {
        let mut st = self.lock();
        let mut first = None;
        match st.mode {
            Mode::Held if !st.held_back && st.early.as_ref().is_some_and(|pick| pick(&item)) => {
                st.emit(vec![item]);
            }
            Mode::Held => {
                if st.running.is_empty() {
                    st.running_since = Some(Instant::now());
                    first = st.on_first.clone();
                }
                st.held += item.held_bytes();
                st.running.push(item);
            }
            Mode::Open => st.emit(vec![item]),
            Mode::Closed => {}
        }
        drop(st);
        if let Some(hook) = first {
            hook();
        }
    }

    /// Ends the running epoch as `epoch` and returns everything not yet released, this epoch's
    /// output included: what a standby must release if it takes over from this checkpoint.
    pub fn seal(&self, epoch: u64) -> Held<T> {
        let mut st = self.lock();
        let running = std::mem::take(&mut st.running);
        st.running_since = None;
        st.sealed.push_back((epoch, running));
        Held {
            first: st.released,
            items: st
                .sealed
                .iter()
                .flat_map(|(_, v)| v.iter().cloned())
                .collect(),
        }
    }

    /// Releases, in order, the output of every sealed epoch up to `epoch` (acknowledged);
    /// whether any output left.
    pub fn release_through(&self, epoch: u64) -> bool {
        let mut st = self.lock();
        if st.mode != Mode::Held || st.held_back {
            return false;
        }
        let mut any = false;
        while st.sealed.front().is_some_and(|(e, _)| *e <= epoch) {
            if let Some((_, items)) = st.sealed.pop_front() {
                any |= !items.is_empty();
                st.emit_held(items);
            }
        }
        drop(st);
        if any {
            self.released_held();
        }
        any
    }

    /// Releases at once, in order, the held items that `pick` chooses (it sees every held
    /// item, oldest first); whether any left. Until the next call, an item pushed that `pick`
    /// chooses leaves at once too: what it acknowledges may be held already when it comes, and
    /// nothing else would release it before its epoch ends. Only while protected and not
    /// holding back for a swap.
    pub fn release_early(&self, pick: impl Fn(&T) -> bool + Send + 'static) -> bool {
        let mut st = self.lock();
        if st.mode != Mode::Held {
            return false;
        }
        let any = !st.held_back && st.release_picked(&pick);
        st.early = Some(Box::new(pick));
        drop(st);
        if any {
            self.released_held();
        }
        any
    }

    /// Goes unprotected: releases everything held, in order, and passes later output through.
    pub fn open(&self) {
        let mut st = self.lock();
        if st.mode == Mode::Closed {
            return;
        }
        st.mode = Mode::Open;
        st.early = None;
        let mut items: Vec<T> = st.sealed.drain(..).flat_map(|(_, v)| v).collect();
        items.append(&mut st.running);
        st.running_since = None;
        st.emit_held(items);
        drop(st);
        self.released_held();
    }

    /// While `on`, acknowledgements release nothing: what is held stays in every later
    /// checkpoint, for the node a swap hands the guest to (released here once `on` is off).
    pub fn hold_back(&self, on: bool) {
        self.lock().held_back = on;
    }

    /// Protected again (a returning standby holds a checkpoint): output from now on waits for
    /// its epoch's acknowledgement. A closed gate stays closed.
    pub fn hold(&self) {
        let mut st = self.lock();
        if st.mode == Mode::Open {
            st.mode = Mode::Held;
            st.early = None;
        }
    }

    /// Stops for good: drops everything held and all later output.
    pub fn close(&self) {
        let mut st = self.lock();
        st.mode = Mode::Closed;
        st.early = None;
        st.sealed.clear();
        st.running.clear();
        st.running_since = None;
        st.held = 0;
        drop(st);
        // Whoever waits for room must not wait forever: closed output is dropped at once.
        self.released_held();
    }

    /// Bytes held (sealed and running).
    pub fn held_bytes(&self) -> usize {
        self.lock().held
    }

    /// Bytes held in the running epoch.
    pub fn running_bytes(&self) -> usize {
        self.lock().running.iter().map(Output::held_bytes).sum()
    }

    /// When the running epoch's first held item came: output waiting for the epoch to end,
    /// and since when (None when it holds nothing).
    pub fn waiting_since(&self) -> Option<Instant> {
        self.lock().running_since
    }

    /// Stream position of the first unreleased item.
    pub fn released(&self) -> u64 {
        self.lock().released
    }
}

/// The console side of a gate: hand it to the UART as its sink.
pub struct ConsoleGateSink(pub Gate<ConsoleChunk>);

impl ConsoleSink for ConsoleGateSink {
    fn write_console(&mut self, bytes: &[u8]) {
        self.0.push(ConsoleChunk(bytes.to_vec()));
    }
}

/// Default bound of the frames a primary holds, in bytes: two epochs of a fast TCP stream
/// here. At the bound the NIC's TX queue stalls until acknowledgements release frames.
pub const FRAME_HOLD_LIMIT: usize = 8 << 20;

/// The network side of a gate: hand it to the virtio-net device as its TX sink. It learns the
/// guest's IPv4 addresses from what it sends (for a takeover's announcements), tags each frame
/// with the guest's count of received frames, and has no room while the gate holds `limit`
/// bytes or more.
pub struct FrameGateSink {
    pub gate: Gate<Frame>,
    pub addresses: GuestAddresses,
    pub received: Received,
    pub limit: usize,
}

impl FrameSink for FrameGateSink {
    fn send_frame(&mut self, frame: &[u8]) {
        self.addresses.learn(frame);
        self.gate.push(Frame {
            bytes: frame.to_vec(),
            input: self.received.get(),
        });
    }

    fn has_room(&self) -> bool {
        self.gate.held_bytes() < self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<u8>>>);

    impl Release<ConsoleChunk> for Seen {
        fn release(&mut self, item: &ConsoleChunk) {
            self.0.lock().unwrap().extend_from_slice(&item.0);
        }
    }

    impl Seen {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn gate() -> (Gate<ConsoleChunk>, Seen, ConsoleGateSink) {
        let seen = Seen::default();
        let gate = Gate::new(Box::new(seen.clone()), 0, Mode::Held);
        let sink = ConsoleGateSink(gate.clone());
        (gate, seen, sink)
    }

    #[test]
    fn output_waits_for_its_epoch_and_leaves_in_order() {
        let (gate, seen, mut sink) = gate();
        sink.write_console(b"a");
        sink.write_console(b"b");
        let held1 = gate.seal(1);
        assert_eq!(seen.text(), "", "nothing leaves before the ack");
        sink.write_console(b"c");
        let held2 = gate.seal(2);
        // Checkpoint 2 carries epoch 1's output too: its ack may not have come yet.
        assert_eq!((held1.first, held1.items.len()), (0, 1 + 1));
        assert_eq!((held2.first, held2.end()), (0, 3));
        sink.write_console(b"d");
        assert!(gate.release_through(1));
        assert_eq!(seen.text(), "ab");
        let held3 = gate.seal(3);
        assert_eq!((held3.first, held3.end()), (2, 4));
        gate.release_through(3);
        assert_eq!(seen.text(), "abcd");
        assert_eq!(gate.released(), 4);
        assert_eq!(gate.held_bytes(), 0);
        assert!(!gate.release_through(3));
        assert_eq!(seen.text(), "abcd", "a repeated ack releases nothing twice");
    }

    #[test]
    fn held_back_output_stays_in_later_checkpoints_until_let_go() {
        let (gate, seen, mut sink) = gate();
        sink.write_console(b"a");
        gate.seal(1);
        gate.hold_back(true);
        assert!(!gate.release_through(1), "a swap keeps acknowledged output");
        sink.write_console(b"b");
        let held = gate.seal(2);
        assert_eq!(
            (held.first, held.end()),
            (0, 2),
            "the final checkpoint carries it all"
        );
        assert_eq!(seen.text(), "");
        // The swap is off: the next acknowledgement releases it here after all.
        gate.hold_back(false);
        assert!(gate.release_through(2));
        assert_eq!(seen.text(), "ab");
    }

    #[test]
    fn open_releases_everything_held_then_passes_through() {
        let (gate, seen, mut sink) = gate();
        sink.write_console(b"1");
        gate.seal(1);
        sink.write_console(b"2");
        assert_eq!(gate.held_bytes(), 2);
        gate.open();
        assert_eq!(seen.text(), "12");
        sink.write_console(b"3");
        assert_eq!(seen.text(), "123");
    }

    #[test]
    fn an_open_gate_holds_again_from_its_stream_position() {
        let (gate, seen, mut sink) = gate();
        gate.open();
        sink.write_console(b"ab");
        gate.hold();
        sink.write_console(b"c");
        let held = gate.seal(7);
        assert_eq!((held.first, held.end()), (2, 3));
        assert_eq!(seen.text(), "ab");
        gate.release_through(7);
        assert_eq!(seen.text(), "abc");
    }

    #[test]
    fn a_closed_gate_releases_nothing_more() {
        let (gate, seen, mut sink) = gate();
        sink.write_console(b"x");
        gate.seal(1);
        gate.close();
        gate.release_through(1);
        gate.open();
        sink.write_console(b"y");
        assert_eq!(seen.text(), "");
        assert_eq!(gate.held_bytes(), 0);
    }

    /// Where released frames go in tests: a list of their bytes.
    #[derive(Clone, Default)]
    pub(crate) struct Frames(pub(crate) Arc<Mutex<Vec<Vec<u8>>>>);

    impl Release<Frame> for Frames {
        fn release(&mut self, item: &Frame) {
            self.0.lock().unwrap().push(item.bytes.clone());
        }
    }

    #[test]
    fn a_frame_sink_is_full_at_its_bound_until_an_ack_releases_frames() {
        let out = Frames::default();
        let gate = Gate::new(Box::new(out.clone()), 0, Mode::Held);
        let woken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let w = woken.clone();
        gate.set_on_release(Box::new(move || {
            w.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
        let mut sink = FrameGateSink {
            gate: gate.clone(),
            addresses: GuestAddresses::default(),
            received: Received::default(),
            limit: 100,
        };
        sink.send_frame(&[1; 60]);
        assert!(sink.has_room());
        sink.send_frame(&[2; 60]);
        assert!(!sink.has_room(), "120 bytes held, bound 100");
        gate.seal(1);
        assert!(out.0.lock().unwrap().is_empty());
        gate.release_through(1);
        assert!(sink.has_room());
        assert_eq!(*out.0.lock().unwrap(), vec![vec![1; 60], vec![2; 60]]);
        assert_eq!(woken.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(gate.released(), 2, "frames count one unit each");
    }

    #[test]
    fn a_gate_says_when_its_running_epoch_got_output_and_wakes_whoever_waits() {
        let (gate, _seen, mut sink) = gate();
        let woken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let w = woken.clone();
        gate.set_on_first(Some(Arc::new(move || {
            w.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        })));
        assert_eq!(gate.waiting_since(), None);
        sink.write_console(b"a");
        let since = gate.waiting_since().expect("output waits");
        sink.write_console(b"b");
        assert_eq!(gate.waiting_since(), Some(since), "the first item's time");
        assert_eq!(
            woken.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "once per epoch"
        );
        gate.seal(1);
        assert_eq!(
            gate.waiting_since(),
            None,
            "sealed output waits for its ack, not its epoch"
        );
        sink.write_console(b"c");
        assert_eq!(woken.load(std::sync::atomic::Ordering::SeqCst), 2);
        gate.open();
        assert_eq!(gate.waiting_since(), None);
        sink.write_console(b"d");
        assert_eq!(gate.waiting_since(), None, "open output does not wait");
        assert_eq!(woken.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[test]
    fn a_gate_continues_a_stream_at_its_position() {
        let seen = Seen::default();
        let gate = Gate::new(Box::new(seen.clone()), 100, Mode::Open);
        gate.push(ConsoleChunk(b"zz".to_vec()));
        assert_eq!(gate.released(), 102);
    }
}
