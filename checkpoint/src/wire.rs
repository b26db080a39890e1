//! The versioned replication wire protocol between primary and standby.
//!
//! Every message is one frame: a 9-byte header (payload length `u32` LE, kind `u8`, CRC32C `u32`
//! LE over the kind byte then the payload) followed by the payload. The header layout and the
//! leading version of `Hello` never change between protocol versions, so a peer speaking another
//! version is reported as such instead of as garbage. Payload fields are little-endian; byte
//! strings carry a `u32` length prefix; trailing bytes are an error. Everything read from the
//! network is validated before use: a frame is never trusted to size an allocation beyond
//! [`MAX_PAYLOAD`] (or `4 * MAX_PAYLOAD` for decompressed pages whose count was already checked).

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use vmm::cast::{u64_to_usize, usize_to_u64};

use crate::delta::PageForm;

/// Version spoken by this build; a `Hello` of any other version is refused.
pub const PROTOCOL_VERSION: u32 = 9;
/// Largest payload a frame may declare; bigger lengths are refused before allocating.
pub const MAX_PAYLOAD: usize = 64 << 20;
/// Guest page size: `Pages` carry whole pages at page-aligned guest-physical addresses.
pub const PAGE_SIZE: usize = 4096;
/// Frame header: payload length (4), kind (1), CRC32C (4).
pub const HEADER_LEN: usize = 9;
/// Largest decompressed `Pages` batch accepted (65536 pages), so a lying peer cannot make us
/// allocate more than this for one frame.
pub const MAX_PAGES_BYTES: usize = MAX_PAYLOAD * 4;

/// Why a frame could not be read or an epoch could not be accepted. Each message is one line,
/// logged by the standby as the reason an epoch was rejected.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Not an error: the socket had no more bytes yet; the partial frame is kept.
    #[error("no complete frame yet (read would block)")]
    Idle,
    #[error("connection closed by the peer")]
    Closed,
    #[error("connection closed inside a frame: have {have} of {need} bytes")]
    Truncated { have: usize, need: usize },
    #[error("frame declares a payload of {len} bytes, above the limit of {MAX_PAYLOAD}")]
    TooLarge { len: usize },
    #[error("frame checksum mismatch: header says {expected:#010x}, payload gives {actual:#010x}")]
    Corrupt { expected: u32, actual: u32 },
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("protocol version mismatch: this node speaks {ours}, the peer speaks {theirs}")]
    Version { ours: u32, theirs: u32 },
    #[error("epoch {epoch} does not match its EpochEnd: {what}")]
    EpochMismatch { epoch: u64, what: String },
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

impl WireError {
    /// True when the read merely has to be retried later (socket timeout or non-blocking).
    pub fn is_idle(&self) -> bool {
        matches!(self, WireError::Idle)
    }
}

/// Which of the two connections between the nodes a `Hello` opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// Epoch data: pages, state, epoch ends and their acks.
    Data,
    /// Liveness and role changes: heartbeats, goodbye, takeover, exit.
    Control,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// First message of the primary on each connection.
    Hello {
        version: u32,
        channel: Channel,
        session: u64,
        /// Opaque JSON from the caller, compared by the standby with its own.
        config: Vec<u8>,
    },
    /// The standby accepts the Hello.
    Welcome,
    /// The standby (or primary) refuses, with a reason to print.
    Refuse {
        reason: String,
    },
    /// A batch of guest pages: guest-physical addresses (4 KiB aligned) and the pages' bytes,
    /// in order.
    Pages {
        epoch: u64,
        gpas: Vec<u64>,
        data: Vec<u8>,
    },
    /// A batch of guest pages of which some travel as deltas against the copy the standby
    /// holds (see [`crate::delta`]): `forms` says how each of `data`'s pages does.
    PageDeltas {
        epoch: u64,
        gpas: Vec<u64>,
        forms: Vec<PageForm>,
        data: Vec<u8>,
    },
    /// The epoch's VM state, opaque bytes serialised by the caller.
    State {
        epoch: u64,
        bytes: Vec<u8>,
    },
    /// Some of the epoch's disk writes, opaque bytes serialised by the caller (an epoch may
    /// have several, in order, before its State).
    Disk {
        epoch: u64,
        bytes: Vec<u8>,
    },
    /// Closes an epoch: what it held and a checksum of it (see [`EpochDigest`]).
    EpochEnd {
        epoch: u64,
        pages: u64,
        state_bytes: u64,
        checksum: u32,
    },
    Ack {
        epoch: u64,
    },
    /// Liveness, both ways. `received` counts the frames the sender has read on the data
    /// connection (a standby's progress through a large backlog; 0 from the primary).
    Heartbeat {
        received: u64,
    },
    /// The primary continues without this standby; it must never take over.
    Goodbye,
    /// The standby has taken over; the receiver must stop at once.
    TakenOver,
    /// The guest exited with this code on the primary; both nodes exit with it.
    Exit {
        code: i32,
    },
    /// The standby's first word after its control Welcome: the disk blocks its image needs
    /// (its write-intent bitmap, every block for an image with no history in common), as
    /// runs of (first block, count).
    Need {
        runs: Vec<(u64, u64)>,
    },
    /// Before the pre-copy, a resync of the disk begins: this many bytes of blocks follow.
    ResyncPlan {
        bytes: u64,
    },
    /// Disk blocks from the running node's image, at byte `offset` (block-aligned), lz4-
    /// compressed on the wire or, where that does not pay, as they are (see [`encode_resync`]).
    Resync {
        offset: u64,
        data: Vec<u8>,
    },
    /// The disk resync is complete; the pre-copy of memory follows.
    ResyncEnd,
    /// The standby holds these runs of blocks durably (resync acknowledgement).
    Synced {
        runs: Vec<(u64, u64)>,
    },
    /// A planned swap: the primary stopped its guest at checkpoint `epoch`, which the
    /// standby acknowledged; the standby resumes the guest from it and the two connections
    /// serve the other way round, the old primary standing by with the same checkpoint.
    Handover {
        epoch: u64,
    },
    /// A planned swap begins: the primary stops its guest now and sends its final checkpoint.
    /// The standby announces the guest's place on the network at once (these are its IPv4
    /// addresses), so that frames sent to the guest during the swap wait in the standby's tap
    /// for the resumed guest instead of being lost at the old primary's.
    SwapBegins {
        addresses: Vec<[u8; 4]>,
    },
    /// Frames the guest received, in order, the first being the `first`-th since the
    /// primary began counting (see [`crate::input`]): the standby keeps those after its last
    /// committed checkpoint, to deliver again to a guest it resumes from that checkpoint.
    Input {
        first: u64,
        frames: Vec<Vec<u8>>,
    },
    /// The standby holds every received frame before the `through`-th: acknowledgements the
    /// guest sent once it had them may leave before their epoch commits.
    InputAck {
        through: u64,
    },
}

