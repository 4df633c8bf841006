//! Quantizers: one engine, several grids.
//!
//! Every quantizer in asq has the same shape: divide by a positive step (LSQ's `s`, ASQ's
//! `s · beta_m`, POST's `alpha_c`), clamp into the grid's range `[lower, upper]`, project onto the
//! grid, multiply back. What differs is the [`Grid`]: the integers `n..=p` ([`IntGrid`], used by
//! uniform, LSQ and ASQ) or a non-uniform [`LevelSet`] (POT, APoT, POST). The engine
//! ([`fake_quant`], [`encode`], [`decode`], [`backward`]) is written once over a row layout: the
//! tensor is `[rows, row_len]` row-major and row `r` uses step `step(r)`. One row is a
//! per-tensor quantizer, rows = output channels is per-channel weights, rows = samples is ASQ.
//!
//! The modules [`lsq`], [`asq`], [`uniform`], [`pot`], [`apot`], [`post`] and [`weights`] give
//! each method its own named entry points, initialisation and gradient scaling.
//!
//! # Gradients (method.md)
//! With `t = x / step`, `P` the projection and `[lo, hi]` the clip range:
//! - `d x_hat / d x = 1` if `lo <= t <= hi`, else 0 (straight-through estimator);
//! - `d x_hat / d step = P(t) - t` if `lo < t < hi`, `lo` if `t <= lo`, `hi` if `t >= hi`.
//!
//! [`backward`] returns, per row, `R_r = sum_i dL/dx_hat_i · d x_hat_i / d step` and the
//! flat-order weighted total `sum_i dL/dx_hat_i · d x_hat_i / d step · w(row(i))`. Sums run in
//! f64 over fixed blocks of [`BLOCK`] elements (each in 8 interleaved lanes) combined in order,
//! so results do not depend on
//! the number of threads, and ASQ with every `beta = 1` equals LSQ bit for bit.
//!
//! # NaN and infinity
//! Inputs: `NaN` quantizes to 0 (code of the zero level) and contributes 0 to every gradient;
//! `±inf` clamp to the range ends (gradient w.r.t. the input 0, w.r.t. the step the bound).
//! Step sizes must be finite and positive ([`crate::Error::Step`] otherwise).
//! `NaN` in an incoming gradient is not hidden: it propagates.

pub mod apot;
pub mod asq;
pub mod lsq;
pub mod post;
pub mod pot;
pub mod uniform;
pub mod weights;

use rayon::prelude::*;

use crate::bits::{BitWidth, QuantRange};
use crate::error::{check_len, Error, Result};
use crate::levels::LevelSet;
use crate::round::round_half_even;

/// Elements per reduction block in [`backward`] (and per parallel task).
pub const BLOCK: usize = 1 << 14;

/// Tensors at least this long are processed with rayon.
pub const PARALLEL_MIN: usize = 1 << 18;

/// A projection target in the normalised (step-divided) domain.
pub trait Grid: Sync {
    /// Code width.
    fn bits(&self) -> BitWidth;
    /// Lower clip bound.
    fn lower(&self) -> f32;
    /// Upper clip bound.
    fn upper(&self) -> f32;
    /// Nearest grid point to `t`; `t` is finite and inside `[lower, upper]`.
    fn project(&self, t: f32) -> f32;
    /// Raw `b`-bit code of the grid point nearest to `t` (same precondition).
    fn encode(&self, t: f32) -> u8;
    /// Normalised value of a raw code, `None` if the code names no grid point.
    fn decode(&self, code: u8) -> Option<f32>;
}

/// The integer grid `{n - z, ..., p - z}` of a uniform quantizer: `n..=p` is the code range and
/// `z` an integer zero point (0 for LSQ, ASQ and symmetric uniform quantizers). Rounding is
/// half to even. Raw codes are `to_raw(q + z)` (two's complement for signed ranges).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntGrid {
    range: QuantRange,
    zero_point: i32,
}

impl IntGrid {
    /// The grid `n..=p` of `range`, zero point 0.
    pub const fn new(range: QuantRange) -> Self {
        Self {
            range,
            zero_point: 0,
        }
    }

    /// An affine grid: codes in `range`, value of code `c` is `c - zero_point`.
    pub fn affine(range: QuantRange, zero_point: i32) -> Result<Self> {
        if zero_point < range.min() || zero_point > range.max() {
            return Err(Error::Unsupported(format!(
                "zero point {zero_point} outside the code range [{}, {}]",
                range.min(),
                range.max()
            )));
        }
        Ok(Self { range, zero_point })
    }

