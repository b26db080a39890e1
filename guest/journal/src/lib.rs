//! The on-disk record format of the `journal` payload, shared by the payload (`main.rs`) and
//! its host-side unit tests.
//!
//! One 512-byte sector per record; record `n` is at sector `n` (the log starts at sector 0).
//! All integers are little-endian.
//!
//! | bytes      | field                                                               |
//! |------------|---------------------------------------------------------------------|
//! | `0..4`     | magic `b"FTJR"`                                                     |
//! | `4..12`    | `seq: u64`, equal to the record's index `n`                         |
//! | `12..16`   | payload length `u32`, always [`PAYLOAD_LEN`] (492)                  |
//! | `16..508`  | payload: [`payload_byte`] stream seeded with `seq` (see below)       |
//! | `508..512` | CRC32C (Castagnoli, as iSCSI: reflected, init and xorout `!0`) of bytes `0..508` |
//!
//! The payload is deterministic: an xorshift64 generator (shifts 13, 7, 17) whose state
//! starts at `seq * 0x9E3779B97F4A7C15 ^ 0xD1B54A32D192ED03` (wrapping; 1 if that is 0); each
//! step's new state gives 8 payload bytes, little-endian, and the last step's upper 4 bytes
//! are dropped (492 = 61 * 8 + 4).
//!
//! A sector at index `n` is a *valid* record when its magic, `seq == n`, length, CRC and
//! payload are all right; it is *blank* when every byte is zero (the end of the log); anything
//! else is corrupt.
#![cfg_attr(not(test), no_std)]

/// Bytes per record (one virtio-blk sector).
pub const RECORD_SIZE: usize = 512;
/// Magic at the start of every record.
pub const MAGIC: [u8; 4] = *b"FTJR";
/// Payload bytes per record: everything between the header and the CRC.
pub const PAYLOAD_LEN: usize = CRC_OFFSET - PAYLOAD_OFFSET;
const PAYLOAD_OFFSET: usize = 16;
/// Where the CRC is stored; it covers bytes `0..CRC_OFFSET`.
pub const CRC_OFFSET: usize = RECORD_SIZE - 4;

/// What a sector holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// The valid record for its index.
    Valid,
    /// All zero: the end of the log.
    Blank,
    /// Neither.
    Corrupt,
}

/// The CRC32C (Castagnoli) table, reflected polynomial 0x82F63B78, built at compile time.
static CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

/// CRC32C of `data` (the iSCSI / `crc` crate's `CRC_32_ISCSI` parameters).
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc = CRC_TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// The payload generator for record `seq` (see the module documentation).
struct Payload(u64);

impl Payload {
    fn new(seq: u64) -> Self {
        let s = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
        Payload(if s == 0 { 1 } else { s })
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Writes the payload into `out` (PAYLOAD_LEN bytes).
    fn fill(mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let word = self.next().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }

    /// Whether `data` (PAYLOAD_LEN bytes) is the payload.
    fn matches(mut self, data: &[u8]) -> bool {
        data.chunks(8).all(|chunk| {
            let word = self.next().to_le_bytes();
            chunk == &word[..chunk.len()]
        })
    }
}

/// Writes record `seq` into `out` (exactly [`RECORD_SIZE`] bytes).
pub fn encode(seq: u64, out: &mut [u8]) {
    assert_eq!(out.len(), RECORD_SIZE);
    out[0..4].copy_from_slice(&MAGIC);
    out[4..12].copy_from_slice(&seq.to_le_bytes());
    out[12..16].copy_from_slice(&(PAYLOAD_LEN as u32).to_le_bytes());
    Payload::new(seq).fill(&mut out[PAYLOAD_OFFSET..CRC_OFFSET]);
    let crc = crc32c(&out[..CRC_OFFSET]);
    out[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
}

/// Classifies the sector `sector` found at index `index` (exactly [`RECORD_SIZE`] bytes).
pub fn check(index: u64, sector: &[u8]) -> Check {
    assert_eq!(sector.len(), RECORD_SIZE);
    let u32_at = |i: usize| u32::from_le_bytes(sector[i..i + 4].try_into().unwrap());
    let valid = sector[0..4] == MAGIC
        && u64::from_le_bytes(sector[4..12].try_into().unwrap()) == index
        && u32_at(12) as usize == PAYLOAD_LEN
        && u32_at(CRC_OFFSET) == crc32c(&sector[..CRC_OFFSET])
        && Payload::new(index).matches(&sector[PAYLOAD_OFFSET..CRC_OFFSET]);
    if valid {
        Check::Valid
    } else if sector.iter().all(|&b| b == 0) {
        Check::Blank
    } else {
        Check::Corrupt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_values() {
        // The CRC catalogue's check value for CRC-32/ISCSI, and RFC 3720's 32 zero bytes.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
    }

    #[test]
    fn records_round_trip_and_every_byte_matters() {
        let mut r = [0u8; RECORD_SIZE];
        for seq in [0u64, 1, 2, 499, 500, u64::MAX] {
            encode(seq, &mut r);
            assert_eq!(&r[..4], b"FTJR");
            assert_eq!(check(seq, &r), Check::Valid);
            assert_eq!(
                check(seq.wrapping_add(1), &r),
                Check::Corrupt,
                "wrong index"
            );
            for i in 0..RECORD_SIZE {
                let mut bad = r;
                bad[i] ^= 0x01;
                assert_eq!(check(seq, &bad), Check::Corrupt, "seq {seq} byte {i}");
            }
        }
        assert_eq!(check(7, &[0u8; RECORD_SIZE]), Check::Blank);
    }

    #[test]
    fn payloads_differ_between_records() {
        let (mut a, mut b) = ([0u8; RECORD_SIZE], [0u8; RECORD_SIZE]);
        encode(1, &mut a);
        encode(2, &mut b);
        assert_ne!(a[16..508], b[16..508]);
        // A record with a valid CRC but another record's payload is still corrupt.
        let mut forged = a;
        forged[4..12].copy_from_slice(&2u64.to_le_bytes());
        let crc = crc32c(&forged[..CRC_OFFSET]);
        forged[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(check(2, &forged), Check::Corrupt);
    }
}