const HELLO: u8 = 1;
const WELCOME: u8 = 2;
const REFUSE: u8 = 3;
const PAGES: u8 = 4;
const STATE: u8 = 5;
const EPOCH_END: u8 = 6;
const ACK: u8 = 7;
const HEARTBEAT: u8 = 8;
const GOODBYE: u8 = 9;
const TAKEN_OVER: u8 = 10;
const EXIT: u8 = 11;
const DISK: u8 = 12;
const NEED: u8 = 13;
const RESYNC_PLAN: u8 = 14;
const RESYNC: u8 = 15;
const RESYNC_END: u8 = 16;
const SYNCED: u8 = 17;
const HANDOVER: u8 = 18;
const SWAP_BEGINS: u8 = 19;
const INPUT: u8 = 20;
const INPUT_ACK: u8 = 21;
const PAGE_DELTAS: u8 = 22;
/// Names of the kinds above, for error messages.
const KIND_NAMES: [&str; 23] = [
    "",
    "Hello",
    "Welcome",
    "Refuse",
    "Pages",
    "State",
    "EpochEnd",
    "Ack",
    "Heartbeat",
    "Goodbye",
    "TakenOver",
    "Exit",
    "Disk",
    "Need",
    "ResyncPlan",
    "Resync",
    "ResyncEnd",
    "Synced",
    "Handover",
    "SwapBegins",
    "Input",
    "InputAck",
    "PageDeltas",
];

/// `len` as a `u32` LE length field. Lengths inside a frame stay within [`MAX_PAYLOAD`]; one
/// beyond `u32` saturates, so that the peer refuses the frame instead of misreading it.
pub(crate) fn len_field(len: usize) -> [u8; 4] {
    u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes()
}

/// Appends a `u32` length prefix and the bytes.
fn put_blob(f: &mut Vec<u8>, bytes: &[u8]) {
    f.extend_from_slice(&len_field(bytes.len()));
    f.extend_from_slice(bytes);
}

/// Appends a `u32` count and the (first, count) pairs of `runs`.
fn put_runs(f: &mut Vec<u8>, runs: &[(u64, u64)]) {
    f.extend_from_slice(&len_field(runs.len()));
    for (first, count) in runs {
        f.extend_from_slice(&first.to_le_bytes());
        f.extend_from_slice(&count.to_le_bytes());
    }
}

/// Fills in the header of a frame whose payload follows `HEADER_LEN` placeholder bytes.
/// The caller keeps payloads within [`MAX_PAYLOAD`]; the peer refuses larger frames.
fn seal(kind: u8, mut f: Vec<u8>) -> Vec<u8> {
    let len = f.len() - HEADER_LEN;
    debug_assert!(len <= MAX_PAYLOAD, "{len}-byte payload exceeds MAX_PAYLOAD");
    let crc = crc32c::crc32c_append(crc32c::crc32c(&[kind]), &f[HEADER_LEN..]);
    f[0..4].copy_from_slice(&len_field(len));
    f[4] = kind;
    f[5..9].copy_from_slice(&crc.to_le_bytes());
    f
}

/// A complete `Pages` frame. Separate from [`encode`] so that worker threads can compress
/// batches in parallel while the sender writes the ready frames in order. `data` must hold
/// exactly `gpas.len()` pages, at most 65536 per batch; it is lz4-compressed if `compress` and
/// that pays (see [`put_packed`]). Returns the frame and whether it is compressed.
pub fn encode_pages(epoch: u64, gpas: &[u64], data: &[u8], compress: bool) -> (Vec<u8>, bool) {
    debug_assert_eq!(data.len(), gpas.len() * PAGE_SIZE);
    let mut f = batch_head(epoch, gpas);
    let packed = put_packed(&mut f, data, compress);
    (seal(PAGES, f), packed)
}

/// A complete `PageDeltas` frame: as [`encode_pages`], with a form byte per page between the
/// addresses and the data, lz4-compressed if `compress` and that pays.
pub fn encode_page_deltas(
    epoch: u64,
    gpas: &[u64],
    forms: &[PageForm],
    data: &[u8],
    compress: bool,
) -> (Vec<u8>, bool) {
    debug_assert_eq!(forms.len(), gpas.len());
    let mut f = batch_head(epoch, gpas);
    f.extend(forms.iter().map(|form| form.byte()));
    let packed = put_packed(&mut f, data, compress);
    (seal(PAGE_DELTAS, f), packed)
}

/// A frame's header room, then the epoch, the page count and the addresses of a batch.
fn batch_head(epoch: u64, gpas: &[u64]) -> Vec<u8> {
    let mut f = vec![0; HEADER_LEN];
    f.extend_from_slice(&epoch.to_le_bytes());
    f.extend_from_slice(&len_field(gpas.len()));
    for gpa in gpas {
        f.extend_from_slice(&gpa.to_le_bytes());
    }
    f
}

/// Frames sent as they are, without trying lz4, after one that did not compress.
const UNPACKED_AFTER_MISS: u32 = 15;

/// When a sender tries lz4: always while it pays; after a frame that did not compress (an
/// image of compressed or encrypted data, pages of doubles) the next [`UNPACKED_AFTER_MISS`]
/// go as they are, so that such data costs about a sixteenth of the compression, and a link
/// faster than lz4 is not slowed by it. Shared by the threads that pack one stream.
#[derive(Debug, Default)]
pub struct Packing {
    /// Frames still to send as they are.
    skip: AtomicU32,
    packed: AtomicU64,
    as_is: AtomicU64,
}

impl Packing {
    /// Packs one frame with `encode`, told whether to try lz4 and saying whether the frame is
    /// compressed (as [`encode_pages`] and [`encode_resync`] do), and records how it went.
    pub fn pack(&self, encode: impl FnOnce(bool) -> (Vec<u8>, bool)) -> Vec<u8> {
        let tried = self.compress();
        let (frame, packed) = encode(tried);
        self.record(tried, packed);
        frame
    }

    /// Whether to try lz4 on the next frame.
    fn compress(&self) -> bool {
        self.skip.load(Ordering::Relaxed) == 0
    }