    /// The code range.
    pub const fn range(&self) -> QuantRange {
        self.range
    }

    /// The zero point.
    pub const fn zero_point(&self) -> i32 {
        self.zero_point
    }
}

impl Grid for IntGrid {
    fn bits(&self) -> BitWidth {
        self.range.bits()
    }
    #[inline]
    fn lower(&self) -> f32 {
        (self.range.min() - self.zero_point) as f32
    }
    #[inline]
    fn upper(&self) -> f32 {
        (self.range.max() - self.zero_point) as f32
    }
    #[inline]
    fn project(&self, t: f32) -> f32 {
        round_half_even(t)
    }
    #[inline]
    fn encode(&self, t: f32) -> u8 {
        // round_half_even adds 1.5 * 2^23: the low mantissa bits of that sum are the rounded
        // integer in two's complement, so its low byte is the code without a float -> int
        // conversion (|t| <= 255 here, far inside the trick's range).
        let bits = (t + crate::round::MAGIC).to_bits();
        (bits as u8).wrapping_add(self.zero_point as u8) & self.range.bits().mask()
    }
    #[inline]
    fn decode(&self, code: u8) -> Option<f32> {
        (code <= self.range.bits().mask())
            .then(|| (self.range.from_raw(code) - self.zero_point) as f32)
    }
}

impl Grid for LevelSet {
    fn bits(&self) -> BitWidth {
        LevelSet::bits(self)
    }
    #[inline]
    fn lower(&self) -> f32 {
        LevelSet::lower(self)
    }
    #[inline]
    fn upper(&self) -> f32 {
        1.0
    }
    #[inline]
    fn project(&self, t: f32) -> f32 {
        LevelSet::project(self, t)
    }
    #[inline]
    fn encode(&self, t: f32) -> u8 {
        LevelSet::encode(self, t)
    }
    #[inline]
    fn decode(&self, code: u8) -> Option<f32> {
        LevelSet::decode(self, code)
    }
}

/// `x / step` clamped into the grid range `[lo, hi]` (the grid's bounds, read once per row by
/// the callers: read per element they were recomputed inside the loop, which then did not
/// vectorise), with NaN mapped to 0 (see the module docs).
#[inline(always)]
fn normalise(lo: f32, hi: f32, x: f32, step: f32) -> f32 {
    let t = x / step;
    if t.is_nan() {
        0.0
    } else {
        t.max(lo).min(hi)
    }
}

/// Number of rows implied by `len` elements and `rows` steps; checks divisibility.
fn row_len(len: usize, rows: usize) -> Result<usize> {
    if rows == 0 {
        return Err(Error::Length {
            what: "steps (one per row, at least one)",
            expected: 1,
            got: 0,
        });
    }
    if !len.is_multiple_of(rows) {
        return Err(Error::Length {
            what: "tensor (must be a whole number of rows)",
            expected: len.div_ceil(rows) * rows,
            got: len,
        });
    }
    Ok(len / rows)
}

/// Row-wise steps: either given per row or the product of a shared step and per-row betas.
#[derive(Debug, Clone, Copy)]
pub enum Steps<'a> {
    /// One step per row (one row = per tensor).
    PerRow(&'a [f32]),
    /// `step · beta[r]` for row `r` (ASQ).
    Scaled {
        /// The learnt step `s`.
        step: f32,
        /// Per-sample multipliers.
        betas: &'a [f32],
    },
}

impl Steps<'_> {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        match self {
            Steps::PerRow(s) => s.len(),
            Steps::Scaled { betas, .. } => betas.len(),
        }
    }

    /// Step of row `r`.
    #[inline(always)]
    pub fn get(&self, r: usize) -> f32 {
        match self {
            Steps::PerRow(s) => s[r],
            Steps::Scaled { step, betas } => step * betas[r],
        }
    }

    /// Checks every step (and the parts of a scaled step) is finite and positive.
    pub fn validate(&self) -> Result<()> {
        match self {
            Steps::PerRow(s) => crate::error::check_positive("step size", s),
            Steps::Scaled { step, betas } => {
                crate::error::check_positive("step size", core::slice::from_ref(step))?;
                crate::error::check_positive("beta", betas)?;
                // The product can still underflow to zero or overflow.
                for r in 0..betas.len() {
                    let v = step * betas[r];
                    if !(v.is_finite() && v > 0.0) {
                        return Err(Error::Step {
                            what: "step size x beta",
                            value: v,
                            index: r,
                        });
                    }
                }
                Ok(())
            }
        }
    }
}

