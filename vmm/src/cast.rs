//! Integer conversions for the casts the workspace lints flag (see `[workspace.lints]`).
//!
//! ftvmm builds for x86_64 only, where `usize` is 64 bits wide: conversions between `usize`
//! and `u64` are exact, and these helpers say so once instead of an `as` at every site.

const _: () = assert!(usize::BITS == u64::BITS, "ftvmm needs a 64-bit usize");

/// `v` as a `usize`; exact, `usize` being 64 bits wide.
#[allow(clippy::cast_possible_truncation)]
pub const fn u64_to_usize(v: u64) -> usize {
    v as usize
}

/// `v` as a `u64`; exact, `usize` being 64 bits wide.
pub const fn usize_to_u64(v: usize) -> u64 {
    v as u64
}

/// `v` as a `u64`, or `u64::MAX` beyond it: for durations in whole units (`as_micros` and
/// the like return `u128`), which only saturate after half a million years of microseconds.
pub fn saturating_u64(v: u128) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_are_exact_and_durations_saturate() {
        assert_eq!(u64_to_usize(u64::MAX), usize::MAX);
        assert_eq!(usize_to_u64(usize::MAX), u64::MAX);
        assert_eq!(saturating_u64(1234), 1234);
        assert_eq!(saturating_u64(u128::MAX), u64::MAX);
    }
}