    /// Records how a frame went: `tried` lz4, and whether it was `packed`.
    fn record(&self, tried: bool, packed: bool) {
        if packed {
            self.packed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.as_is.fetch_add(1, Ordering::Relaxed);
        if tried {
            self.skip.store(UNPACKED_AFTER_MISS, Ordering::Relaxed);
        } else {
            let _ = self
                .skip
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
    }

    /// Frames sent lz4-compressed and as they are.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.packed.load(Ordering::Relaxed),
            self.as_is.load(Ordering::Relaxed),
        )
    }
}

/// How a frame's bulk bytes travel (see [`put_packed`]).
const AS_IS: u8 = 0;
const LZ4: u8 = 1;

/// Appends `data` as a frame's last field: its length, how it is packed, then an lz4 block if
/// `compress` and that saves at least an eighth of the bytes, else the bytes as they are (a
/// page of doubles or an encrypted block barely compresses, and lz4 then only costs CPU on
/// both nodes). Returns whether it is compressed.
fn put_packed(f: &mut Vec<u8>, data: &[u8], compress: bool) -> bool {
    f.extend_from_slice(&len_field(data.len()));
    let start = f.len() + 1;
    let bound = if compress {
        lz4_flex::block::get_maximum_output_size(data.len())
    } else {
        0
    };
    f.resize(start + bound.max(data.len()), 0);
    let packed = compress
        .then(|| lz4_flex::block::compress_into(data, &mut f[start..]).ok())
        .flatten()
        .filter(|&n| n <= data.len() - data.len() / 8);
    let (packing, len) = match packed {
        Some(n) => (LZ4, n),
        None => {
            f[start..start + data.len()].copy_from_slice(data);
            (AS_IS, data.len())
        }
    };
    f[start - 1] = packing;
    f.truncate(start + len);
    // Room was made for lz4's worst case: a frame waiting to be sent holds only its bytes.
    f.shrink_to_fit();
    packing == LZ4
}

/// The bytes [`put_packed`] wrote, `what` naming them in errors; their declared length is
/// handed to `check` before anything is allocated.
fn take_packed(
    f: &mut Fields,
    what: &str,
    check: impl FnOnce(usize) -> Result<(), WireError>,
) -> Result<Vec<u8>, WireError> {
    let declared = u64_to_usize(u64::from(f.u32()?));
    check(declared)?;
    let packing = f.u8()?;
    let rest = f.rest();
    match packing {
        AS_IS if rest.len() == declared => Ok(rest.to_vec()),
        AS_IS => Err(malformed(format!(
            "{what} carries {} bytes, declared {declared}",
            rest.len()
        ))),
        LZ4 => {
            let mut data = vec![0u8; declared];
            match lz4_flex::block::decompress_into(rest, &mut data) {
                Ok(n) if n == declared => Ok(data),
                Ok(n) => Err(malformed(format!(
                    "{what} decompressed to {n} bytes, expected {declared}"
                ))),
                Err(e) => Err(malformed(format!("{what} data does not decompress: {e}"))),
            }
        }
        other => Err(malformed(format!("{what} packing {other} is unknown"))),
    }
}

/// A complete frame for `msg`.
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut f = vec![0u8; HEADER_LEN];
    let kind = match msg {
        Message::Hello {
            version,
            channel,
            session,
            config,
        } => {
            f.extend_from_slice(&version.to_le_bytes());
            f.push(match channel {
                Channel::Data => 0,
                Channel::Control => 1,
            });
            f.extend_from_slice(&session.to_le_bytes());
            put_blob(&mut f, config);
            HELLO
        }
        Message::Welcome => WELCOME,
        Message::Refuse { reason } => {
            put_blob(&mut f, reason.as_bytes());
            REFUSE
        }
        Message::Pages { epoch, gpas, data } => return encode_pages(*epoch, gpas, data, true).0,
        Message::PageDeltas {
            epoch,
            gpas,
            forms,
            data,
        } => return encode_page_deltas(*epoch, gpas, forms, data, true).0,
        Message::State { epoch, bytes } => {
            f.extend_from_slice(&epoch.to_le_bytes());
            put_blob(&mut f, bytes);
            STATE
        }
        Message::Disk { epoch, bytes } => {
            f.extend_from_slice(&epoch.to_le_bytes());
            put_blob(&mut f, bytes);
            DISK
        }
        Message::EpochEnd {
            epoch,
            pages,
            state_bytes,
            checksum,
        } => {
            f.extend_from_slice(&epoch.to_le_bytes());
            f.extend_from_slice(&pages.to_le_bytes());
            f.extend_from_slice(&state_bytes.to_le_bytes());
            f.extend_from_slice(&checksum.to_le_bytes());
            EPOCH_END
        }
        Message::Ack { epoch } => {
            f.extend_from_slice(&epoch.to_le_bytes());
            ACK
        }
        Message::Heartbeat { received } => {
            f.extend_from_slice(&received.to_le_bytes());
            HEARTBEAT
        }
        Message::Goodbye => GOODBYE,
        Message::TakenOver => TAKEN_OVER,
        Message::Exit { code } => {
            f.extend_from_slice(&code.to_le_bytes());
            EXIT
        }
        Message::Need { runs } => {
            put_runs(&mut f, runs);
            NEED
        }
        Message::ResyncPlan { bytes } => {
            f.extend_from_slice(&bytes.to_le_bytes());
            RESYNC_PLAN
        }
        Message::Resync { offset, data } => return encode_resync(*offset, data, true).0,
        Message::ResyncEnd => RESYNC_END,
        Message::Synced { runs } => {
            put_runs(&mut f, runs);
            SYNCED
        }
        Message::Handover { epoch } => {
            f.extend_from_slice(&epoch.to_le_bytes());
            HANDOVER
        }
        Message::SwapBegins { addresses } => {
            put_blob(&mut f, addresses.as_flattened());
            SWAP_BEGINS
        }
        Message::Input { first, frames } => {
            f.extend_from_slice(&first.to_le_bytes());
            f.extend_from_slice(&len_field(frames.len()));
            for frame in frames {
                put_blob(&mut f, frame);
            }
            INPUT
        }
        Message::InputAck { through } => {
            f.extend_from_slice(&through.to_le_bytes());
            INPUT_ACK
        }
    };
    seal(kind, f)
}

/// Writes one complete frame for `msg`.
pub fn write_message(w: &mut impl Write, msg: &Message) -> io::Result<()> {
    w.write_all(&encode(msg))
}