/// Fake quantization: `out[i] = step(r) · P(clamp(x[i] / step(r)))`.
///
/// ```
/// use asq_core::quant::{fake_quant, IntGrid, Steps};
/// use asq_core::QuantRange;
/// let grid = IntGrid::new(QuantRange::signed(4)?);
/// let mut out = [0.0; 4];
/// fake_quant(&grid, &[0.26, -0.74, 9.0, f32::NAN], Steps::PerRow(&[0.5]), &mut out)?;
/// assert_eq!(out, [0.5, -0.5, 3.5, 0.0]);
/// # Ok::<(), asq_core::Error>(())
/// ```
pub fn fake_quant<G: Grid>(grid: &G, x: &[f32], steps: Steps<'_>, out: &mut [f32]) -> Result<()> {
    check_len("output", x.len(), out.len())?;
    steps.validate()?;
    let n = row_len(x.len(), steps.rows())?;
    map_rows(x, out, n, |r, xs, os| {
        let (s, lo, hi) = (steps.get(r), grid.lower(), grid.upper());
        for (o, &v) in os.iter_mut().zip(xs) {
            *o = s * grid.project(normalise(lo, hi, v, s));
        }
    });
    Ok(())
}

/// Integer encoding: raw `b`-bit codes of the projected values (see [`Grid::encode`]).
pub fn encode<G: Grid>(grid: &G, x: &[f32], steps: Steps<'_>, codes: &mut [u8]) -> Result<()> {
    check_len("codes", x.len(), codes.len())?;
    steps.validate()?;
    let n = row_len(x.len(), steps.rows())?;
    map_rows(x, codes, n, |r, xs, cs| {
        let (s, lo, hi) = (steps.get(r), grid.lower(), grid.upper());
        for (c, &v) in cs.iter_mut().zip(xs) {
            *c = grid.encode(normalise(lo, hi, v, s));
        }
    });
    Ok(())
}

/// Decoding: `out[i] = step(r) · value(codes[i])`. Equals [`fake_quant`] of the encoded tensor.
/// A code that names no grid point is an [`Error::Code`].
pub fn decode<G: Grid>(grid: &G, codes: &[u8], steps: Steps<'_>, out: &mut [f32]) -> Result<()> {
    check_len("output", codes.len(), out.len())?;
    steps.validate()?;
    let n = row_len(codes.len(), steps.rows())?;
    let table: Vec<Option<f32>> = (0..grid.bits().code_count())
        .map(|c| grid.decode(c as u8))
        .collect();
    for (r, (cs, os)) in codes
        .chunks(n.max(1))
        .zip(out.chunks_mut(n.max(1)))
        .enumerate()
    {
        let s = steps.get(r);
        for (j, (o, &c)) in os.iter_mut().zip(cs).enumerate() {
            match table.get(c as usize).copied().flatten() {
                Some(v) => *o = s * v,
                None => {
                    return Err(Error::Code {
                        code: c as u32,
                        bits: grid.bits().get(),
                        index: r * n + j,
                    })
                }
            }
        }
    }
    Ok(())
}

/// Applies `f(row, x_row, out_row)` to every row, in parallel for large tensors, each piece
/// compiled for the CPU's widest vectors (`pulp`'s run-time dispatch; the same IEEE operations
/// on every path, so results do not depend on it). Measured on a Xeon (criterion `quantizers`,
/// interleaved runs): fake quantization +10-14 %. (The backward pass dispatches its blocks the
/// same way, with the element-wise terms split from the f64 lane sums: 2.8x.)
fn map_rows<T: Send>(
    x: &[f32],
    out: &mut [T],
    row_len: usize,
    f: impl Fn(usize, &[f32], &mut [T]) + Sync,
) {
    if row_len == 0 {
        return;
    }
    let arch = pulp::Arch::new();
    let f = |r: usize, xs: &[f32], os: &mut [T]| arch.dispatch(Call(|| f(r, xs, os)));
    if x.len() >= PARALLEL_MIN {
        // Rows in parallel, and long rows split further so that one step still spreads out.
        x.par_chunks(row_len)
            .zip(out.par_chunks_mut(row_len))
            .enumerate()
            .for_each(|(r, (xs, os))| {
                xs.par_chunks(BLOCK * 4)
                    .zip(os.par_chunks_mut(BLOCK * 4))
                    .for_each(|(a, b)| f(r, a, b))
            });
    } else {
        for (r, (xs, os)) in x.chunks(row_len).zip(out.chunks_mut(row_len)).enumerate() {
            f(r, xs, os);
        }
    }
}

