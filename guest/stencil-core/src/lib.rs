//! The 2-D heat-diffusion kernel (Jacobi, 5-point) shared by the `stencil` payload and the host.
//!
//! The payload runs it inside the guest, split by rows over its vCPUs; the host runs the very
//! same code natively (for the reference checksum and the native-speed benchmark). Every cell of
//! a step is computed from the previous grid only, with a fixed order of floating-point
//! operations, so the result is bit-identical whatever the row split or the vCPU count.
//!
//! Grid layout: `n * n` `f64` cells, row-major, `cell(r, c) = grid[r * n + c]`. The border
//! (row 0, row n-1, column 0, column n-1) is a fixed boundary condition: it is set by [`init`]
//! in both buffers and never written by [`step_rows`].
#![no_std]

extern crate alloc;

use alloc::vec;

/// FNV-1a 64-bit offset basis (start value of [`checksum`]).
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64-bit prime.
pub const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Smallest grid the kernel accepts (one interior cell).
pub const MIN_N: usize = 3;

/// The initial value of cell `(r, c)` of an `n * n` grid.
///
/// Deterministic and exact (only small integers and powers of two): the top edge is hot (1.0),
/// the left edge warm (0.5), the other edges cold (0.0), and a hot square (2.0) of side n/8
/// sits off-centre so the field is not symmetric.
pub fn initial_value(n: usize, r: usize, c: usize) -> f64 {
    if r == 0 {
        1.0
    } else if c == 0 {
        0.5
    } else if r == n - 1 || c == n - 1 {
        0.0
    } else {
        let side = (n / 8).max(1);
        let (r0, c0) = (n / 3, n / 2);
        if (r0..r0 + side).contains(&r) && (c0..c0 + side).contains(&c) {
            2.0
        } else {
            0.0
        }
    }
}

/// Fills rows `rows.start..rows.end` of `grid` (an `n * n` grid) with [`initial_value`].
///
/// Callers initialise both buffers completely (the border must be in both).
pub fn init_rows(grid: &mut [f64], n: usize, rows: core::ops::Range<usize>) {
    assert!(n >= MIN_N && grid.len() == n * n && rows.end <= n);
    for r in rows {
        let row = &mut grid[r * n..(r + 1) * n];
        for (c, cell) in row.iter_mut().enumerate() {
            *cell = initial_value(n, r, c);
        }
    }
}

/// Fills the whole `n * n` grid with [`initial_value`].
pub fn init(grid: &mut [f64], n: usize) {
    init_rows(grid, n, 0..n);
}

/// The interior rows (`1..n-1`) that worker `part` of `parts` computes: contiguous, balanced,
/// covering every interior row exactly once over all parts (some may be empty).
pub fn row_range(n: usize, parts: usize, part: usize) -> core::ops::Range<usize> {
    let interior = n.saturating_sub(2);
    let parts = parts.max(1);
    let lo = 1 + interior * part / parts;
    let hi = 1 + interior * (part + 1) / parts;
    lo..hi
}

/// One Jacobi step for rows `first_row .. first_row + dst_rows.len() / n`.
///
/// `src` is the whole previous grid; `dst_rows` is the slice of the next grid holding exactly
/// those rows (so several workers can own disjoint row slices of the same buffer). Border
/// columns are not written; the rows must be interior rows.
///
/// `new = 0.25 * ((up + down) + (left + right))`, in that order.
pub fn step_rows(src: &[f64], dst_rows: &mut [f64], n: usize, first_row: usize) {
    assert!(n >= MIN_N && src.len() == n * n && dst_rows.len().is_multiple_of(n));
    let rows = dst_rows.len() / n;
    assert!(first_row >= 1 && first_row + rows < n);
    for i in 0..rows {
        let r = first_row + i;
        let up = &src[(r - 1) * n..r * n];
        let mid = &src[r * n..(r + 1) * n];
        let down = &src[(r + 1) * n..(r + 2) * n];
        let out = &mut dst_rows[i * n..(i + 1) * n];
        for c in 1..n - 1 {
            out[c] = 0.25 * ((up[c] + down[c]) + (mid[c - 1] + mid[c + 1]));
        }
    }
}