fn malformed(what: impl Into<String>) -> WireError {
    WireError::Malformed(what.into())
}

/// Reads payload fields, failing with `Malformed` (never panicking) on short input.
struct Fields<'a> {
    buf: &'a [u8],
    msg: &'static str,
}

impl<'a> Fields<'a> {
    fn short(&self) -> WireError {
        malformed(format!("{} payload is too short", self.msg))
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let (head, rest) = self.buf.split_at_checked(n).ok_or_else(|| self.short())?;
        self.buf = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let (head, rest) = self.buf.split_first_chunk().ok_or_else(|| self.short())?;
        self.buf = rest;
        Ok(*head)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        self.array().map(u8::from_le_bytes)
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        self.array().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        self.array().map(u64::from_le_bytes)
    }
    /// A `u32` length prefix then that many bytes; the length is checked against what is left.
    fn blob(&mut self) -> Result<Vec<u8>, WireError> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    /// A `u32` count then that many (u64, u64) pairs; the count is checked against what is
    /// left before allocating.
    fn runs(&mut self) -> Result<Vec<(u64, u64)>, WireError> {
        let n = u64_to_usize(u64::from(self.u32()?));
        let raw = self.take(n.saturating_mul(16))?;
        Ok(raw
            .as_chunks::<16>()
            .0
            .iter()
            .map(|pair| {
                let (first, count) = pair.split_at(8);
                let word = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or_default());
                (word(first), word(count))
            })
            .collect())
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
    fn finish(self, msg: Message) -> Result<Message, WireError> {
        if self.buf.is_empty() {
            Ok(msg)
        } else {
            Err(malformed(format!(
                "{} bytes after the end of {}",
                self.buf.len(),
                self.msg
            )))
        }
    }
}

/// A batch's epoch, addresses, page forms (`PageDeltas` only, `with_forms`) and pages, as
/// [`encode_pages`] and [`encode_page_deltas`] wrote them.
struct Batch {
    epoch: u64,
    gpas: Vec<u64>,
    forms: Vec<PageForm>,
    data: Vec<u8>,
}

fn decode_batch(f: &mut Fields, with_forms: bool) -> Result<Batch, WireError> {
    let what = f.msg;
    let epoch = f.u64()?;
    let count = f.u32()? as usize;
    // The gpas must be present in the payload, which bounds `count` before allocating.
    let raw = f.take(count.saturating_mul(8))?;
    let gpas: Vec<u64> = raw
        .as_chunks()
        .0
        .iter()
        .map(|b| u64::from_le_bytes(*b))
        .collect();
    if let Some(gpa) = gpas.iter().find(|&&g| g % usize_to_u64(PAGE_SIZE) != 0) {
        return Err(malformed(format!(
            "{what} gpa {gpa:#x} is not page aligned"
        )));
    }
    let expected = count.saturating_mul(PAGE_SIZE);
    if expected > MAX_PAGES_BYTES {
        return Err(malformed(format!(
            "{what} batch of {count} pages exceeds {MAX_PAGES_BYTES} bytes"
        )));
    }
    let forms = if with_forms {
        f.take(count)?
            .iter()
            .map(|&b| {
                PageForm::from_byte(b)
                    .ok_or_else(|| malformed(format!("{what} page form {b} is unknown")))
            })
            .collect::<Result<Vec<_>, _>>()?
    } else {
        Vec::new()
    };
    let data = take_packed(f, what, |declared| {
        if declared == expected {
            Ok(())
        } else {
            Err(malformed(format!(
                "{what} declares {declared} decompressed bytes for {count} pages ({expected} bytes)"
            )))
        }
    })?;
    Ok(Batch {
        epoch,
        gpas,
        forms,
        data,
    })
}

/// Largest run of disk blocks a `Resync` frame carries, decompressed.
pub const MAX_RESYNC_BYTES: usize = 4 << 20;

/// A complete `Resync` frame for the blocks `data` at `offset`, lz4-compressed if `compress`
/// and that pays (see [`put_packed`]). Returns the frame and whether it is compressed.
pub fn encode_resync(offset: u64, data: &[u8], compress: bool) -> (Vec<u8>, bool) {
    let mut f = vec![0; HEADER_LEN];
    f.extend_from_slice(&offset.to_le_bytes());
    let packed = put_packed(&mut f, data, compress);
    (seal(RESYNC, f), packed)
}

fn decode_resync(f: &mut Fields) -> Result<Message, WireError> {
    let offset = f.u64()?;
    let data = take_packed(f, "Resync", |declared| {
        if declared <= MAX_RESYNC_BYTES {
            Ok(())
        } else {
            Err(malformed(format!(
                "Resync declares {declared} bytes, above {MAX_RESYNC_BYTES}"
            )))
        }
    })?;
    Ok(Message::Resync { offset, data })
}