/// Gradient of the step size contributed by one element, and whether the input gradient passes.
/// Arithmetic on comparison results instead of an if-chain: the compiler emits no branches
/// (the outcomes are data-dependent and would mispredict), and groups of elements vectorise.
#[inline(always)]
fn step_term<G: Grid>(grid: &G, x: f32, step: f32) -> (f32, bool) {
    let t = x / step;
    let (lo, hi) = (grid.lower(), grid.upper());
    // NaN compares false everywhere: below = above = 0, and tc = lo is a grid point, so the
    // inside term P(lo) - lo is 0.
    let below = (t <= lo) as u32 as f32;
    let above = (t >= hi) as u32 as f32;
    let tc = t.max(lo).min(hi);
    let inside = grid.project(tc) - tc;
    let term = below * lo + above * hi + (1.0 - below - above) * inside;
    (term, t >= lo && t <= hi)
}

/// Elements per element-wise pass of [`backward`] (a multiple of [`LANES`]).
const CHUNK: usize = 64;

/// The element-wise part of [`backward`] with step `s`: input gradients `dx` (straight-through
/// inside the range) and the step-gradient contributions `gis` (as f32; a zero term
/// contributes exactly 0, even against an infinite incoming gradient).
#[inline(always)]
fn terms<G: Grid>(grid: &G, x: &[f32], g: &[f32], s: f32, dx: &mut [f32], gis: &mut [f32]) {
    for (((&xv, &gv), d), o) in x.iter().zip(g).zip(dx.iter_mut()).zip(gis.iter_mut()) {
        let (term, pass) = step_term(grid, xv, s);
        *d = if pass { gv } else { 0.0 };
        let p = gv * term;
        *o = if term == 0.0 { 0.0 } else { p };
    }
}

/// A call run through `pulp`'s dispatch: `with_simd` is generic over the instruction set, so
/// the closure's body is compiled inside each target-feature function (a closure handed to the
/// dispatch directly stays compiled for the baseline). Used by [`map_rows`] and [`backward`].
struct Call<F>(F);

impl<R, F: FnOnce() -> R> pulp::WithSimd for Call<F> {
    type Output = R;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) -> R {
        (self.0)()
    }
}

/// Independent accumulators of the reductions: element `k` of a block goes to lane `k % LANES`,
/// lanes are combined in order. Keeps many additions in flight and stays deterministic.
const LANES: usize = 8;

/// One block of [`backward`] (elements `b·BLOCK..`): its weighted total, with the partial sums
/// of the rows it touches in `parts`. A struct run through pulp's dispatch rather than a
/// closure: a closure this large was not inlined into the dispatch's target-feature function and
/// ran as baseline (SSE) code.
struct Block<'a, 'p, G> {
    grid: &'a G,
    x: &'a [f32],
    steps: Steps<'a>,
    grad_out: &'a [f32],
    weights: Option<&'a [f32]>,
    n: usize,
    b: usize,
    dxs: &'p mut [f32],
    parts: &'p mut Vec<f64>,
}