/// Continues an FNV-1a style hash over the bit patterns of `cells`: for each cell in order,
/// `h = (h ^ cell.to_bits()).wrapping_mul(FNV_PRIME)` (whole 64-bit words, not bytes).
pub fn checksum_update(mut h: u64, cells: &[f64]) -> u64 {
    for v in cells {
        h = (h ^ v.to_bits()).wrapping_mul(FNV_PRIME);
    }
    h
}

/// The checksum of a grid: [`checksum_update`] from [`FNV_OFFSET`] over all cells, row-major.
pub fn checksum(grid: &[f64]) -> u64 {
    checksum_update(FNV_OFFSET, grid)
}

/// Runs `steps` steps serially on two `n * n` buffers (`a` holds the start grid).
/// Returns `true` when the result is in `b` (odd `steps`), `false` when it is in `a`.
pub fn run_serial(a: &mut [f64], b: &mut [f64], n: usize, steps: u64) -> bool {
    let interior = 1..n - 1;
    for s in 0..steps {
        let (src, dst) = if s % 2 == 0 {
            (&*a, &mut *b)
        } else {
            (&*b, &mut *a)
        };
        step_rows(
            src,
            &mut dst[interior.start * n..interior.end * n],
            n,
            interior.start,
        );
    }
    steps % 2 == 1
}

/// The reference result of the payload: initialise an `n * n` grid, run `steps` steps, and
/// return the [`checksum`] of the final grid. Allocates `2 * n * n * 8` bytes.
pub fn reference_checksum(n: usize, steps: u64) -> u64 {
    assert!(n >= MIN_N);
    let mut a = vec![0.0f64; n * n];
    let mut b = vec![0.0f64; n * n];
    init(&mut a, n);
    init(&mut b, n);
    let in_b = run_serial(&mut a, &mut b, n, steps);
    checksum(if in_b { &b } else { &a })
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use alloc::vec::Vec;

    #[test]
    fn row_ranges_cover_interior_once() {
        for n in [3usize, 4, 5, 17, 64, 100] {
            for parts in 1..9 {
                let mut next = 1;
                for p in 0..parts {
                    let r = row_range(n, parts, p);
                    assert_eq!(r.start, next);
                    next = r.end;
                }
                assert_eq!(next, n - 1);
            }
        }
    }

    /// A split run (as the payload does with several vCPUs) gives the same bits as a serial one.
    #[test]
    fn split_matches_serial() {
        let n = 37;
        let steps = 25;
        for parts in [1usize, 2, 3, 5] {
            let mut a = vec![0.0; n * n];
            let mut b = vec![0.0; n * n];
            init(&mut a, n);
            init(&mut b, n);
            for s in 0..steps {
                let (src, dst): (&Vec<f64>, &mut Vec<f64>) = if s % 2 == 0 {
                    (&a, &mut b)
                } else {
                    (&b, &mut a)
                };
                // Process parts in reverse order to show order independence.
                for p in (0..parts).rev() {
                    let r = row_range(n, parts, p);
                    step_rows(src, &mut dst[r.start * n..r.end * n], n, r.start);
                }
            }
            let result = if steps % 2 == 1 { &b } else { &a };
            assert_eq!(checksum(result), reference_checksum(n, steps as u64));
        }
    }

    #[test]
    fn heat_spreads_and_border_stays() {
        let n = 16;
        let mut a = vec![0.0; n * n];
        let mut b = vec![0.0; n * n];
        init(&mut a, n);
        init(&mut b, n);
        let start = checksum(&a);
        let in_b = run_serial(&mut a, &mut b, n, 3);
        let g = if in_b { &b } else { &a };
        assert_ne!(checksum(g), start);
        assert_eq!(g[0], 1.0);
        assert_eq!(g[5 * n], 0.5);
        assert!(g[n + 5] > 0.0, "heat from the top edge reaches row 1");
    }

    #[test]
    fn zero_steps_is_initial_grid() {
        let n = 9;
        let mut a = vec![0.0; n * n];
        init(&mut a, n);
        assert_eq!(reference_checksum(n, 0), checksum(&a));
    }
}