/// Decodes a payload whose CRC has already been checked.
fn decode(kind: u8, payload: &[u8]) -> Result<Message, WireError> {
    let name = match KIND_NAMES.get(kind as usize) {
        Some(&name) if kind != 0 => name,
        _ => return Err(WireError::UnknownKind(kind)),
    };
    let mut f = Fields {
        buf: payload,
        msg: name,
    };
    let msg = match kind {
        HELLO => {
            // The version comes first so another version is named before its layout is parsed.
            let version = f.u32()?;
            if version != PROTOCOL_VERSION {
                return Err(WireError::Version {
                    ours: PROTOCOL_VERSION,
                    theirs: version,
                });
            }
            let channel = match f.array()? {
                [0] => Channel::Data,
                [1] => Channel::Control,
                [c] => return Err(malformed(format!("Hello names unknown channel {c}"))),
            };
            Message::Hello {
                version,
                channel,
                session: f.u64()?,
                config: f.blob()?,
            }
        }
        WELCOME => Message::Welcome,
        REFUSE => {
            let reason = String::from_utf8(f.blob()?)
                .map_err(|_| malformed("Refuse reason is not UTF-8"))?;
            Message::Refuse { reason }
        }
        PAGES => {
            let Batch {
                epoch, gpas, data, ..
            } = decode_batch(&mut f, false)?;
            Message::Pages { epoch, gpas, data }
        }
        PAGE_DELTAS => {
            let Batch {
                epoch,
                gpas,
                forms,
                data,
            } = decode_batch(&mut f, true)?;
            Message::PageDeltas {
                epoch,
                gpas,
                forms,
                data,
            }
        }
        STATE => Message::State {
            epoch: f.u64()?,
            bytes: f.blob()?,
        },
        EPOCH_END => Message::EpochEnd {
            epoch: f.u64()?,
            pages: f.u64()?,
            state_bytes: f.u64()?,
            checksum: f.u32()?,
        },
        ACK => Message::Ack { epoch: f.u64()? },
        HEARTBEAT => Message::Heartbeat { received: f.u64()? },
        GOODBYE => Message::Goodbye,
        TAKEN_OVER => Message::TakenOver,
        DISK => Message::Disk {
            epoch: f.u64()?,
            bytes: f.blob()?,
        },
        EXIT => Message::Exit {
            code: i32::from_le_bytes(f.array()?),
        },
        NEED => Message::Need { runs: f.runs()? },
        RESYNC_PLAN => Message::ResyncPlan { bytes: f.u64()? },
        RESYNC => decode_resync(&mut f)?,
        RESYNC_END => Message::ResyncEnd,
        SYNCED => Message::Synced { runs: f.runs()? },
        HANDOVER => Message::Handover { epoch: f.u64()? },
        SWAP_BEGINS => {
            let bytes = f.blob()?;
            let (addresses, rest) = bytes.as_chunks::<4>();
            if !rest.is_empty() {
                return Err(malformed(format!(
                    "SwapBegins: {} address bytes, not a multiple of 4",
                    bytes.len()
                )));
            }
            Message::SwapBegins {
                addresses: addresses.to_vec(),
            }
        }
        INPUT => {
            let first = f.u64()?;
            let count = f.u32()?;
            // Each frame takes at least its length field: a count the payload cannot hold is
            // refused before anything is allocated for it.
            if u64::from(count) * 4 > usize_to_u64(f.buf.len()) {
                return Err(malformed(format!(
                    "Input declares {count} frames in {} bytes",
                    f.buf.len()
                )));
            }
            let frames = (0..count).map(|_| f.blob()).collect::<Result<_, _>>()?;
            Message::Input { first, frames }
        }
        INPUT_ACK => Message::InputAck { through: f.u64()? },
        _ => return Err(WireError::UnknownKind(kind)),
    };
    f.finish(msg)
}

/// Reads frames from a stream, keeping a partial frame across `Idle` returns so that sockets
/// with a read timeout (or non-blocking ones) can be polled. After any error other than `Idle`
/// the connection should be dropped: framing can no longer be trusted.
pub struct FrameReader<R: Read> {
    inner: R,
    /// The frame read so far: `buf[..filled]` holds received bytes.
    buf: Vec<u8>,
    filled: usize,
}

/// Buffer growth step: a declared length is only backed by memory as bytes actually arrive.
const READ_CHUNK: usize = 64 << 10;
/// Buffers above this are released after their frame rather than kept per connection.
const RETAIN: usize = 4 << 20;

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            buf: Vec::new(),
            filled: 0,
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// The stream; a frame partly read is dropped.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Reads until the current frame holds `need` bytes; never reads past the frame.
    fn fill(&mut self, need: usize) -> Result<(), WireError> {
        while self.filled < need {
            if self.buf.len() < need {
                let target = need.min(self.filled + READ_CHUNK.max(self.filled));
                self.buf.resize(target.max(self.buf.len()), 0);
            }
            let end = self.buf.len().min(need);
            match self.inner.read(&mut self.buf[self.filled..end]) {
                Ok(0) if self.filled == 0 => return Err(WireError::Closed),
                Ok(0) => {
                    return Err(WireError::Truncated {
                        have: self.filled,
                        need,
                    })
                }
                Ok(n) => self.filled += n,
                Err(e) => match e.kind() {
                    io::ErrorKind::Interrupted => {}
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                        return Err(WireError::Idle)
                    }
                    _ => return Err(WireError::Io(e)),
                },
            }
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.filled = 0;
        if self.buf.capacity() > RETAIN {
            self.buf = Vec::new();
        }
    }

    /// The next message. `Err(Idle)` means "call again later"; the partial frame is kept.
    pub fn read_message(&mut self) -> Result<Message, WireError> {
        self.fill(HEADER_LEN)?;
        let h = &self.buf[..HEADER_LEN];
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let kind = h[4];
        let expected = u32::from_le_bytes([h[5], h[6], h[7], h[8]]);
        if len > MAX_PAYLOAD {
            self.reset();
            return Err(WireError::TooLarge { len });
        }
        self.fill(HEADER_LEN + len)?;
        let payload = &self.buf[HEADER_LEN..HEADER_LEN + len];
        let actual = crc32c::crc32c_append(crc32c::crc32c(&[kind]), payload);
        let result = if actual != expected {
            Err(WireError::Corrupt { expected, actual })
        } else {
            decode(kind, payload)
        };
        self.reset();
        result
    }
}

/// An epoch's size and checksum, computed identically by the sender (over what it sends) and the
/// receiver (over what it decoded), so a half-received or altered epoch is never applied.
#[derive(Debug, Clone, Default)]
pub struct EpochDigest {
    crc: u32,
    pages: u64,
    state_bytes: u64,
}

impl EpochDigest {
    pub fn new() -> Self {
        Self::default()
    }

    /// Chains each gpa (u64 LE) then its page, in order. `data` holds `gpas.len()` pages.
    pub fn add_pages(&mut self, gpas: &[u64], data: &[u8]) {
        debug_assert_eq!(data.len(), gpas.len() * PAGE_SIZE);
        for (gpa, page) in gpas.iter().zip(data.chunks(PAGE_SIZE)) {
            self.crc = crc32c::crc32c_append(self.crc, &gpa.to_le_bytes());
            self.crc = crc32c::crc32c_append(self.crc, page);
            self.pages += 1;
        }
    }

    /// Chains the bytes of an opaque blob (State, Disk); `state_bytes` counts them all.
    pub fn add_state(&mut self, bytes: &[u8]) {
        self.crc = crc32c::crc32c_append(self.crc, bytes);
        self.state_bytes += usize_to_u64(bytes.len());
    }

    /// The `EpochEnd` closing `epoch` with what this digest saw.
    pub fn end(&self, epoch: u64) -> Message {
        Message::EpochEnd {
            epoch,
            pages: self.pages,
            state_bytes: self.state_bytes,
            checksum: self.crc,
        }
    }