impl<G: Grid> pulp::WithSimd for Block<'_, '_, G> {
    type Output = f64;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) -> f64 {
        let Block {
            grid,
            x,
            steps,
            grad_out,
            weights,
            n,
            b,
            dxs,
            parts,
        } = self;
        let weight = |r: usize| weights.map_or(1.0, |w| w[r] as f64);
        // Element k of the block feeds lane k % LANES of both sums whatever its row, so a
        // tensor split into rows of weight 1 (ASQ with beta = 1) sums exactly like one row
        // (LSQ).
        let start = b * BLOCK;
        let end = (start + BLOCK).min(x.len());
        parts.clear();
        let mut total = [0.0f64; LANES];
        let mut i = start;
        while i < end {
            let r = i / n;
            let row_end = ((r + 1) * n).min(end);
            let s = steps.get(r);
            let w = weight(r);
            let mut part = [0.0f64; LANES];
            // One element (head and tail): the same terms as the chunks.
            let elem = |k: usize, dx: &mut f32| -> f32 {
                let mut gi = [0.0f32];
                terms(
                    grid,
                    &x[k..k + 1],
                    &grad_out[k..k + 1],
                    s,
                    std::slice::from_mut(dx),
                    &mut gi,
                );
                gi[0]
            };
            let mut k = i;
            // Scalar head up to a lane boundary, whole groups of LANES (vectorisable), scalar
            // tail; every element lands in lane (k - start) % LANES either way.
            while k < row_end && !(k - start).is_multiple_of(LANES) {
                let gi = elem(k, &mut dxs[k - start]) as f64;
                part[(k - start) % LANES] += gi;
                total[(k - start) % LANES] += gi * w;
                k += 1;
            }
            // Whole groups, up to CHUNK elements at a time: first the element-wise terms (a
            // plain map), then the lane sums in element order.
            while k + LANES <= row_end {
                let len = ((row_end - k) / LANES * LANES).min(CHUNK);
                let mut gis = [0.0f32; CHUNK];
                terms(
                    grid,
                    &x[k..k + len],
                    &grad_out[k..k + len],
                    s,
                    &mut dxs[k - start..k - start + len],
                    &mut gis[..len],
                );
                for c in gis[..len].chunks_exact(LANES) {
                    for l in 0..LANES {
                        part[l] += c[l] as f64;
                        total[l] += c[l] as f64 * w;
                    }
                }
                k += len;
            }
            while k < row_end {
                let gi = elem(k, &mut dxs[k - start]) as f64;
                part[(k - start) % LANES] += gi;
                total[(k - start) % LANES] += gi * w;
                k += 1;
            }
            parts.push(part.iter().sum());
            i = row_end;
        }
        total.iter().sum()
    }
}