    /// Compares what was received with the sender's `EpochEnd` fields, naming every difference.
    pub fn verify(
        &self,
        epoch: u64,
        pages: u64,
        state_bytes: u64,
        checksum: u32,
    ) -> Result<(), WireError> {
        let diffs: Vec<String> = [
            ("pages", self.pages, pages),
            ("state bytes", self.state_bytes, state_bytes),
            ("checksum", self.crc.into(), checksum.into()),
        ]
        .iter()
        .filter(|(_, ours, theirs)| ours != theirs)
        .map(|(what, ours, theirs)| format!("{what}: received {ours}, sender declared {theirs}"))
        .collect();
        if diffs.is_empty() {
            Ok(())
        } else {
            Err(WireError::EpochMismatch {
                epoch,
                what: diffs.join("; "),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random bytes (xorshift64).
    fn noise(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed | 1;
        let mut step = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x & 0xff) as u8
        };
        (0..n).map(|_| step()).collect()
    }

    /// 300 pages: random, zero and repeated-pattern pages mixed.
    fn batch() -> (Vec<u64>, Vec<u8>) {
        let gpas = (0..300u64).map(|i| (i * 7 + 0x100) << 12).collect();
        let data = (0..300u64)
            .flat_map(|i| match i % 3 {
                0 => noise(i + 1, PAGE_SIZE),
                1 => vec![0; PAGE_SIZE],
                _ => (0..usize_to_u64(PAGE_SIZE))
                    .map(|j| (j % 17) as u8 ^ (i & 0xff) as u8)
                    .collect(),
            })
            .collect();
        (gpas, data)
    }

    fn hello(version: u32, channel: Channel, config: &[u8]) -> Message {
        let (session, config) = (0xdead_beef_0123_4567, config.to_vec());
        Message::Hello {
            version,
            channel,
            session,
            config,
        }
    }

    fn all_messages() -> Vec<Message> {
        let (gpas, data) = batch();
        let (pages, state_bytes, checksum) = (300, 5000, 0x1234_5678);
        vec![
            hello(
                PROTOCOL_VERSION,
                Channel::Data,
                br#"{"mem_mib":256,"vcpus":2}"#,
            ),
            hello(PROTOCOL_VERSION, Channel::Control, b""),
            Message::Welcome,
            Message::Refuse {
                reason: "config differs: mem_mib 256 vs 512 ✗".into(),
            },
            Message::Pages {
                epoch: 3,
                gpas: vec![],
                data: vec![],
            },
            Message::Pages {
                epoch: 4,
                gpas,
                data,
            },
            Message::PageDeltas {
                epoch: 4,
                gpas: vec![0x1000, 0x3000, 0x2000],
                forms: vec![PageForm::Delta, PageForm::Whole, PageForm::Delta],
                data: [vec![0; PAGE_SIZE], noise(14, PAGE_SIZE), vec![9; PAGE_SIZE]].concat(),
            },
            Message::State {
                epoch: 4,
                bytes: noise(9, 5000),
            },
            Message::State {
                epoch: 5,
                bytes: vec![],
            },
            Message::Disk {
                epoch: 5,
                bytes: noise(10, 700),
            },
            Message::EpochEnd {
                epoch: 4,
                pages,
                state_bytes,
                checksum,
            },
            Message::Ack { epoch: u64::MAX },
            Message::Heartbeat { received: 3 },
            Message::Goodbye,
            Message::TakenOver,
            Message::Exit { code: -3 },
            Message::Need { runs: vec![] },
            Message::Need {
                runs: vec![(0, 3), (17, u64::MAX)],
            },
            Message::ResyncPlan { bytes: 1 << 40 },
            Message::Resync {
                offset: 64 << 10,
                data: noise(11, 65536),
            },
            Message::Resync {
                offset: 1 << 40,
                data: vec![7; 65536],
            },
            Message::ResyncEnd,
            Message::Synced { runs: vec![(5, 1)] },
            Message::Handover { epoch: 77 },
            Message::SwapBegins {
                addresses: vec![[10, 0, 0, 2], [192, 168, 1, 9]],
            },
            Message::Input {
                first: 9,
                frames: vec![noise(12, 60), vec![], noise(13, 1514)],
            },
            Message::Input {
                first: 0,
                frames: vec![],
            },
            Message::InputAck { through: 12 },
        ]
    }

    /// A frame with a valid header and CRC around an arbitrary payload.
    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        seal(kind, [&[0; HEADER_LEN][..], payload].concat())
    }

    fn read_one(bytes: &[u8]) -> Result<Message, WireError> {
        FrameReader::new(bytes).read_message()
    }

    #[test]
    fn every_variant_round_trips_on_one_stream() {
        let msgs = all_messages();
        let mut stream = Vec::new();
        for m in &msgs {
            write_message(&mut stream, m).unwrap();
        }
        let mut r = FrameReader::new(stream.as_slice());
        for m in &msgs {
            assert_eq!(&r.read_message().unwrap(), m);
        }
        assert!(matches!(r.read_message(), Err(WireError::Closed)));

        let (gpas, data) = batch();
        let (f, packed) = encode_pages(4, &gpas, &data, true);
        assert!(packed);
        assert_eq!(f, encode(&msgs[5]));
        assert!(f.len() < data.len() / 2, "{} bytes for 300 pages", f.len());
    }

    #[test]
    fn every_flipped_bit_is_an_error() {
        let small = [
            Message::Ack { epoch: 7 },
            Message::Exit { code: 1 },
            hello(PROTOCOL_VERSION, Channel::Data, b"{}"),
            Message::Pages {
                epoch: 2,
                gpas: vec![0x1000],
                data: noise(3, PAGE_SIZE),
            },
        ];
        for m in &small {
            let good = encode(m);
            for i in 0..good.len() * 8 {
                let mut bad = good.clone();
                bad[i / 8] ^= 1 << (i % 8);
                let got = read_one(&bad);
                assert!(got.is_err(), "{m:?}: bit {i} flipped decodes as {got:?}");
            }
        }
    }

    #[test]
    fn truncation_is_closed_at_zero_and_truncated_inside() {
        let good = encode(&all_messages()[9]);
        for cut in 0..good.len() {
            let need = if cut < HEADER_LEN {
                HEADER_LEN
            } else {
                good.len()
            };
            match read_one(&good[..cut]) {
                Err(WireError::Closed) => assert_eq!(cut, 0),
                Err(WireError::Truncated { have, need: n }) => {
                    assert_eq!((have, n), (cut, need));
                    assert!(cut > 0);
                }
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn other_version_is_named() {
        let (ours, next) = (PROTOCOL_VERSION, PROTOCOL_VERSION + 1);
        let payload = [
            &next.to_le_bytes()[..],
            b"a layout this version does not know",
        ]
        .concat();
        let err = read_one(&frame(HELLO, &payload)).unwrap_err();
        assert!(matches!(err, WireError::Version { ours: o, theirs: t } if o == ours && t == next));
        let text =
            format!("protocol version mismatch: this node speaks {ours}, the peer speaks {next}");
        assert_eq!(err.to_string(), text);
        let foreign = encode(&hello(5, Channel::Data, b""));
        assert!(matches!(
            read_one(&foreign),
            Err(WireError::Version { ours: o, theirs: 5 }) if o == ours
        ));
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        for len in [u32::try_from(MAX_PAYLOAD).unwrap() + 1, u32::MAX] {
            let header = [&len.to_le_bytes()[..], &[ACK, 0, 0, 0, 0]].concat();
            let mut r = FrameReader::new(header.as_slice());
            // No payload follows: TooLarge (not Truncated) shows it was refused before reading on.
            let got = r.read_message();
            assert!(matches!(got, Err(WireError::TooLarge { len: l }) if l == len as usize));
            assert!(r.buf.capacity() < 1024, "allocated {}", r.buf.capacity());
        }
    }

    /// Yields at most 3001 bytes a call, with `TimedOut`, `Interrupted` and `WouldBlock` between
    /// chunks, like a socket with a read timeout.
    struct Trickle(Vec<u8>, usize, usize);

    impl Read for Trickle {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let Trickle(data, pos, calls) = self;
            *calls += 1;
            match *calls % 4 {
                0 => return Err(io::ErrorKind::WouldBlock.into()),
                1 => return Err(io::ErrorKind::TimedOut.into()),
                2 => return Err(io::ErrorKind::Interrupted.into()),
                _ => {}
            }
            let n = out.len().min(3001).min(data.len() - *pos);
            out[..n].copy_from_slice(&data[*pos..*pos + n]);
            *pos += n;
            Ok(n)
        }
    }

    #[test]
    fn idle_keeps_the_partial_frame() {
        let msgs = all_messages();
        let mut r = FrameReader::new(Trickle(msgs.iter().flat_map(encode).collect(), 0, 0));
        let mut idles = 0;
        for m in msgs.iter().map(Some).chain([None]) {
            let got = loop {
                match r.read_message() {
                    Err(e) if e.is_idle() => idles += 1,
                    got => break got,
                }
            };
            match m {
                Some(m) => assert_eq!(&got.unwrap(), m),
                None => assert!(matches!(got, Err(WireError::Closed)), "{got:?}"),
            }
        }
        assert!(idles > msgs.len() * 2, "only {idles} idle returns");
    }

    /// A Pages payload whose data is `packed`: an lz4 block after its u32 length.
    fn pages_payload(count: u32, gpas: &[u64], packed: &[u8]) -> Vec<u8> {
        let gpas = gpas.iter().flat_map(|g| g.to_le_bytes());
        let head = 5u64.to_le_bytes().into_iter().chain(count.to_le_bytes());
        let (size, block) = packed.split_at(4.min(packed.len()));
        let data = size
            .iter()
            .copied()
            .chain([LZ4])
            .chain(block.iter().copied());
        head.chain(gpas).chain(data).collect()
    }

    fn assert_malformed(kind: u8, payload: &[u8], needle: &str) {
        match read_one(&frame(kind, payload)) {
            Err(e @ WireError::Malformed(_)) => {
                assert!(e.to_string().contains(needle), "{e} lacks {needle:?}")
            }
            other => panic!("expected Malformed({needle}), got {other:?}"),
        }
    }

    #[test]
    fn a_miss_sends_the_next_frames_as_they_are() {
        let packing = Packing::default();
        packing.record(true, true);
        assert!(packing.compress());
        packing.record(true, false);
        for _ in 0..UNPACKED_AFTER_MISS {
            assert!(!packing.compress());
            packing.record(false, false);
        }
        assert!(packing.compress(), "tries again");
        assert_eq!(packing.counts(), (1, 1 + u64::from(UNPACKED_AFTER_MISS)));
    }

    #[test]
    fn bulk_bytes_are_compressed_only_where_that_pays() {
        let (zeros, noisy) = (vec![0u8; 1 << 20], noise(3, 1 << 20));
        let gpas: Vec<u64> = (0..256).map(|i| i * 4096).collect();
        let (frame, packed) = encode_pages(3, &gpas, &noisy, true);
        assert!(!packed);
        match read_one(&frame) {
            Ok(Message::Pages { epoch, data, .. }) => assert!(epoch == 3 && data == noisy),
            other => panic!("{other:?}"),
        }
        let (frame, packed) = encode_resync(0, &zeros, true);
        assert!(packed && frame.len() < 8192, "{} bytes", frame.len());
        let (frame, packed) = encode_resync(0, &noisy, true);
        assert!(!packed && frame.len() == HEADER_LEN + 13 + noisy.len());
        let (frame, packed) = encode_resync(65536, &zeros, false);
        assert!(!packed);
        match read_one(&frame) {
            Ok(Message::Resync { offset, data }) => assert!(offset == 65536 && data == zeros),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malicious_pages_are_malformed() {
        let page = noise(5, PAGE_SIZE);
        let one = lz4_flex::block::compress_prepend_size(&page);
        let with_size = |size: u32, block: &[u8]| [&size.to_le_bytes()[..], block].concat();
        let short = with_size(4096, &lz4_flex::block::compress(&page[..100]));
        let cases: [(u32, &[u64], Vec<u8>, &str); 6] = [
            (
                2,
                &[0, 0x1000],
                one.clone(),
                "declares 4096 decompressed bytes for 2 pages",
            ),
            (1, &[0x1001], one.clone(), "gpa 0x1001 is not page aligned"),
            (1000, &[0], one.clone(), "too short"),
            (
                1,
                &[0],
                with_size(u32::MAX, &one[4..]),
                "declares 4294967295",
            ),
            (1, &[0], short, "decompress"),
            (1, &[0], with_size(4096, &[0xff; 16]), "does not decompress"),
        ];
        for (count, gpas, packed, needle) in cases {
            assert_malformed(PAGES, &pages_payload(count, gpas, &packed), needle);
        }
        let count = u32::try_from(MAX_PAGES_BYTES / PAGE_SIZE + 1).unwrap();
        let gpas = vec![0u64; count as usize];
        assert_malformed(PAGES, &pages_payload(count, &gpas, &one), "exceeds");
    }

    #[test]
    fn malicious_page_deltas_are_malformed() {
        let page = vec![0u8; PAGE_SIZE];
        let block = lz4_flex::block::compress(&page);
        // Epoch, count, gpas, forms, declared length, packing, data.
        let payload = |count: u32, gpas: &[u64], forms: &[u8], declared: u32, data: &[u8]| {
            let gpas: Vec<u8> = gpas.iter().flat_map(|g| g.to_le_bytes()).collect();
            [
                &5u64.to_le_bytes()[..],
                &count.to_le_bytes(),
                &gpas,
                forms,
                &declared.to_le_bytes(),
                &[LZ4],
                data,
            ]
            .concat()
        };
        let good = payload(1, &[0x1000], &[1], 4096, &block);
        match read_one(&frame(PAGE_DELTAS, &good)) {
            Ok(Message::PageDeltas { forms, data, .. }) => {
                assert!(forms == [PageForm::Delta] && data == page)
            }
            other => panic!("{other:?}"),
        }
        let cases: [(Vec<u8>, &str); 5] = [
            (
                payload(1, &[0x1000], &[2], 4096, &block),
                "PageDeltas page form 2 is unknown",
            ),
            (
                payload(1, &[0x1001], &[1], 4096, &block),
                "PageDeltas gpa 0x1001 is not page aligned",
            ),
            (
                payload(2, &[0x1000, 0x2000], &[1, 0], 4096, &block),
                "PageDeltas declares 4096 decompressed bytes for 2 pages",
            ),
            (
                payload(1, &[0x1000], &[1], 4096, &block[..block.len() - 1]),
                "PageDeltas data does not decompress",
            ),
            // The forms of 3 pages would run past the payload.
            (
                [&5u64.to_le_bytes()[..], &3u32.to_le_bytes(), &[0; 24], &[1]].concat(),
                "PageDeltas payload is too short",
            ),
        ];
        for (payload, needle) in cases {
            assert_malformed(PAGE_DELTAS, &payload, needle);
        }
    }

    #[test]
    fn other_bad_payloads_are_refused() {
        assert_malformed(ACK, &[1, 2, 3], "Ack payload is too short");
        assert_malformed(ACK, &[0; 9], "1 bytes after the end of Ack");
        assert_malformed(HEARTBEAT, &[0; 9], "after the end of Heartbeat");
        assert_malformed(REFUSE, &[2, 0, 0, 0, 0xc3, 0x28], "UTF-8");
        assert_malformed(STATE, &[0, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 1], "too short");
        let bad_channel = [&PROTOCOL_VERSION.to_le_bytes()[..], &[2]].concat();
        assert_malformed(HELLO, &bad_channel, "unknown channel 2");
        // A count of runs beyond the payload is refused before allocating.
        assert_malformed(
            NEED,
            &[0xff, 0xff, 0xff, 0x7f, 1, 2],
            "Need payload is too short",
        );
        let huge = [&0u64.to_le_bytes()[..], &u32::MAX.to_le_bytes()].concat();
        assert_malformed(RESYNC, &huge, "declares 4294967295 bytes");
        let resync = |declared: u32, packing: u8, rest: &[u8]| {
            [
                &0u64.to_le_bytes()[..],
                &declared.to_le_bytes(),
                &[packing],
                rest,
            ]
            .concat()
        };
        assert_malformed(
            RESYNC,
            &resync(4, 0, &[1, 2, 3]),
            "carries 3 bytes, declared 4",
        );
        assert_malformed(RESYNC, &resync(4, 2, &[1, 2, 3, 4]), "packing 2 is unknown");
        assert_malformed(RESYNC, &resync(4, 1, &[0xff; 3]), "does not decompress");
        // A count of frames beyond the payload is refused before allocating.
        assert_malformed(INPUT, &huge, "Input declares 4294967295 frames in 0 bytes");
        let cut = [
            &0u64.to_le_bytes()[..],
            &1u32.to_le_bytes(),
            &9u32.to_le_bytes(),
        ]
        .concat();
        assert_malformed(INPUT, &cut, "Input payload is too short");
        assert_malformed(
            SWAP_BEGINS,
            &[5, 0, 0, 0, 10, 0, 0, 2, 7],
            "not a multiple of 4",
        );
        for kind in [0, 23, 200] {
            let got = read_one(&frame(kind, &[]));
            assert!(
                matches!(got, Err(WireError::UnknownKind(k)) if k == kind),
                "{got:?}"
            );
        }
    }

    #[test]
    fn digest_agrees_on_equal_epochs_and_names_differences() {
        let (gpas, data) = batch();
        let state = noise(11, 777);
        let digest = |gpas: &[u64], data: &[u8], state: &[u8]| {
            let mut d = EpochDigest::new();
            d.add_pages(&gpas[..100], &data[..100 * PAGE_SIZE]);
            d.add_pages(&gpas[100..], &data[100 * PAGE_SIZE..]);
            d.add_state(state);
            d
        };
        let Message::EpochEnd {
            epoch,
            pages,
            state_bytes,
            checksum,
        } = digest(&gpas, &data, &state).end(8)
        else {
            panic!("end() is not an EpochEnd");
        };
        assert_eq!((epoch, pages, state_bytes), (8, 300, 777));
        let check = |d: EpochDigest| match d.verify(epoch, pages, state_bytes, checksum) {
            Ok(()) => String::new(),
            Err(e @ WireError::EpochMismatch { epoch: 8, .. }) => e.to_string(),
            Err(e) => panic!("{e}"),
        };
        assert_eq!(check(digest(&gpas, &data, &state)), "");

        let mut flipped = data.clone();
        flipped[150 * PAGE_SIZE + 9] ^= 0x40;
        let err = check(digest(&gpas, &flipped, &state));
        assert!(err.starts_with("epoch 8 does not match its EpochEnd: checksum: received "));
        assert!(
            !err.contains("pages:") && !err.contains("state bytes:"),
            "{err}"
        );

        let err = check(digest(&gpas[..299], &data[..299 * PAGE_SIZE], &state));
        assert!(
            err.contains("pages: received 299, sender declared 300; checksum"),
            "{err}"
        );

        let err = check(digest(&gpas, &data, &state[1..]));
        assert!(
            err.contains("state bytes: received 776, sender declared 777"),
            "{err}"
        );

        let mut changed = state.clone();
        changed[0] ^= 1;
        assert!(check(digest(&gpas, &data, &changed)).contains("checksum"));
    }
}