/// Backward pass of [`fake_quant`].
///
/// Writes `dx` (straight-through inside the range), `row_sums[r] = R_r` (see the module docs)
/// and returns the flat-order total `sum_i G_i · weight(row(i))` (`weights = None` means 1).
/// Gradient scaling (LSQ's `g`) is left to the caller, which knows which sum it needs.
pub fn backward<G: Grid>(
    grid: &G,
    x: &[f32],
    steps: Steps<'_>,
    grad_out: &[f32],
    weights: Option<&[f32]>,
    dx: &mut [f32],
    row_sums: &mut [f32],
) -> Result<f64> {
    check_len("incoming gradient", x.len(), grad_out.len())?;
    check_len("input gradient", x.len(), dx.len())?;
    check_len("row sums", steps.rows(), row_sums.len())?;
    if let Some(w) = weights {
        check_len("row weights", steps.rows(), w.len())?;
    }
    steps.validate()?;
    let n = row_len(x.len(), steps.rows())?;
    if n == 0 {
        row_sums.iter_mut().for_each(|r| *r = 0.0);
        return Ok(0.0);
    }
    let blocks = x.len().div_ceil(BLOCK);
    let mut row_acc = vec![0.0f64; steps.rows()];
    let mut total = 0.0f64;
    let mut merge = |b: usize, t: f64, parts: &[f64]| {
        total += t;
        let first_row = b * BLOCK / n;
        for (j, p) in parts.iter().enumerate() {
            row_acc[first_row + j] += p;
        }
    };
    // Each block compiled for the CPU's widest vectors (pulp's dispatch; the same IEEE
    // operations in the same order on every path).
    let arch = pulp::Arch::new();
    let block = |b: usize, dxs: &mut [f32], parts: &mut Vec<f64>| -> f64 {
        arch.dispatch(Block {
            grid,
            x,
            steps,
            grad_out,
            weights,
            n,
            b,
            dxs,
            parts,
        })
    };
    if x.len() >= PARALLEL_MIN {
        let results: Vec<(f64, Vec<f64>)> = dx
            .par_chunks_mut(BLOCK)
            .enumerate()
            .map(|(b, dxs)| {
                let mut parts = Vec::new();
                let t = block(b, dxs, &mut parts);
                (t, parts)
            })
            .collect();
        for (b, (t, parts)) in results.iter().enumerate() {
            merge(b, *t, parts);
        }
    } else {
        let mut parts = Vec::new();
        for (b, dxs) in dx.chunks_mut(BLOCK).enumerate().take(blocks) {
            let t = block(b, dxs, &mut parts);
            merge(b, t, &parts);
        }
    }
    for (o, a) in row_sums.iter_mut().zip(&row_acc) {
        *o = *a as f32;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_layouts_and_steps_are_errors() {
        let g = IntGrid::new(QuantRange::signed(4).unwrap());
        let mut out = [0.0; 6];
        assert!(matches!(
            fake_quant(&g, &[0.0; 6], Steps::PerRow(&[1.0; 4]), &mut out),
            Err(Error::Length { .. })
        ));
        assert!(fake_quant(&g, &[0.0; 6], Steps::PerRow(&[]), &mut out).is_err());
        assert!(matches!(
            fake_quant(&g, &[0.0; 6], Steps::PerRow(&[1.0, 0.0]), &mut out),
            Err(Error::Step { index: 1, .. })
        ));
        assert!(fake_quant(&g, &[0.0; 6], Steps::PerRow(&[f32::NAN]), &mut out).is_err());
        assert!(fake_quant(
            &g,
            &[0.0; 6],
            Steps::Scaled {
                step: 1e-30,
                betas: &[1e-30]
            },
            &mut out[..6]
        )
        .is_err());
        assert!(fake_quant(&g, &[0.0; 5], Steps::PerRow(&[1.0]), &mut out).is_err());
    }

    #[test]
    fn decode_rejects_codes_outside_the_width() {
        let g = IntGrid::new(QuantRange::unsigned(2).unwrap());
        let mut out = [0.0; 2];
        assert!(matches!(
            decode(&g, &[1, 4], Steps::PerRow(&[1.0]), &mut out),
            Err(Error::Code {
                code: 4,
                index: 1,
                ..
            })
        ));
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        // A tensor above PARALLEL_MIN against the same data processed row block by row block.
        let g = IntGrid::new(QuantRange::unsigned(3).unwrap());
        let len = 3 * 90_000;
        assert!(len >= PARALLEL_MIN);
        let x: Vec<f32> = (0..len)
            .map(|i| ((i * 7919) % 1013) as f32 / 100.0 - 1.0)
            .collect();
        let go: Vec<f32> = (0..len)
            .map(|i| ((i * 104_729) % 997) as f32 / 997.0 - 0.5)
            .collect();
        let steps = [0.31f32, 0.77, 0.5];
        let mut big = vec![0.0; len];
        fake_quant(&g, &x, Steps::PerRow(&steps), &mut big).unwrap();
        let n = len / 3;
        for r in 0..3 {
            let mut small = vec![0.0; n];
            fake_quant(
                &g,
                &x[r * n..(r + 1) * n],
                Steps::PerRow(&steps[r..r + 1]),
                &mut small,
            )
            .unwrap();
            assert_eq!(&big[r * n..(r + 1) * n], &small[..]);
        }
        // Backward: the threaded sum over blocks equals a serial sum over the same blocks.
        let mut dx = vec![0.0; len];
        let mut rows = [0.0; 3];
        let total = backward(&g, &x, Steps::PerRow(&steps), &go, None, &mut dx, &mut rows).unwrap();
        let mut expect_total = 0.0f64;
        let mut expect_rows = [0.0f64; 3];
        for b in 0..len.div_ceil(BLOCK) {
            let mut block_parts = [0.0f64; 3];
            for i in b * BLOCK..((b + 1) * BLOCK).min(len) {
                let r = i / n;
                let (term, _) = step_term(&g, x[i], steps[r]);
                block_parts[r] += if term == 0.0 {
                    0.0
                } else {
                    (go[i] * term) as f64
                };
            }
            for r in 0..3 {
                expect_rows[r] += block_parts[r];
            }
            expect_total += block_parts.iter().sum::<f64>();
        }
        assert!((total - expect_total).abs() <= 1e-9 * expect_total.abs().max(1.0));
        // The same call on one and on two threads: identical bits.
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut dx = vec![0.0; len];
            let mut rows = [0.0f32; 3];
            let t = pool.install(|| {
                backward(&g, &x, Steps::PerRow(&steps), &go, None, &mut dx, &mut rows).unwrap()
            });
            (
                t.to_bits(),
                rows.map(f32::to_bits),
                dx.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            )
        };
        assert_eq!(run(1), run(2));
        for r in 0..3 {
            assert!(
                (rows[r] as f64 - expect_rows[r]).abs() <= 1e-5 * expect_rows[r].abs().max(1.0)
            );
        }
    }
}
