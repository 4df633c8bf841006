//! Direct stride-1 convolution without im2col, for the small-channel layers of CIFAR-style
//! networks (ResNet-20's 16/32/64 channels), where im2col + GEMM spends more time copying than
//! multiplying.
//!
//! Every input plane is copied once into a zero-padded plane of width `wp = w + 2·pw`, and the
//! output is computed on the same flat grid: output position `q = oy·wp + ox` reads input
//! `q + ky·wp + kx` for tap `(ky, kx)`, so each tap is a plain shifted vector load. Positions with
//! `ox >= ow` are computed and thrown away (2 of every `wp` for a 3x3 kernel). Three products:
//! - forward: `out[o][q] = Σ_{i,t} w[o][i][t] · x[i][q + off_t]`, vectorised along `q`; the register
//!   block is 8 output channels x 3 vectors of pixels on planes of at least 192 grid positions
//!   (24 accumulators, 11 loads per 24 FMAs; 8 x 2 where that rounds up to fewer positions, e.g.
//!   14x14: 224 instead of 240, +5 %), 8 x 2 on planes of 24 to 191 positions (2x
//!   faster than 16 x 1 on ResNet-20's 7x7 layers: its weights fit L1 beside the input), and
//!   16 channels x 1 vector on smaller ones (less
//!   padding waste); measured on a Xeon: 113 -> 126-140 GFLOP/s on ResNet-20's 16-channel layer.
//!   AVX2's 16 registers take 4 x 3 and 4 x 2 blocks instead (AVX-512's spill there: 38 -> 73
//!   GFLOP/s on a Zen 3).
//!   On planes with rows of 7 or 14 pixels and at least 32 channels (ResNet's 7x7 and 14x14
//!   stages, the stride-2 layers into them, and their input gradients), and on AVX2 on every
//!   plane with rows of 7 to 28 pixels (ResNet's 16-channel 28x28 stage too: there the grid
//!   kernel's shifted loads, one in two across a cache line, measured 41 against 69 GFLOP/s),
//!   the product runs along the output channels instead ([`forward_rows`]: 7 pixels x 2
//!   channel vectors, inputs broadcast; on AVX2 1 vector, each input broadcast once for the
//!   three taps of a kernel row that read it; no thrown-away positions, pixel-major output): the
//!   same sums in the same order;
//! - input gradient: the same product on the zero-padded output gradient with the kernel
//!   transposed and flipped;
//! - weight gradient: `dw[o][i][t] = Σ_q gy[q][o] · x[i][q + off_t]`, vectorised along the output
//!   channels of a pixel-major copy of the output gradient, reduced in registers over the valid
//!   output pixels (the grid's thrown-away columns skipped); for a 3x3 kernel on 16 channels,
//!   each input value broadcast once for the three pixels whose taps read it. Or, for few
//!   channels on large planes (ResNet's 16-channel 28x28 layers), vectorised along the grid like
//!   the forward: `acc[o][i][t][l] += gy[o][q] · x[i][q + off_t]` over `q ≡ l (mod 16)`, the output
//!   gradient read straight from the input gradient's zero-padded copy (no pixel-major copy),
//!   the 16 lanes added at the end.
//!
//! On machines whose widest vectors are AVX2's, the 3x3 products and weight gradients with at
//! least 32 channels each way, and the 16-channel weight gradients on 28x28-sized planes, run
//! in Winograd's domain instead (`ops::winograd`).
//!
//! The kernels are written once over `pulp`'s safe SIMD abstraction and dispatched at run time
//! (AVX-512, AVX2 + FMA, or scalar): no `unsafe` here. Every multiply-add is fused and every sum
//! runs in the same order whatever the vector width, so all three paths give bit-identical
//! results (tested), independent of the thread count; they differ from the im2col path only by
//! rounding.

use crate::ops::norm::Coef;
use pulp::{Simd, WithSimd};
use rayon::prelude::*;

/// The channel padding unit (a multiple of both forward register blocks, 8 and 16).
pub(crate) const CO_BLOCK: usize = 16;

/// The widest vector the dispatch may pick (AVX-512: 16 f32): grids are padded to it.
const MAX_LANES: usize = 16;

/// Grid positions from which the forward kernel uses the wide block (8 channels x 3 vectors).
const WIDE_MIN: usize = 192;

/// Grid positions from which (up to [`WIDE_MIN`]) the forward kernel uses the middle block (8
/// channels x 2 vectors), below which the narrow one (16 channels x 1 vector).
const MID_MIN: usize = 24;

/// Geometry of one stride-1 correlation on the padded flat grid.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Grid {
    /// Input height and width.
    pub h: usize,
    pub w: usize,
    /// Zero padding, rows and columns.
    pub ph: usize,
    pub pw: usize,
    /// Kernel height and width.
    pub kh: usize,
    pub kw: usize,
    /// Padded width (the grid's row length).
    pub wp: usize,
    /// Output height and width.
    pub oh: usize,
    pub ow: usize,
    /// Grid positions computed per output plane (`oh·wp` rounded up to [`Grid::tile`]).
    pub nq: usize,
    /// Pixels per register block of the forward kernel: 48 (3 vectors of 16, 8 channels) on
    /// planes of at least [`WIDE_MIN`] positions (32 where rounding to 48 computes more
    /// positions than rounding to 32), 32 (2 vectors, 8 channels) on planes of at least
    /// [`MID_MIN`], else 16 (1 vector, 16 channels). The block does not change any sum's order.
    pub tile: usize,
    /// Length of one padded input plane (every read of every kernel stays inside it).
    pub plane: usize,
}

impl Grid {
    /// `None` when the kernel does not fit the padded input.
    pub(crate) fn new(
        h: usize,
        w: usize,
        ph: usize,
        pw: usize,
        kh: usize,
        kw: usize,
    ) -> Option<Self> {
        let (hp, wp) = (h + 2 * ph, w + 2 * pw);
        if kh == 0 || kw == 0 || hp < kh || wp < kw {
            return None;
        }
        let (oh, ow) = (hp - kh + 1, wp - kw + 1);
        let positions = oh * wp;
        let rounded = |tile: usize| positions.div_ceil(tile) * tile;
        let tile = if positions >= WIDE_MIN {
            // The middle block where the wide one's rounding computes more positions (a 14x14
            // plane: 224 grid positions, 240 on the wide tile, 224 on the middle one).
            if rounded(2 * MAX_LANES) < rounded(3 * MAX_LANES) {
                2 * MAX_LANES
            } else {
                3 * MAX_LANES
            }
        } else if positions >= MID_MIN {
            2 * MAX_LANES
        } else {
            MAX_LANES
        };
        let nq = (oh * wp).div_ceil(tile) * tile;
        let plane = (nq + (kh - 1) * wp + kw - 1).max(hp * wp);
        Some(Self {
            h,
            w,
            ph,
            pw,
            kh,
            kw,
            wp,
            oh,
            ow,
            nq,
            tile,
            plane,
        })
    }

    /// Output channels per register block of the forward kernel (see [`Grid::tile`]).
    pub(crate) fn co_block(&self) -> usize {
        if self.tile > MAX_LANES {
            8
        } else {
            16
        }
    }

    /// Grid offset of each tap, `ky·wp + kx`, row-major over the kernel.
    pub(crate) fn offsets(&self) -> Vec<usize> {
        (0..self.kh * self.kw)
            .map(|t| (t / self.kw) * self.wp + t % self.kw)
            .collect()
    }

    /// Copies `c` planes of `h x w` into zero-padded planes of length [`Grid::plane`].
    pub(crate) fn pad(&self, src: &[f32], c: usize, dst: &mut [f32]) {
        dispatch(Pad {
            grid: self,
            src,
            c,
            dst,
            act: None,
        })
    }

    /// [`Grid::pad`] of `max((x - mu)·k + b, 0)` with plane `i`'s `(mu, k, b) = coef[i]`: a
    /// training-mode batch norm + ReLU applied on the way in, with its arithmetic (the same
    /// values as the separate op's output), the padding zero.
    pub(crate) fn pad_bn_relu(&self, src: &[f32], c: usize, dst: &mut [f32], coef: &[Coef]) {
        assert!(coef.len() >= c, "coefficients for {c} channels");
        dispatch(Pad {
            grid: self,
            src,
            c,
            dst,
            act: Some(coef),
        })
    }

    /// Copies the valid `oh x ow` part of `c` grid planes (length [`Grid::nq`]) out, adding
    /// `bias[i]` to plane `i` when given.
    pub(crate) fn extract(&self, src: &[f32], c: usize, dst: &mut [f32], bias: Option<&[f32]>) {
        dispatch(Extract {
            grid: self,
            src,
            c,
            dst,
            bias,
            add: false,
        })
    }

    /// [`Grid::extract`] added to what `dst` holds (`dst + value`, no bias).
    pub(crate) fn extract_add(&self, src: &[f32], c: usize, dst: &mut [f32]) {
        dispatch(Extract {
            grid: self,
            src,
            c,
            dst,
            bias: None,
            add: true,
        })
    }

    /// [`Grid::extract`] for a pixel-major product (`src` `[oh·ow][c_pad]`, [`forward_rows`]):
    /// the `c` planes of `oh x ow` into `dst`, `bias[i]` added to plane `i` when given, or
    /// with `add` added to what `dst` holds (the same arithmetic as [`Grid::extract`]).
    pub(crate) fn extract_pixels(
        &self,
        src: &[f32],
        (c, c_pad): (usize, usize),
        dst: &mut [f32],
        bias: Option<&[f32]>,
        add: bool,
    ) {
        dispatch(TransposeIn {
            pixels: self.oh * self.ow,
            src,
            c,
            c_pad,
            dst,
            bias,
            add,
        })
    }

    /// A pixel-major copy `[oh·ow][co_pad]` of `co` planes of `oh x ow`, zero at the padding
    /// channels (the weight gradient's layout).
    pub(crate) fn transpose_out(&self, src: &[f32], co: usize, co_pad: usize, dst: &mut [f32]) {
        dispatch(TransposeOut {
            pixels: self.oh * self.ow,
            src,
            co,
            co_pad,
            dst,
        })
    }
}

/// [`Grid::extract_pixels`].
struct TransposeIn<'a> {
    pixels: usize,
    src: &'a [f32],
    c: usize,
    c_pad: usize,
    dst: &'a mut [f32],
    bias: Option<&'a [f32]>,
    add: bool,
}

impl WithSimd for TransposeIn<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Self {
            pixels,
            src,
            c,
            c_pad,
            dst,
            bias,
            add,
        } = self;
        // Pixel-major `[pixels][c_pad]` -> planes `[c][pixels]`.
        transpose(
            simd,
            (&src[..pixels * c_pad], c_pad),
            (dst, pixels),
            (pixels, c),
            Finish { bias, add },
        );
    }
}

/// What a transposed value becomes on its way out: as [`Extract`], `v + b` with row `j`'s
/// `bias[j]` (a zero bias adds nothing: -0.0 stays), then `d + that` with `add` (`d` what the
/// destination held).
#[derive(Clone, Copy)]
struct Finish<'a> {
    bias: Option<&'a [f32]>,
    add: bool,
}

impl Finish<'_> {
    /// Destination row `j`'s bias, `None` where it adds nothing.
    #[inline(always)]
    fn bias(&self, j: usize) -> Option<f32> {
        self.bias.map(|b| b[j]).filter(|&b| b != 0.0)
    }

    #[inline(always)]
    fn value(&self, j: usize, v: f32, d: f32) -> f32 {
        let v = match self.bias(j) {
            Some(b) => v + b,
            None => v,
        };
        if self.add {
            d + v
        } else {
            v
        }
    }
}

/// `dst[j·dld + i] = fin(j, src[i·sld + j], dst[j·dld + i])` for `i < rows`, `j < cols`: with
/// AVX (the AVX2 and AVX-512 levels) in tiles of 8 x 8 transposed in registers by shuffles
/// ([`transpose8`]); else in tiles of 16 x 16 through a fixed-size array (which the compiler
/// turns into scalar moves); the rest value by value. The same values on every level (moves,
/// and the same additions). Called inside a kernel's `with_simd`.
#[inline(always)]
fn transpose<S: Simd>(
    _: S,
    (src, sld): (&[f32], usize),
    (dst, dld): (&mut [f32], usize),
    (rows, cols): (usize, usize),
    fin: Finish,
) {
    #[cfg(target_arch = "x86_64")]
    if S::F32_LANES >= 8 {
        if let Some(v3) = pulp::x86::V3::try_new() {
            let (ri, cj) = (rows / 8 * 8, cols / 8 * 8);
            for i0 in (0..ri).step_by(8) {
                for j0 in (0..cj).step_by(8) {
                    transpose8(
                        v3,
                        (&src[i0 * sld + j0..], sld),
                        (&mut dst[j0 * dld + i0..], dld),
                        j0,
                        fin,
                    );
                }
            }
            transpose_rest((src, sld), (dst, dld), (rows, cols), (ri, cj), fin);
            return;
        }
    }
    const T: usize = 16;
    let (ri, cj) = (rows / T * T, cols / T * T);
    for i0 in (0..ri).step_by(T) {
        for j0 in (0..cj).step_by(T) {
            let mut t = [[0.0f32; T]; T];
            for (ii, row) in t.iter_mut().enumerate() {
                row.copy_from_slice(&src[(i0 + ii) * sld + j0..][..T]);
            }
            for jj in 0..T {
                let out: &mut [f32; T] = (&mut dst[(j0 + jj) * dld + i0..][..T])
                    .try_into()
                    .expect("tile");
                for (ii, d) in out.iter_mut().enumerate() {
                    *d = fin.value(j0 + jj, t[ii][jj], *d);
                }
            }
        }
    }
    transpose_rest((src, sld), (dst, dld), (rows, cols), (ri, cj), fin);
}

/// The part of [`transpose`] its tiles (`ri` rows by `cj` columns) left, value by value.
#[inline(always)]
fn transpose_rest(
    (src, sld): (&[f32], usize),
    (dst, dld): (&mut [f32], usize),
    (rows, cols): (usize, usize),
    (ri, cj): (usize, usize),
    fin: Finish,
) {
    for j in 0..cols {
        let from = if j < cj { ri } else { 0 };
        for i in from..rows {
            let d = &mut dst[j * dld + i];
            *d = fin.value(j, src[i * sld + j], *d);
        }
    }
}

/// One 8 x 8 tile of [`transpose`]: the 8 source rows loaded, transposed in AVX registers
/// (unpack pairs of rows, shuffle pairs of pairs, swap 128-bit halves: 24 shuffles for 64
/// values, where the array tile took 64 scalar loads and stores), finished as [`Finish`] says
/// with vector adds (the same roundings as the scalar ones), stored as 8 destination rows.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn transpose8(
    v3: pulp::x86::V3,
    (src, sld): (&[f32], usize),
    (dst, dld): (&mut [f32], usize),
    j0: usize,
    fin: Finish,
) {
    use core::arch::x86_64::__m256;
    let avx = v3.avx;
    let r: [__m256; 8] = std::array::from_fn(|i| {
        let row: [f32; 8] = src[i * sld..][..8].try_into().expect("row");
        pulp::cast(row)
    });
    // Rows 2m and 2m + 1 interleaved: `t[2m]` their first, `t[2m + 1]` their second pair of
    // values in each 128-bit half.
    let t: [__m256; 8] = std::array::from_fn(|k| {
        let (a, b) = (r[k & !1], r[k | 1]);
        if k % 2 == 0 {
            avx._mm256_unpacklo_ps(a, b)
        } else {
            avx._mm256_unpackhi_ps(a, b)
        }
    });
    // Four rows' values of one column in each half: `u[k]` column `k % 4` (and `k % 4 + 4`)
    // of rows 0-3 for `k < 4`, of rows 4-7 else.
    let u: [__m256; 8] = std::array::from_fn(|k| {
        let base = (k / 4) * 4 + (k % 4) / 2;
        let (a, b) = (t[base], t[base + 2]);
        if k % 2 == 0 {
            avx._mm256_shuffle_ps::<0x44>(a, b)
        } else {
            avx._mm256_shuffle_ps::<0xEE>(a, b)
        }
    });
    let cols: [__m256; 8] = std::array::from_fn(|j| {
        let (a, b) = (u[j % 4], u[4 + j % 4]);
        if j < 4 {
            avx._mm256_permute2f128_ps::<0x20>(a, b)
        } else {
            avx._mm256_permute2f128_ps::<0x31>(a, b)
        }
    });
    for (jj, &col) in cols.iter().enumerate() {
        let out: &mut [f32; 8] = (&mut dst[jj * dld..][..8]).try_into().expect("row");
        let mut v = col;
        if let Some(b) = fin.bias(j0 + jj) {
            v = avx._mm256_add_ps(v, avx._mm256_set1_ps(b));
        }
        if fin.add {
            v = avx._mm256_add_ps(pulp::cast(*out), v);
        }
        *out = pulp::cast(v);
    }
}

/// `rows` planes of `cols` values (`src`, `sld` apart) into pixel-major `dst` (`cols` pixels,
/// `dld >= rows` apart, the values past `rows` zero): [`Grid::transpose_out`] on any source
/// stride, inside a caller's vector code.
#[inline(always)]
pub(crate) fn transpose_copy<S: Simd>(
    simd: S,
    src: (&[f32], usize),
    (dst, dld): (&mut [f32], usize),
    (rows, cols): (usize, usize),
) {
    let dst = &mut dst[..cols * dld];
    let copy = Finish {
        bias: None,
        add: false,
    };
    transpose(simd, src, (&mut *dst, dld), (rows, cols), copy);
    if rows < dld {
        for px in dst.chunks_exact_mut(dld) {
            px[rows..].fill(0.0);
        }
    }
}

/// [`Grid::transpose_out`].
struct TransposeOut<'a> {
    pixels: usize,
    src: &'a [f32],
    co: usize,
    co_pad: usize,
    dst: &'a mut [f32],
}

impl WithSimd for TransposeOut<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Self {
            pixels,
            src,
            co,
            co_pad,
            dst,
        } = self;
        // Planes `[co][pixels]` -> pixel-major `[pixels][co_pad]`.
        transpose_copy(simd, (src, pixels), (dst, co_pad), (co, pixels));
    }
}

/// `co` rounded up to [`CO_BLOCK`].
pub(crate) fn padded_channels(co: usize) -> usize {
    co.div_ceil(CO_BLOCK) * CO_BLOCK
}

/// Weights `[co][ci][taps]` in the forward kernel's layout `[co_pad / cb][ci][taps][cb]` for a
/// register block of `cb` channels ([`Grid::co_block`]), padding channels zero. With
/// `transpose_flip`, the kernel of the input gradient instead: output channel `ci`, input
/// channel `co`, taps reversed.
pub(crate) fn pack_weights(
    w: &[f32],
    co: usize,
    ci: usize,
    taps: usize,
    transpose_flip: bool,
    cb: usize,
) -> Vec<f32> {
    let (outs, ins) = if transpose_flip { (ci, co) } else { (co, ci) };
    let outs_pad = padded_channels(outs);
    let mut p = vec![0.0f32; outs_pad * ins * taps];
    // In the packed order (sequential writes; scattered ones took 0.1 ms for 64x64x9 on a Xeon,
    // on one thread while the other waited), the rows of `cb` split over the threads.
    let rows = ins * taps;
    p.par_chunks_mut(cb)
        .with_min_len(256)
        .enumerate()
        .for_each(|(r, dst)| {
            let (b, i, t) = (r / rows, (r % rows) / taps, r % taps);
            for (l, d) in dst.iter_mut().enumerate().take(outs.saturating_sub(b * cb)) {
                let o = b * cb + l;
                *d = if transpose_flip {
                    w[(i * ci + o) * taps + taps - 1 - t]
                } else {
                    w[(o * ci + i) * taps + t]
                };
            }
        });
    p
}

/// Which instruction set the kernels run on (tests pin each one in turn).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))] // only tests pin a level
pub(crate) enum Level {
    /// The best the CPU has (pulp's run-time dispatch).
    Auto,
    /// Portable scalar code, one lane (the reference of the vector paths).
    Scalar,
    /// AVX2 + FMA, 8 lanes.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512, 16 lanes.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Level {
    /// Whether this CPU can run the level.
    #[cfg(test)]
    pub(crate) fn available(self) -> bool {
        match self {
            Level::Auto | Level::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => pulp::x86::V3::try_new().is_some(),
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => pulp::x86::V4::try_new().is_some(),
        }
    }
}

thread_local! {
    static LEVEL: std::cell::Cell<Level> = const { std::cell::Cell::new(Level::Auto) };
}

/// Tests only: runs the kernels of this thread on `level` (falls back to auto when absent).
#[cfg(test)]
pub(crate) fn set_level(level: Level) {
    LEVEL.with(|l| l.set(level));
}

fn dispatch<Op: WithSimd>(op: Op) -> Op::Output {
    match LEVEL.with(|l| l.get()) {
        Level::Scalar => Simd::vectorize(pulp::Scalar, op),
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => match pulp::x86::V3::try_new() {
            Some(simd) => Simd::vectorize(simd, op),
            None => pulp::Arch::new().dispatch(op),
        },
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => match pulp::x86::V4::try_new() {
            Some(simd) => Simd::vectorize(simd, op),
            None => pulp::Arch::new().dispatch(op),
        },
        Level::Auto => pulp::Arch::new().dispatch(op),
    }
}

/// [`dispatch`] for a kernel, timed into the kernel profile when profiling is on
/// ([`crate::graph::take_kernel_profile`]; off, it costs one flag read): `shape` is
/// `[ci, co, positions, taps]` of one sample's product.
pub(crate) fn dispatch_timed<Op: WithSimd>(
    kernel: &'static str,
    shape: [usize; 4],
    op: Op,
) -> Op::Output {
    dispatch_timed_samples(kernel, shape, 1, op)
}

/// [`dispatch_timed`] of a kernel computing `samples` samples' products in one call (counted
/// as that many calls of `shape`).
pub(crate) fn dispatch_timed_samples<Op: WithSimd>(
    kernel: &'static str,
    shape: [usize; 4],
    samples: usize,
    op: Op,
) -> Op::Output {
    if !crate::graph::profiling() {
        return dispatch(op);
    }
    let t = std::time::Instant::now();
    let out = dispatch(op);
    crate::graph::record_kernel(kernel, shape, samples as u64, t.elapsed());
    out
}

/// Software prefetch into L2 of a few memory ranges, a few cache lines per step of a kernel's
/// loop: the next sample's operands (and the current one's output) arrive while a
/// compute-bound kernel runs, instead of stalling the copies around it, which wait on memory
/// for most of their time (a sample's 50 KB are past L2 by the time its turn comes).
pub(crate) struct Prefetcher<'a> {
    streams: &'a [&'a [f32]],
    /// Stream and line within it of the next request.
    stream: usize,
    line: usize,
    /// Requests per step.
    per_step: usize,
    #[cfg(target_arch = "x86_64")]
    sse: Option<pulp::core_arch::x86::Sse>,
}

/// f32 values per cache line.
const LINE: usize = 16;

impl<'a> Prefetcher<'a> {
    /// Requests for every line of `streams`, in order, spread over `steps` steps.
    pub(crate) fn new(streams: &'a [&'a [f32]], steps: usize) -> Self {
        let lines: usize = streams.iter().map(|s| s.len().div_ceil(LINE)).sum();
        Self {
            streams,
            stream: 0,
            line: 0,
            per_step: lines.div_ceil(steps.max(1)),
            #[cfg(target_arch = "x86_64")]
            sse: pulp::core_arch::x86::Sse::try_new().filter(|_| lines > 0),
        }
    }

    /// The first value of the next line to request, `None` once all are.
    #[inline(always)]
    fn next(&mut self) -> Option<&'a f32> {
        while let Some(s) = self.streams.get(self.stream) {
            if let Some(v) = s.get(self.line * LINE) {
                self.line += 1;
                return Some(v);
            }
            self.stream += 1;
            self.line = 0;
        }
        None
    }

    /// The requests of one step (a hint: no effect on any value).
    #[inline(always)]
    pub(crate) fn step(&mut self) {
        #[cfg(target_arch = "x86_64")]
        if let Some(sse) = self.sse {
            for _ in 0..self.per_step {
                let Some(v) = self.next() else { return };
                sse._mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>((v as *const f32).cast());
            }
        }
    }
}

#[inline(always)]
pub(crate) fn load<S: Simd>(s: &[f32]) -> S::f32s {
    bytemuck::pod_read_unaligned(bytemuck::cast_slice(&s[..S::F32_LANES]))
}

#[inline(always)]
pub(crate) fn store<S: Simd>(d: &mut [f32], v: S::f32s) {
    d[..S::F32_LANES].copy_from_slice(bytemuck::cast_slice(std::slice::from_ref(&v)));
}

/// `d.len() <= lanes` values of `s` (the rest zero): a full load when they fill a vector.
#[inline(always)]
fn get<S: Simd>(simd: S, s: &[f32]) -> S::f32s {
    if s.len() == S::F32_LANES {
        load::<S>(s)
    } else {
        simd.partial_load_f32s(s)
    }
}

/// The first `d.len() <= lanes` lanes of `v` into `d`.
#[inline(always)]
fn put<S: Simd>(simd: S, d: &mut [f32], v: S::f32s) {
    if d.len() == S::F32_LANES {
        store::<S>(d, v)
    } else {
        simd.partial_store_f32s(d, v)
    }
}

/// [`Grid::pad`].
struct Pad<'a> {
    grid: &'a Grid,
    src: &'a [f32],
    c: usize,
    dst: &'a mut [f32],
    /// Batch norm + ReLU coefficients per plane ([`Grid::pad_bn_relu`]).
    act: Option<&'a [Coef]>,
}

impl WithSimd for Pad<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Self {
            grid,
            src,
            c,
            dst,
            act,
        } = self;
        let (h, w, wp, plane) = (grid.h, grid.w, grid.wp, grid.plane);
        let lanes = S::F32_LANES;
        let src = &src[..c * h * w];
        let dst = &mut dst[..c * plane];
        // Each plane zeroed (one memset), then its rows in whole vectors: a row of at least a
        // vector ends on one that overlaps the one before it; a narrower row's vector has its
        // lanes past the row zero (they land on padding, or on the next row or plane, written
        // after it). Only the buffers' last values take partial loads and stores. Measured on a
        // Zen 4, one thread, in cache: 16 x 28x28 planes 11.3 -> 2.9 us, 64 x 7x7 6.7 -> 1.3 us
        // against a loop of zero vectors over the padding and partial loads at each row's end
        // (3-4x the cost of memset + memcpy of the same bytes). Zeroing only the padding (one
        // vector per gap, memsets above and below) measured no faster.
        let zero = simd.splat_f32s(0.0);
        let first = grid.ph * wp + grid.pw;
        // Lanes `< w` of a row narrower than a vector.
        let narrow = (w < lanes).then(|| {
            let idx: [f32; MAX_LANES] = std::array::from_fn(|l| l as f32);
            simd.less_than_f32s(load::<S>(&idx), simd.splat_f32s(w as f32))
        });
        for ch in 0..c {
            let base = ch * plane;
            let cf = act.map(|coef| {
                let (mu, k, b) = coef[ch];
                (simd.splat_f32s(mu), simd.splat_f32s(k), simd.splat_f32s(b))
            });
            dst[base..base + plane].fill(0.0);
            for r in 0..h {
                let (at, from) = (base + first + r * wp, (ch * h + r) * w);
                if let Some(mask) = narrow {
                    let v = bn_relu(simd, load_at(simd, src, from), cf, zero);
                    store_at(simd, dst, at, simd.select_f32s(mask, v, zero));
                } else {
                    let (srow, drow) = (&src[from..][..w], &mut dst[at..][..w]);
                    let last = w - lanes;
                    for j in (0..last).step_by(lanes) {
                        store::<S>(
                            &mut drow[j..],
                            bn_relu(simd, load::<S>(&srow[j..]), cf, zero),
                        );
                    }
                    let v = bn_relu(simd, load::<S>(&srow[last..]), cf, zero);
                    store::<S>(&mut drow[last..], v);
                }
            }
        }
    }
}

/// A training-mode batch norm + ReLU on `v` with a plane's `(mu, k, b)` ([`Grid::pad_bn_relu`]),
/// or `v` itself without them: `(x - mu)·k + b` unfused as batch norm computes it, then
/// `t > 0 ? t : 0`, which equals its `max(t, 0)` but for the sign of a zero (no product or sum
/// of the kernels depends on it: every sum starts from +0).
#[inline(always)]
fn bn_relu<S: Simd>(
    simd: S,
    v: S::f32s,
    coef: Option<(S::f32s, S::f32s, S::f32s)>,
    zero: S::f32s,
) -> S::f32s {
    match coef {
        None => v,
        Some((mu, k, b)) => {
            let t = simd.add_f32s(simd.mul_f32s(simd.sub_f32s(v, mu), k), b);
            simd.select_f32s(simd.greater_than_f32s(t, zero), t, zero)
        }
    }
}

/// `s[at..at + lanes]`, or what `s` has from `at` on (the rest zero).
#[inline(always)]
fn load_at<S: Simd>(simd: S, s: &[f32], at: usize) -> S::f32s {
    if at + S::F32_LANES <= s.len() {
        load::<S>(&s[at..])
    } else {
        simd.partial_load_f32s(&s[at..])
    }
}

/// `v` into `d[at..at + lanes]`, or as much of it as `d` has room for.
#[inline(always)]
fn store_at<S: Simd>(simd: S, d: &mut [f32], at: usize, v: S::f32s) {
    if at + S::F32_LANES <= d.len() {
        store::<S>(&mut d[at..], v)
    } else {
        simd.partial_store_f32s(&mut d[at..], v)
    }
}

/// [`Grid::extract`].
struct Extract<'a> {
    grid: &'a Grid,
    src: &'a [f32],
    c: usize,
    dst: &'a mut [f32],
    bias: Option<&'a [f32]>,
    /// Add to `dst` instead of overwriting it.
    add: bool,
}

impl WithSimd for Extract<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Self {
            grid,
            src,
            c,
            dst,
            bias,
            add,
        } = self;
        let (oh, ow, lanes) = (grid.oh, grid.ow, S::F32_LANES);
        for (i, (s, d)) in src
            .chunks_exact(grid.nq)
            .zip(dst.chunks_exact_mut(oh * ow))
            .take(c)
            .enumerate()
        {
            // A zero bias adds nothing (kept out so that -0.0 stays -0.0, as without bias).
            let b = bias
                .map(|b| b[i])
                .filter(|&b| b != 0.0)
                .map(|b| simd.splat_f32s(b));
            for (y, row) in d.chunks_exact_mut(ow).enumerate() {
                let from = &s[y * grid.wp..][..ow];
                for (dc, sc) in row.chunks_mut(lanes).zip(from.chunks(lanes)) {
                    let v = get(simd, sc);
                    let v = b.map_or(v, |b| simd.add_f32s(v, b));
                    let v = if add {
                        simd.add_f32s(get(simd, dc), v)
                    } else {
                        v
                    };
                    put(simd, dc, v);
                }
            }
        }
    }
}

/// The four stride-2 phases `[4][c][plane]` of `c` planes of `h x w` padded by `p`: phase
/// `2a + b` holds padded pixel `(2r + a, 2s + b)` at `(r, s)` of `grid` (the phases' common
/// grid), zero where that pixel is padding. Each input row goes once into its two phase rows
/// (plain pairs, compiled for the CPU's vectors, where the compiler vectorises the stride-2
/// access with shuffles).
pub(crate) fn split_phases(
    src: &[f32],
    c: usize,
    (h, w, p): (usize, usize, usize),
    grid: &Grid,
    dst: &mut [f32],
) {
    dispatch(SplitPhases {
        src,
        c,
        hwp: (h, w, p),
        grid,
        dst,
    })
}

struct SplitPhases<'a> {
    src: &'a [f32],
    c: usize,
    hwp: (usize, usize, usize),
    grid: &'a Grid,
    dst: &'a mut [f32],
}

impl WithSimd for SplitPhases<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) {
        let Self {
            src,
            c,
            hwp: (h, w, p),
            grid,
            dst,
        } = self;
        let (plane, wp) = (grid.plane, grid.wp);
        let dst = &mut dst[..4 * c * plane];
        dst.fill(0.0);
        // Input column x goes to column (x + p) / 2 of phase b = (x + p) % 2: the even columns
        // to phase p % 2 from column p / 2, the odd ones to the other from (p + 1) / 2.
        let (be, bo) = (p % 2, (p + 1) % 2);
        let (se, so) = (p / 2, p.div_ceil(2));
        let (ne, no) = (w.div_ceil(2), w / 2);
        for ch in 0..c {
            for (y, row) in src[ch * h * w..][..h * w].chunks_exact(w).enumerate() {
                let (a, r) = ((y + p) % 2, (y + p) / 2);
                let at = |b: usize| ((2 * a + b) * c + ch) * plane + r * wp;
                let (ae, ao) = (at(be) + se, at(bo) + so);
                // The two phase rows, disjoint (different planes).
                let (even, odd) = if ae < ao {
                    let (lo, hi) = dst.split_at_mut(ao);
                    (&mut lo[ae..][..ne], &mut hi[..no])
                } else {
                    let (lo, hi) = dst.split_at_mut(ae);
                    (&mut hi[..ne], &mut lo[ao..][..no])
                };
                // Plain pairs: the compiler vectorises the stride-2 reads with shuffles.
                for ((pair, e), o) in row.chunks_exact(2).zip(even.iter_mut()).zip(odd) {
                    *e = pair[0];
                    *o = pair[1];
                }
                if w % 2 == 1 {
                    even[ne - 1] = row[w - 1];
                }
            }
        }
    }
}

/// The inverse of [`split_phases`] without the padding: `c` planes of `h x w` out of the four
/// phases' planes (`phases[2a + b]`, `c` planes of `nq` values each, rows `wp` apart), written
/// or, with `add`, added to `dst`; each row out of its two phase rows at once.
#[allow(clippy::too_many_arguments)]
pub(crate) fn merge_phases(
    phases: [&[f32]; 4],
    nq: usize,
    wp: usize,
    c: usize,
    (h, w, p): (usize, usize, usize),
    dst: &mut [f32],
    add: bool,
) {
    dispatch(MergePhases {
        phases,
        nq,
        wp,
        c,
        hwp: (h, w, p),
        dst,
        add,
    })
}

/// The first row (or column) of phase `a` (0 or 1) that lands inside an input padded by `p`
/// (input row `y` is phase `(y + p) % 2`'s row `(y + p) / 2`; the phase's first input row is
/// `(a - p) mod 2`).
pub(crate) fn phase_origin(a: usize, p: usize) -> usize {
    ((a + 2 - p % 2) % 2 + p) / 2
}

/// [`merge_phases`] for pixel-major phase products (`phases[2a + b]` is `[(h/2)·(w/2)][c_pad]`,
/// [`forward_rows`]' layout, holding exactly the phase's pixels: input pixel `(y, x)` is phase
/// `((y + p) % 2, (x + p) % 2)`'s pixel `((y + p) / 2 - r0, (x + p) / 2 - s0)`, where `r0`,
/// `s0` are the first phase row and column that land inside the input, [`phase_origin`]). `h`
/// and `w` even.
/// Written or, with `add`, added to `dst` (`c` planes of `h x w`).
pub(crate) fn merge_phase_pixels(
    phases: [&[f32]; 4],
    (c, c_pad): (usize, usize),
    (h, w, p): (usize, usize, usize),
    dst: &mut [f32],
    add: bool,
) {
    assert!(h.is_multiple_of(2) && w.is_multiple_of(2), "even planes");
    let (hh, hw) = (h / 2, w / 2);
    for (a, b) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
        let ph = phases[2 * a + b];
        assert!(ph.len() >= hh * hw * c_pad, "phase too short");
        let (r0, s0) = (phase_origin(a, p), phase_origin(b, p));
        for (k, px) in ph.chunks_exact(c_pad).take(hh * hw).enumerate() {
            // Phase pixel (r, s) is input pixel (2 (r + r0) + a - p, 2 (s + s0) + b - p).
            let (r, s) = (k / hw + r0, k % hw + s0);
            let (y, x) = (2 * r + a - p, 2 * s + b - p);
            let at = y * w + x;
            for (plane, &v) in dst.chunks_exact_mut(h * w).zip(&px[..c]) {
                let d = &mut plane[at];
                *d = if add { *d + v } else { v };
            }
        }
    }
}

struct MergePhases<'a> {
    phases: [&'a [f32]; 4],
    nq: usize,
    wp: usize,
    c: usize,
    hwp: (usize, usize, usize),
    dst: &'a mut [f32],
    add: bool,
}

impl WithSimd for MergePhases<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) {
        let Self {
            phases,
            nq,
            wp,
            c,
            hwp: (h, w, p),
            dst,
            add,
        } = self;
        let (be, bo) = (p % 2, (p + 1) % 2);
        let (se, so) = (p / 2, p.div_ceil(2));
        let (ne, no) = (w.div_ceil(2), w / 2);
        for (ch, plane) in dst.chunks_exact_mut(h * w).take(c).enumerate() {
            for (y, row) in plane.chunks_exact_mut(w).enumerate() {
                let (a, r) = ((y + p) % 2, (y + p) / 2);
                let from = |b: usize, s0: usize, n: usize| {
                    &phases[2 * a + b][ch * nq + r * wp + s0..][..n]
                };
                let (ev, od) = (from(be, se, ne), from(bo, so, no));
                // Plain pairs: the compiler vectorises the stride-2 writes with shuffles.
                let pairs = row.chunks_exact_mut(2).zip(ev).zip(od);
                if add {
                    for ((pair, &e), &o) in pairs {
                        pair[0] += e;
                        pair[1] += o;
                    }
                } else {
                    for ((pair, &e), &o) in pairs {
                        pair[0] = e;
                        pair[1] = o;
                    }
                }
                if w % 2 == 1 {
                    let (d, v) = (&mut row[w - 1], ev[ne - 1]);
                    *d = if add { *d + v } else { v };
                }
            }
        }
    }
}

struct Forward<'a> {
    /// Add to `out` instead of overwriting it.
    accumulate: bool,
    x: &'a [f32],
    plane: usize,
    ci: usize,
    offs: &'a [usize],
    nq: usize,
    /// Grid positions per block of the AVX-512 kernel ([`Grid::tile`]).
    tile: usize,
    /// Channels per block of the packed weights ([`Grid::co_block`]).
    pack: usize,
    w: &'a [f32],
    out: &'a mut [f32],
    /// Memory to pull into cache while computing (the next sample's operands).
    prefetch: &'a [&'a [f32]],
}

impl WithSimd for Forward<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        // Register blocks, channels x vectors of positions: AVX-512 (32 registers) 8 x 3,
        // 8 x 2 or 16 x 1 by the grid's tile (see [`Grid::tile`]); AVX2 (16 registers) 4 x 3 on
        // a 48-position tile (12 accumulators, 3 input vectors and a broadcast: 7 loads per 12
        // multiply-adds), else 4 x 2. AVX-512's blocks spill there: measured on a Zen 3, one
        // thread, in cache, 16 channels at 28x28 38 -> 73 GFLOP/s, 32 at 14x14 44 -> 57.
        match (S::F32_LANES, self.tile) {
            (8, 48) => forward_block::<S, 4, 3>(simd, self),
            (8, _) => forward_block::<S, 4, 2>(simd, self),
            (_, 48) => forward_block::<S, 8, 3>(simd, self),
            (_, 32) => forward_block::<S, 8, 2>(simd, self),
            _ => forward_block::<S, 16, 1>(simd, self),
        }
    }
}

#[inline(always)]
fn forward_block<S: Simd, const CB: usize, const QB: usize>(simd: S, op: Forward) {
    let lanes = S::F32_LANES;
    let Forward {
        accumulate,
        x,
        plane,
        ci,
        offs,
        nq,
        tile: _,
        pack,
        w,
        out,
        prefetch,
    } = op;
    debug_assert!(pack.is_multiple_of(CB) && nq.is_multiple_of(lanes * QB));
    let taps = offs.len();
    let block = ci * taps * pack;
    // The prefetches spread over the steps of the input-channel loop.
    let steps = (out.len() / (pack * nq)) * (pack / CB) * nq.div_ceil(lanes * QB) * ci;
    let mut pf = Prefetcher::new(prefetch, steps);
    for (wb, ob) in w.chunks_exact(block).zip(out.chunks_exact_mut(pack * nq)) {
        for q0 in (0..nq).step_by(lanes * QB) {
            // Sub-blocks of the packed channels one after the other on the same positions
            // (their inputs still in L1).
            for sub in (0..pack).step_by(CB) {
                let mut acc = [[simd.splat_f32s(0.0); QB]; CB];
                if accumulate {
                    for (o, a) in acc.iter_mut().enumerate() {
                        for (j, av) in a.iter_mut().enumerate() {
                            *av = load::<S>(&ob[(sub + o) * nq + q0 + j * lanes..]);
                        }
                    }
                }
                for (i, wc) in wb.chunks_exact(taps * pack).enumerate() {
                    pf.step();
                    let xp = &x[i * plane + q0..];
                    for (&off, wt) in offs.iter().zip(wc.chunks_exact(pack)) {
                        // One bounds check per tap (not per vector).
                        let xt = &xp[off..][..QB * lanes];
                        let xs: [S::f32s; QB] =
                            std::array::from_fn(|j| load::<S>(&xt[j * lanes..]));
                        let wt: &[f32; CB] = wt[sub..][..CB].try_into().expect("block");
                        for (a, &wv) in acc.iter_mut().zip(wt) {
                            let bw = simd.splat_f32s(wv);
                            for (av, &xv) in a.iter_mut().zip(&xs) {
                                *av = simd.mul_add_f32s(bw, xv, *av);
                            }
                        }
                    }
                }
                for (o, a) in acc.iter().enumerate() {
                    for (j, &av) in a.iter().enumerate() {
                        store::<S>(&mut ob[(sub + o) * nq + q0 + j * lanes..], av);
                    }
                }
            }
        }
    }
}

/// `out[o][q] = Σ_{i,t} w[o][i][t] · x[i][q + offs[t]]` for one sample on `grid`'s register
/// block: `x` holds `ci` padded planes of length `plane`, `w` is [`pack_weights`]' layout for
/// [`Grid::co_block`], `out` holds the padded output channels as planes of [`Grid::nq`].
#[cfg(test)]
pub(crate) fn forward(
    grid: &Grid,
    x: &[f32],
    plane: usize,
    ci: usize,
    offs: &[usize],
    w: &[f32],
    out: &mut [f32],
) {
    forward_into(grid, false, x, plane, ci, offs, w, out, &[])
}

/// [`forward`], or with `accumulate` its products added to what `out` holds (each sum starts
/// from `out`'s value, then the products in [`forward`]'s order); while it computes, every
/// cache line of `prefetch` is requested into L2 (see [`Prefetcher`]). An offset may reach
/// past its plane into later ones (the stride-2 path: one set of `ci` planes per phase, each
/// tap's offset into its phase's set).
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_into(
    grid: &Grid,
    accumulate: bool,
    x: &[f32],
    plane: usize,
    ci: usize,
    offs: &[usize],
    w: &[f32],
    out: &mut [f32],
    prefetch: &[&[f32]],
) {
    let nq = grid.nq;
    let reach = offs.iter().max().map_or(0, |m| m + nq);
    assert!(
        x.len() >= (ci.max(1) - 1) * plane + reach,
        "input planes too short"
    );
    debug_assert!(nq.is_multiple_of(grid.tile));
    let co = w.len() / (offs.len() * ci).max(1);
    dispatch_timed(
        "grid",
        [ci, co, nq, offs.len()],
        Forward {
            accumulate,
            x,
            plane,
            ci,
            offs,
            nq,
            tile: grid.tile,
            pack: grid.co_block(),
            w,
            out,
            prefetch,
        },
    )
}

/// Output pixels per register block of [`ForwardRows`]: a ResNet 7x7 row, or half a 14x14 one.
pub(crate) const ROW_BLOCK: usize = 7;

/// Output pixels per row of [`RowsBlock::run3`]'s two-row register block.
const PAIR_BLOCK: usize = 4;

/// The forward product vectorised along the output channels instead of the grid, for small
/// planes: a register block is [`ROW_BLOCK`] consecutive output pixels of a row by one or two
/// vectors of channels, each input value broadcast from the padded plane (no thrown-away grid
/// positions: a 7x7 plane's grid computes 64 positions for 49 pixels), each tap's weights
/// loaded as vectors from a block of `cb` channels ([`rows_block`]) that stays in L1 for 16
/// input channels at a time. `out` is pixel-major, `[oh·ow][co_pad]`. Every output's sum runs
/// over the input channels, then the taps, in [`Forward`]'s order: the same bits (tested).
/// Measured on a Xeon, one thread, in cache: 64 channels at 7x7 167 GFLOP/s against 130 on the
/// grid, 32 at 14x14 171 against 147; 16 at 28x28 113 against 158 (so the grid keeps those).
struct ForwardRows<'a> {
    grid: &'a Grid,
    x: &'a [f32],
    plane: usize,
    offs: &'a [usize],
    /// `[co_pad / cb][ci][taps][cb]` ([`pack_weights`] with a block of `cb` channels).
    w: &'a [f32],
    cb: usize,
    co_pad: usize,
    out: &'a mut [f32],
    prefetch: &'a [&'a [f32]],
}

impl WithSimd for ForwardRows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        // Two vectors of channels where the block has them (14 accumulators, 2 weight vectors
        // and a broadcast of AVX-512's 32 registers), else one (AVX2's 16).
        match (S::F32_LANES, self.cb) {
            (MAX_LANES, 32) => rows::<S, 2, 32>(simd, self),
            (_, 32) => rows::<S, 1, 32>(simd, self),
            _ => rows::<S, 1, CO_BLOCK>(simd, self),
        }
    }
}

/// [`ForwardRows`] with register blocks of one row segment of [`ROW_BLOCK`] pixels by `CV`
/// vectors of channels, weights in blocks of `CB` channels. (Two segments per block, 14
/// accumulators on AVX2, spilled: 57 -> 39 GFLOP/s on a Zen 3.)
#[inline(always)]
fn rows<S: Simd, const CV: usize, const CB: usize>(simd: S, op: ForwardRows) {
    let ForwardRows {
        grid,
        x,
        plane,
        offs,
        w,
        cb: _,
        co_pad,
        out,
        prefetch,
    } = op;
    // Input channels per pass: their weights for one sub-block of channels (16 x 9 x 32 x 4
    // bytes = 18 KB) stay in L1 across the plane's pixel blocks, whose sums wait in `out`
    // between passes (the same products in the same order).
    const IC: usize = 16;
    let lanes = S::F32_LANES;
    let (wp, oh, ow) = (grid.wp, grid.oh, grid.ow);
    let taps = offs.len();
    let width = CV * lanes;
    let ci = w.len() / (taps * co_pad);
    let segs = ow / ROW_BLOCK;
    // The three-tap loop for one vector of channels only: with two (AVX-512's block) its
    // unrolled body depends on the compiler's unrolling (on AVX2 the same source measured 80
    // GFLOP/s in one build and 12 in another, its accumulators spilled), so that block keeps
    // the per-tap loop measured on the Xeon.
    let three = CV == 1 && three_by_three(offs, wp);
    // Two rows of [`PAIR_BLOCK`] pixels where they tile the plane (see [`RowsBlock::run3`]).
    let pair = three && oh.is_multiple_of(2) && ow.is_multiple_of(PAIR_BLOCK);
    let blocks = if pair {
        (oh / 2) * (ow / PAIR_BLOCK)
    } else {
        oh * segs
    };
    let steps = (co_pad / width) * ci.div_ceil(IC) * blocks;
    let mut pf = Prefetcher::new(prefetch, steps);
    for (c0, wb) in (0..co_pad).step_by(CB).zip(w.chunks_exact(ci * taps * CB)) {
        for sub in (0..CB).step_by(width) {
            for (i0, wc) in (0..ci).step_by(IC).zip(wb.chunks(IC * taps * CB)) {
                let block = RowsBlock {
                    x,
                    plane,
                    offs,
                    wp,
                    co_pad,
                    c0: c0 + sub,
                    i0,
                    wc,
                    wsub: sub,
                    cb: CB,
                };
                if pair {
                    for oy in (0..oh).step_by(2) {
                        for s in 0..ow / PAIR_BLOCK {
                            pf.step();
                            let q0 = oy * wp + s * PAIR_BLOCK;
                            let at = (oy * ow + s * PAIR_BLOCK) * co_pad;
                            block.run3::<S, 2, PAIR_BLOCK>(simd, q0, &mut out[at..], ow * co_pad);
                        }
                    }
                    continue;
                }
                for oy in 0..oh {
                    for s in 0..segs {
                        pf.step();
                        let q0 = oy * wp + s * ROW_BLOCK;
                        let ob = &mut out[(oy * ow + s * ROW_BLOCK) * co_pad..];
                        if three {
                            block.run3::<S, 1, ROW_BLOCK>(simd, q0, ob, 0);
                        } else {
                            block.run::<S, CV>(simd, q0, ob);
                        }
                    }
                }
            }
        }
    }
}

/// Whether `offs` are a 3x3 kernel's taps on a stride-1 grid of rows `wp` long (in order).
fn three_by_three(offs: &[usize], wp: usize) -> bool {
    offs.len() == 9
        && offs
            .iter()
            .enumerate()
            .all(|(t, &o)| o == (t / 3) * wp + t % 3)
}

/// One pass of [`rows`] over a block of input channels, for the register blocks of one vector
/// group of output channels.
struct RowsBlock<'a> {
    x: &'a [f32],
    plane: usize,
    offs: &'a [usize],
    wp: usize,
    co_pad: usize,
    /// First output channel of the vectors.
    c0: usize,
    /// First input channel of the pass, and its weights (`[ic][taps][cb]`).
    i0: usize,
    wc: &'a [f32],
    /// Offset of the vectors within a weight block of `cb` channels.
    wsub: usize,
    cb: usize,
}

impl RowsBlock<'_> {
    /// The segment at grid position `q0` into `ob` (its pixels, pixel-major): its sums so far
    /// loaded (after the first pass), the pass's products added, stored.
    #[inline(always)]
    fn run<S: Simd, const CV: usize>(&self, simd: S, q0: usize, ob: &mut [f32]) {
        const PB: usize = ROW_BLOCK;
        let lanes = S::F32_LANES;
        let taps = self.offs.len();
        let width = CV * lanes;
        let mut acc = self.load::<S, CV>(simd, ob);
        for (i, wi) in (self.i0..).zip(self.wc.chunks_exact(taps * self.cb)) {
            let xi = &self.x[i * self.plane + q0..];
            for (&off, wt) in self.offs.iter().zip(wi.chunks_exact(self.cb)) {
                let wt = &wt[self.wsub..][..width];
                let wv: [S::f32s; CV] = std::array::from_fn(|v| load::<S>(&wt[v * lanes..]));
                let xs: &[f32; PB] = xi[off..][..PB].try_into().expect("block");
                for (a, &xv) in acc.iter_mut().zip(xs) {
                    let b = simd.splat_f32s(xv);
                    for (av, &wv) in a.iter_mut().zip(&wv) {
                        *av = simd.mul_add_f32s(wv, b, *av);
                    }
                }
            }
        }
        self.store::<S, CV>(&acc, ob);
    }

    /// [`RowsBlock::run`] for a 3x3 kernel on a stride-1 grid, one vector of channels, on a
    /// block of `R` rows of `P` pixels (row `r` at `r·next` in `ob`): per kernel row, each of
    /// the `P + 2` input values of a block row is broadcast once and meets the weights of the
    /// (up to) three taps that read it, `acc[m - kx] += w[kx] · x[m]`: three multiply-adds per
    /// broadcast instead of one, the same sums in the same order (each gets `m = p, p + 1,
    /// p + 2` for taps `kx = 0, 1, 2`). Measured on a Zen 3, one thread, in cache, one row of 7:
    /// 32 channels at 14x14 58 -> 73 GFLOP/s, 64 at 7x7 61 -> 73. Two rows of 4 (8
    /// accumulators instead of 7, which the 4-cycle latency of the multiply-adds on two pipes
    /// needs to keep both busy: each sum's 9 taps per input channel run in sequence) took 10 %
    /// less time on a Zen 4's 16-channel 28x28 layers.
    #[inline(always)]
    fn run3<S: Simd, const R: usize, const P: usize>(
        &self,
        simd: S,
        q0: usize,
        ob: &mut [f32],
        next: usize,
    ) {
        let lanes = S::F32_LANES;
        let cb = self.cb;
        let at = |r: usize, p: usize| r * next + p * self.co_pad + self.c0;
        let zero = simd.splat_f32s(0.0);
        let mut acc = [[zero; P]; R];
        if self.i0 > 0 {
            for (r, a) in acc.iter_mut().enumerate() {
                for (p, av) in a.iter_mut().enumerate() {
                    *av = load::<S>(&ob[at(r, p)..]);
                }
            }
        }
        for (i, wi) in (self.i0..).zip(self.wc.chunks_exact(9 * cb)) {
            let xi = &self.x[i * self.plane + q0..];
            for (ky, wr) in wi.chunks_exact(3 * cb).enumerate() {
                let wv: [S::f32s; 3] =
                    std::array::from_fn(|kx| load::<S>(&wr[kx * cb + self.wsub..][..lanes]));
                for (r, a) in acc.iter_mut().enumerate() {
                    let xs = &xi[(ky + r) * self.wp..][..P + 2];
                    for (m, &xv) in xs.iter().enumerate() {
                        let b = simd.splat_f32s(xv);
                        for (kx, &w) in wv.iter().enumerate() {
                            if m >= kx && m - kx < P {
                                a[m - kx] = simd.mul_add_f32s(w, b, a[m - kx]);
                            }
                        }
                    }
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (p, &av) in a.iter().enumerate() {
                store::<S>(&mut ob[at(r, p)..], av);
            }
        }
    }

    /// The segment's sums so far: zero on the first pass, else from `ob`.
    #[inline(always)]
    fn load<S: Simd, const CV: usize>(&self, simd: S, ob: &[f32]) -> [[S::f32s; CV]; ROW_BLOCK] {
        let lanes = S::F32_LANES;
        let mut acc = [[simd.splat_f32s(0.0); CV]; ROW_BLOCK];
        if self.i0 > 0 {
            for (a, px) in acc.iter_mut().zip(ob.chunks_exact(self.co_pad)) {
                for (v, av) in a.iter_mut().enumerate() {
                    *av = load::<S>(&px[self.c0 + v * lanes..]);
                }
            }
        }
        acc
    }

    #[inline(always)]
    fn store<S: Simd, const CV: usize>(&self, acc: &[[S::f32s; CV]; ROW_BLOCK], ob: &mut [f32]) {
        let lanes = S::F32_LANES;
        for (a, px) in acc.iter().zip(ob.chunks_exact_mut(self.co_pad)) {
            for (v, &av) in a.iter().enumerate() {
                store::<S>(&mut px[self.c0 + v * lanes..], av);
            }
        }
    }
}

/// Whether [`forward_rows`] computes `grid`'s product faster than the grid kernel (measured):
/// rows of one or two [`ROW_BLOCK`]s (ResNet's 7x7 and 14x14 planes) and at least 32 channels;
/// on AVX2 rows of one to four blocks (ResNet's 28x28 planes too), any channel count and
/// kernel. There the grid kernel's shifted loads (one in two crosses a cache line) hold it back
/// and vary from call to call: measured on a Zen 3, one thread, in cache, median of 1000-16000
/// calls, grid -> rows GFLOP/s: 3x3, 16 channels at 28x28 41-71 -> 69-73, 14x14 55 -> 74, 7x7
/// 48 -> 72; 32 at 28x28 62 -> 69, 14x14 33 -> 67; a stride-2 input gradient's 2x2 and 1x1
/// phase kernels, 32 -> 16 channels at 14x14, 32 -> 36 and 13 -> 22; 5x5, 1 and 6 -> 16
/// channels at 28x28, 31 -> 38 and 36 -> 44. On AVX-512 the grid keeps the 16-channel layers
/// (Xeon: 158 against 113).
pub(crate) fn rows_fit(grid: &Grid, co_pad: usize) -> bool {
    let sevens = |blocks: usize| {
        grid.ow.is_multiple_of(ROW_BLOCK) && (ROW_BLOCK..=blocks * ROW_BLOCK).contains(&grid.ow)
    };
    (sevens(2) && co_pad.is_multiple_of(2 * CO_BLOCK)) || (sevens(4) && dispatch(Lanes) == 8)
}

/// The f32 lanes of the vectors [`dispatch`] runs the kernels on (this thread's level).
pub(crate) struct Lanes;

impl WithSimd for Lanes {
    type Output = usize;

    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) -> usize {
        S::F32_LANES
    }
}

/// The channel block of [`forward_rows`]' weights for `co_pad` channels: 32 where they divide
/// them, else 16.
pub(crate) fn rows_block(co_pad: usize) -> usize {
    if co_pad.is_multiple_of(2 * CO_BLOCK) {
        2 * CO_BLOCK
    } else {
        CO_BLOCK
    }
}

/// [`forward_into`] (not accumulating) vectorised along the output channels ([`ForwardRows`])
/// into the pixel-major `out` (`[oh·ow][co_pad]`): `x`, `plane`, `offs` as there, `w` from
/// [`pack_weights`] with `cb = rows_block(co_pad)`, rows of `grid` a multiple of
/// [`ROW_BLOCK`]. `prefetch` as for [`forward_into`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_rows(
    grid: &Grid,
    x: &[f32],
    plane: usize,
    ci: usize,
    offs: &[usize],
    w: &[f32],
    co_pad: usize,
    out: &mut [f32],
    prefetch: &[&[f32]],
) {
    assert!(
        grid.ow.is_multiple_of(ROW_BLOCK) && co_pad.is_multiple_of(CO_BLOCK),
        "rows of {} pixels, {co_pad} channels",
        grid.ow
    );
    assert_eq!(w.len(), ci * offs.len() * co_pad, "weights");
    // The last block reads up to its last pixel's largest offset.
    let reach = offs
        .iter()
        .max()
        .map_or(0, |m| m + (grid.oh - 1) * grid.wp + grid.ow);
    assert!(
        x.len() >= (ci.max(1) - 1) * plane + reach,
        "input planes too short"
    );
    assert!(out.len() >= grid.oh * grid.ow * co_pad, "output too short");
    let shape = [ci, co_pad, grid.oh * grid.ow, offs.len()];
    dispatch_timed(
        "rows",
        shape,
        ForwardRows {
            grid,
            x,
            plane,
            offs,
            w,
            cb: rows_block(co_pad),
            co_pad,
            out,
            prefetch,
        },
    )
}

struct WeightGrad<'a, const R: usize, const V: usize> {
    x: &'a [f32],
    xstride: usize,
    grid: &'a Grid,
    ci: usize,
    offs: &'a [usize],
    gyt: &'a [f32],
    co_pad: usize,
    samples: usize,
    accumulate: bool,
    part: &'a mut [f32],
    /// Memory to pull into cache while computing (see [`Prefetcher`]).
    prefetch: &'a [&'a [f32]],
}

impl<const R: usize, const V: usize> WithSimd for WeightGrad<'_, R, V> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let lanes = S::F32_LANES;
        let Self {
            x,
            xstride,
            grid,
            ci,
            offs,
            gyt,
            co_pad,
            samples,
            accumulate,
            part,
            prefetch,
        } = self;
        let taps = offs.len();
        let kt = ci * taps;
        let steps = samples * co_pad.div_ceil(V * lanes) * kt.div_ceil(R) * grid.oh;
        let mut pf = Prefetcher::new(prefetch, steps);
        let width = V * lanes;
        let (plane, ow, wp) = (grid.plane, grid.ow, grid.wp);
        // Per sample: `ci` planes, or more when an offset reaches into later ones.
        let (xs, gs) = (xstride.max(ci * plane), grid.oh * ow * co_pad);
        // Sample by sample: one sample's output gradient (16-53 KB on ResNet-20) stays in L1
        // across all the register blocks; the blocks' sums wait between samples in `part`
        // (`[kt][co_pad]`): the same additions in the same order as summing every sample in
        // registers (and as one call per sample, each accumulating).
        let part = &mut part[..kt * co_pad];
        for s in 0..samples {
            let (x, g) = (&x[s * xstride..][..xs], &gyt[s * gs..][..gs]);
            for c0 in (0..co_pad).step_by(width) {
                for k0 in (0..kt).step_by(R) {
                    let rows = R.min(kt - k0);
                    // Rows past the end repeat the last one (computed, not stored).
                    let xo: [usize; R] = std::array::from_fn(|r| {
                        let k = (k0 + r).min(kt - 1);
                        (k / taps) * plane + offs[k % taps]
                    });
                    let mut acc = [[simd.splat_f32s(0.0); V]; R];
                    if s > 0 || accumulate {
                        for (r, a) in acc.iter_mut().enumerate().take(rows) {
                            let p = &part[(k0 + r) * co_pad + c0..][..width];
                            for (v, av) in a.iter_mut().enumerate() {
                                *av = load::<S>(&p[v * lanes..]);
                            }
                        }
                    }
                    // The valid output pixels only, row by row (the grid's thrown-away columns
                    // would add zero products); rows of 7 and 14 pixels (ResNet's small planes)
                    // on fixed-length loops (no bounds checks, no loop overhead).
                    for (oy, grow) in g.chunks_exact(ow * co_pad).enumerate() {
                        pf.step();
                        let xr: [&[f32]; R] = std::array::from_fn(|r| &x[xo[r] + oy * wp..][..ow]);
                        match ow {
                            7 => dw_row::<S, R, V, 7>(simd, &mut acc, &xr, grow, c0, co_pad),
                            14 => dw_row::<S, R, V, 14>(simd, &mut acc, &xr, grow, c0, co_pad),
                            _ => {
                                for (ox, gr) in (0..ow).zip(grow.chunks_exact(co_pad)) {
                                    dw_pixel(simd, &mut acc, &xr, ox, &gr[c0..][..width]);
                                }
                            }
                        }
                    }
                    for (r, a) in acc.iter().enumerate().take(rows) {
                        let p = &mut part[(k0 + r) * co_pad + c0..][..width];
                        for (v, av) in a.iter().enumerate() {
                            store::<S>(&mut p[v * lanes..], *av);
                        }
                    }
                }
            }
        }
    }
}

/// One output pixel `ox` of [`WeightGrad`]: `acc[r] += x_r[ox] · g` (`g` the pixel's
/// gradient vectors).
#[inline(always)]
fn dw_pixel<S: Simd, const R: usize, const V: usize>(
    simd: S,
    acc: &mut [[S::f32s; V]; R],
    xr: &[&[f32]; R],
    ox: usize,
    g: &[f32],
) {
    let lanes = S::F32_LANES;
    let gv: [S::f32s; V] = std::array::from_fn(|v| load::<S>(&g[v * lanes..]));
    for (a, xrow) in acc.iter_mut().zip(xr) {
        let xb = simd.splat_f32s(xrow[ox]);
        for (av, &g) in a.iter_mut().zip(&gv) {
            *av = simd.mul_add_f32s(xb, g, *av);
        }
    }
}

/// A row of `OW` pixels of [`WeightGrad`] on a loop of fixed length.
#[inline(always)]
fn dw_row<S: Simd, const R: usize, const V: usize, const OW: usize>(
    simd: S,
    acc: &mut [[S::f32s; V]; R],
    xr: &[&[f32]; R],
    grow: &[f32],
    c0: usize,
    co_pad: usize,
) {
    let width = V * S::F32_LANES;
    // Rows of a known length `OW`: `ox < OW` needs no bounds check on them.
    let xr: [&[f32; OW]; R] = std::array::from_fn(|r| xr[r].try_into().expect("row"));
    let xr: [&[f32]; R] = xr.map(|r| &r[..]);
    for ox in 0..OW {
        dw_pixel(simd, acc, &xr, ox, &grow[ox * co_pad + c0..][..width]);
    }
}

/// [`WeightGrad`] for a 3x3 kernel on a stride-1 grid (`offs` = [`Grid::offsets`]), `I` input
/// channels by `V` vectors of output channels: each input value is broadcast once and meets the
/// output gradient of the three pixels whose taps read it (`x[i][(oy + ky)·wp + j]` is tap
/// `(ky, kx)` of pixel `ox = j - kx`), the last three pixels' gradient vectors kept in
/// registers: 3·I broadcasts and `V` loads per 9·I·V multiply-adds instead of one broadcast
/// each. Every sum gets the same products in the same order (pixels in row-major order) as
/// [`WeightGrad`]: the same bits (tested).
struct WeightGrad3<'a, const I: usize, const V: usize>(WeightGrad<'a, 1, 1>);

impl<const I: usize, const V: usize> WithSimd for WeightGrad3<'_, I, V> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let lanes = S::F32_LANES;
        let WeightGrad {
            x,
            xstride,
            grid,
            ci,
            offs: _,
            gyt,
            co_pad,
            samples,
            accumulate,
            part,
            prefetch,
        } = self.0;
        let width = V * lanes;
        let (plane, ow, wp, oh) = (grid.plane, grid.ow, grid.wp, grid.oh);
        debug_assert_eq!(wp, ow + 2);
        let (xs, gs) = (ci * plane, oh * ow * co_pad);
        let steps = samples * co_pad.div_ceil(width) * ci.div_ceil(I) * oh;
        let mut pf = Prefetcher::new(prefetch, steps);
        let part = &mut part[..ci * 9 * co_pad];
        let zero = simd.splat_f32s(0.0);
        for s in 0..samples {
            let (x, g) = (&x[s * xstride..][..xs], &gyt[s * gs..][..gs]);
            for c0 in (0..co_pad).step_by(width) {
                for i0 in (0..ci).step_by(I) {
                    let chans = I.min(ci - i0);
                    let mut acc = [[[zero; V]; 9]; I];
                    if s > 0 || accumulate {
                        for (ii, a) in acc.iter_mut().enumerate().take(chans) {
                            for (t, at) in a.iter_mut().enumerate() {
                                let p = &part[((i0 + ii) * 9 + t) * co_pad + c0..][..width];
                                for (v, av) in at.iter_mut().enumerate() {
                                    *av = load::<S>(&p[v * lanes..]);
                                }
                            }
                        }
                    }
                    for oy in 0..oh {
                        pf.step();
                        let grow = &g[oy * ow * co_pad..][..ow * co_pad];
                        // Channels past the end repeat the last one (computed, not stored).
                        let xr: [[&[f32]; 3]; I] = std::array::from_fn(|ii| {
                            let i = (i0 + ii).min(ci - 1);
                            std::array::from_fn(|ky| &x[i * plane + (oy + ky) * wp..][..wp])
                        });
                        let gv = |ox: usize| -> [S::f32s; V] {
                            let p = &grow[ox * co_pad + c0..][..width];
                            std::array::from_fn(|v| load::<S>(&p[v * lanes..]))
                        };
                        // Columns 0 and 1 (fewer pixels read them), the middle ones (all three
                        // taps), the last two.
                        let none = [zero; V];
                        let mut gp = [gv(0), none, none];
                        column::<S, I, V, 0, 1>(simd, &mut acc, &xr, 0, &gp);
                        if ow > 1 {
                            gp = [gv(1), gp[0], none];
                            column::<S, I, V, 0, 2>(simd, &mut acc, &xr, 1, &gp);
                            for j in 2..ow {
                                gp = [gv(j), gp[0], gp[1]];
                                column::<S, I, V, 0, 3>(simd, &mut acc, &xr, j, &gp);
                            }
                            gp = [none, gp[0], gp[1]];
                            column::<S, I, V, 1, 3>(simd, &mut acc, &xr, ow, &gp);
                        } else {
                            gp = [none, gp[0], none];
                            column::<S, I, V, 1, 2>(simd, &mut acc, &xr, 1, &gp);
                        }
                        gp = [none, none, gp[1]];
                        column::<S, I, V, 2, 3>(simd, &mut acc, &xr, ow + 1, &gp);
                    }
                    for (ii, a) in acc.iter().enumerate().take(chans) {
                        for (t, at) in a.iter().enumerate() {
                            let p = &mut part[((i0 + ii) * 9 + t) * co_pad + c0..][..width];
                            for (v, av) in at.iter().enumerate() {
                                store::<S>(&mut p[v * lanes..], *av);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// One input column `j` of [`WeightGrad3`]: `acc[i][ky·3 + kx] += x_i[ky][j] · gp[kx]` for
/// `kx` in `LO..HI` (the taps whose pixel `j - kx` exists).
#[inline(always)]
fn column<S: Simd, const I: usize, const V: usize, const LO: usize, const HI: usize>(
    simd: S,
    acc: &mut [[[S::f32s; V]; 9]; I],
    xr: &[[&[f32]; 3]; I],
    j: usize,
    gp: &[[S::f32s; V]; 3],
) {
    for (a, rows) in acc.iter_mut().zip(xr) {
        for (ky, row) in rows.iter().enumerate() {
            let xb = simd.splat_f32s(row[j]);
            for kx in LO..HI {
                for (av, &gk) in a[ky * 3 + kx].iter_mut().zip(&gp[kx]) {
                    *av = simd.mul_add_f32s(xb, gk, *av);
                }
            }
        }
    }
}

/// Lanes of [`WeightGradGrid`]'s partial sums, whatever the vector width (AVX2 keeps them in two
/// vectors, scalar code in sixteen values): the sums' order does not depend on the CPU.
pub(crate) const GRID_SUM_LANES: usize = MAX_LANES;

/// The weight gradient vectorised along the grid instead of the output channels:
/// `acc[o][i·taps + t][l] += Σ gy[o][q] · x[i][q + offs[t]]` over the grid positions `q ≡ l (mod
/// 16)`, the output gradient read on the forward grid, where its thrown-away columns are zero
/// (the input gradient's zero-padded copy, which lands there for a "same" padding: see
/// [`weight_grad_grid`]). A register block of output channels by taps (8 x 3 on AVX-512: 11
/// loads per 24 multiply-adds) and no pixel-major copy of the output gradient; the price is the
/// grid's thrown-away positions (zero products) and a sum over the 16 lanes at the end
/// ([`reduce_grid_sums`]). Measured on a Xeon, one thread, in cache, 16 channels at 28x28: 140
/// GFLOP/s over the grid, 127 over the valid pixels, against 109 for [`WeightGrad3`] (which
/// also needs the [`Grid::transpose_out`] copy); at 14x14 (14 tiles a row, the block's set-up
/// weighs more) 100 / 87 against 91, and 32 channels at 14x14 89 / 78 against 120, so the
/// direct path takes it for 16 channels and 28x28-sized rows only.
struct WeightGradGrid<'a> {
    x: &'a [f32],
    plane: usize,
    ci: usize,
    offs: &'a [usize],
    /// `co` planes of `gplane` values, position `q` of plane `o` at `o·gplane + g0 + q`.
    gy: &'a [f32],
    gplane: usize,
    g0: usize,
    co: usize,
    nq: usize,
    acc: &'a mut [f32],
    prefetch: &'a [&'a [f32]],
}

impl WithSimd for WeightGradGrid<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        // Register blocks (output channels x taps x vectors per 16 lanes): 8 x 3 on AVX-512
        // (24 accumulators + 3 input vectors + 1 gradient vector of its 32 registers), 4 x 3 x 2
        // on AVX2, one half of the tiles at a time ([`block_4x3`]: 12 accumulators of its 16;
        // measured on a Zen 3, one thread, in cache, 16 channels at 28x28: 60 -> 68 GFLOP/s
        // against 2 x 3 x 2 on the generic loop), one lane at a time on scalar code.
        match S::F32_LANES {
            16 => grid_sums::<S, 8, 3, 1>(simd, self),
            8 => grid_sums::<S, 4, 3, 2>(simd, self),
            4 => grid_sums::<S, 2, 3, 4>(simd, self),
            _ => grid_sums::<pulp::Scalar, 1, 1, GRID_SUM_LANES>(pulp::Scalar, self),
        }
    }
}

#[inline(always)]
fn grid_sums<S: Simd, const OB: usize, const KB: usize, const V: usize>(
    simd: S,
    op: WeightGradGrid,
) {
    let lanes = S::F32_LANES;
    let WeightGradGrid {
        x,
        plane,
        ci,
        offs,
        gy,
        gplane,
        g0,
        co,
        nq,
        acc,
        prefetch,
    } = op;
    debug_assert_eq!(V * lanes, GRID_SUM_LANES);
    let taps = offs.len();
    let kt = ci * taps;
    let mut pf = Prefetcher::new(prefetch, co.div_ceil(OB) * kt.div_ceil(KB));
    let zero = simd.splat_f32s(0.0);
    for o0 in (0..co).step_by(OB) {
        let orows = OB.min(co - o0);
        // Rows as tiles of 16 positions, all `tiles` long (no bounds checks in the loop).
        // Channels past the end repeat the last one (computed, not stored).
        let tiles = nq / GRID_SUM_LANES;
        let g: [&[[f32; GRID_SUM_LANES]]; OB] =
            std::array::from_fn(|r| tiled(&gy[(o0 + r).min(co - 1) * gplane + g0..], tiles));
        for k0 in (0..kt).step_by(KB) {
            pf.step();
            let krows = KB.min(kt - k0);
            let xk: [&[[f32; GRID_SUM_LANES]]; KB] = std::array::from_fn(|c| {
                let k = (k0 + c).min(kt - 1);
                tiled(&x[(k / taps) * plane + offs[k % taps]..], tiles)
            });
            let mut a = [[[zero; V]; KB]; OB];
            for (r, ar) in a.iter_mut().enumerate().take(orows) {
                for (c, ac) in ar.iter_mut().enumerate().take(krows) {
                    let p = &acc[((o0 + r) * kt + k0 + c) * GRID_SUM_LANES..][..GRID_SUM_LANES];
                    for (v, av) in ac.iter_mut().enumerate() {
                        *av = load::<S>(&p[v * lanes..]);
                    }
                }
            }
            // AVX-512's block (8 x 3, one vector per tile: nothing else has 24 accumulators
            // for 8 rows and 3 taps) on its own loop, the others on the generic one.
            if let (Ok(g8), Ok(x3), Ok(a83)) = (
                <&[_; 8]>::try_from(&g[..]),
                <&[_; 3]>::try_from(&xk[..]),
                <&mut [_; 24]>::try_from(a.as_flattened_mut().as_flattened_mut()),
            ) {
                block_8x3(simd, g8, x3, a83);
            } else if let (2, Ok(g4), Ok(x3), Ok(a43)) = (
                V,
                <&[_; 4]>::try_from(&g[..]),
                <&[_; 3]>::try_from(&xk[..]),
                <&mut [_; 24]>::try_from(a.as_flattened_mut().as_flattened_mut()),
            ) {
                // AVX2's block: one half of every tile at a time (12 accumulators).
                for half in 0..2 {
                    let mut ah: [S::f32s; 12] = std::array::from_fn(|j| a43[2 * j + half]);
                    block_4x3(simd, g4, x3, &mut ah, half * lanes);
                    for (j, &v) in ah.iter().enumerate() {
                        a43[2 * j + half] = v;
                    }
                }
            } else {
                for t in 0..tiles {
                    for v in 0..V {
                        // The taps' input vectors held, each output channel's gradient loaded
                        // once.
                        let xv: [S::f32s; KB] =
                            std::array::from_fn(|c| load::<S>(&xk[c][t][v * lanes..]));
                        for (ar, gr) in a.iter_mut().zip(&g) {
                            let gv = load::<S>(&gr[t][v * lanes..]);
                            for (ac, &xc) in ar.iter_mut().zip(&xv) {
                                ac[v] = simd.mul_add_f32s(gv, xc, ac[v]);
                            }
                        }
                    }
                }
            }
            for (r, ar) in a.iter().enumerate().take(orows) {
                for (c, ac) in ar.iter().enumerate().take(krows) {
                    let p = &mut acc[((o0 + r) * kt + k0 + c) * GRID_SUM_LANES..][..GRID_SUM_LANES];
                    for (v, av) in ac.iter().enumerate() {
                        store::<S>(&mut p[v * lanes..], *av);
                    }
                }
            }
        }
    }
}

/// [`grid_sums`]' loop on AVX-512 (one vector per tile): 8 output channels by 3 taps, the
/// eleven rows zipped (one index, no bounds checks: 11 loads, 24 multiply-adds and 3 loop
/// instructions per tile; the generic loop's checks and spilled row pointers cost a quarter).
#[inline(always)]
fn block_8x3<S: Simd>(
    simd: S,
    g: &[&[[f32; GRID_SUM_LANES]]; 8],
    x: &[&[[f32; GRID_SUM_LANES]]; 3],
    a: &mut [S::f32s; 24],
) {
    let rows = g[0]
        .iter()
        .zip(g[1])
        .zip(g[2])
        .zip(g[3])
        .zip(g[4])
        .zip(g[5])
        .zip(g[6])
        .zip(g[7])
        .zip(x[0])
        .zip(x[1])
        .zip(x[2]);
    for ((((((((((g0, g1), g2), g3), g4), g5), g6), g7), x0), x1), x2) in rows {
        let xv = [load::<S>(x0), load::<S>(x1), load::<S>(x2)];
        for (ar, gr) in a.chunks_exact_mut(3).zip([g0, g1, g2, g3, g4, g5, g6, g7]) {
            let gv = load::<S>(gr);
            for (ac, &xc) in ar.iter_mut().zip(&xv) {
                *ac = simd.mul_add_f32s(gv, xc, *ac);
            }
        }
    }
}

/// [`grid_sums`]' loop on AVX2 for the lanes `at..at + 8` of every tile: 4 output channels by
/// 3 taps, the seven rows zipped (7 loads per 12 multiply-adds).
#[inline(always)]
fn block_4x3<S: Simd>(
    simd: S,
    g: &[&[[f32; GRID_SUM_LANES]]; 4],
    x: &[&[[f32; GRID_SUM_LANES]]; 3],
    a: &mut [S::f32s; 12],
    at: usize,
) {
    let rows = g[0]
        .iter()
        .zip(g[1])
        .zip(g[2])
        .zip(g[3])
        .zip(x[0])
        .zip(x[1])
        .zip(x[2]);
    for ((((((g0, g1), g2), g3), x0), x1), x2) in rows {
        let xv = [
            load::<S>(&x0[at..]),
            load::<S>(&x1[at..]),
            load::<S>(&x2[at..]),
        ];
        for (ar, gr) in a.chunks_exact_mut(3).zip([g0, g1, g2, g3]) {
            let gv = load::<S>(&gr[at..]);
            for (ac, &xc) in ar.iter_mut().zip(&xv) {
                *ac = simd.mul_add_f32s(gv, xc, *ac);
            }
        }
    }
}

/// The first `tiles` tiles of 16 values of `s`.
#[inline(always)]
fn tiled(s: &[f32], tiles: usize) -> &[[f32; GRID_SUM_LANES]] {
    &bytemuck::cast_slice(&s[..tiles * GRID_SUM_LANES])[..tiles]
}

/// Whether [`weight_grad_grid`] may take the output gradient from the input gradient's padded
/// copy on `back` for the forward grid `fwd`: the two grids share the row length and the
/// positions (a "same" padding, `p = (k - 1) / 2`), so the output gradient's position `q` on
/// `fwd` is `back`'s padded position `q + back.ph·wp + back.pw`, zero at the thrown-away columns
/// and past the last row.
pub(crate) fn grids_align(fwd: &Grid, back: &Grid) -> bool {
    fwd.wp == back.wp
        && fwd.nq == back.nq
        && fwd.oh == back.h
        && fwd.ow == back.w
        && back.ph * back.wp + back.pw + fwd.nq <= back.plane
}

/// Rounds `back`'s plane length up to a multiple of 16, so that with [`aligned_start`] every
/// output-gradient row [`weight_grad_grid`] reads starts on a cache line (a speed matter only:
/// AVX-512 loads across two lines take two load slots).
pub(crate) fn align_planes(back: &mut Grid) {
    back.plane = back.plane.next_multiple_of(GRID_SUM_LANES);
}

/// Where in `buf` to pad planes on `back` (`0..16`) so that their output-gradient positions
/// start on a 64-byte line.
pub(crate) fn aligned_start(buf: &[f32], back: &Grid) -> usize {
    let first = buf.as_ptr() as usize / std::mem::size_of::<f32>() + back.ph * back.wp + back.pw;
    (GRID_SUM_LANES - first % GRID_SUM_LANES) % GRID_SUM_LANES
}

/// One sample's weight gradient on the grid, added to `acc` (`[co][ci·taps][16]`, see
/// [`WeightGradGrid`]): `x` holds `ci` planes padded on `fwd` (as for [`forward`]), `gp` the
/// output gradient's `co` planes padded on `back` ([`Grid::pad`]; `back` aligned with `fwd`, see
/// [`grids_align`]). Each lane's sum runs over the positions in grid order and from one call to
/// the next, so calls over consecutive samples add the same products in the same order on every
/// instruction set. `prefetch` as for [`forward_into`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn weight_grad_grid(
    fwd: &Grid,
    back: &Grid,
    x: &[f32],
    ci: usize,
    offs: &[usize],
    gp: &[f32],
    co: usize,
    acc: &mut [f32],
    prefetch: &[&[f32]],
) {
    assert!(grids_align(fwd, back), "the grids do not align");
    let nq = fwd.nq;
    let reach = offs.iter().max().map_or(0, |m| m + nq);
    assert!(
        x.len() >= (ci.max(1) - 1) * fwd.plane + reach && gp.len() >= co * back.plane,
        "planes too short"
    );
    assert!(
        acc.len() >= co * ci * offs.len() * GRID_SUM_LANES,
        "sums too short"
    );
    let shape = [ci, co, nq, offs.len()];
    dispatch_timed(
        "dw grid",
        shape,
        WeightGradGrid {
            x,
            plane: fwd.plane,
            ci,
            offs,
            gy: gp,
            gplane: back.plane,
            g0: back.ph * back.wp + back.pw,
            co,
            nq,
            acc,
            prefetch,
        },
    )
}

/// `dw[j] = Σ_l acc[j·16 + l]`, lanes in order (the same on every instruction set): the
/// [`weight_grad_grid`] sums in the weights' layout `[co][ci·taps]`.
pub(crate) fn reduce_grid_sums(acc: &[f32], dw: &mut [f32]) {
    for (d, a) in dw.iter_mut().zip(acc.chunks_exact(GRID_SUM_LANES)) {
        *d = a.iter().fold(0.0f32, |s, &v| s + v);
    }
}

/// `dw[o][i·taps + t] += Σ_{s,oy,ox} gyt[s][oy·ow + ox][o] · x[s][i][oy·wp + ox + offs[t]]` over
/// `samples` samples on `grid`: `x` as for [`forward`] (samples `xstride >= ci·plane` apart),
/// `gyt` from [`Grid::transpose_out`], `dw` `[co_pad][ci·taps]`.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn weight_grad(
    grid: &Grid,
    x: &[f32],
    xstride: usize,
    ci: usize,
    offs: &[usize],
    gyt: &[f32],
    co_pad: usize,
    samples: usize,
    dw: &mut [f32],
) {
    let mut part = vec![0.0f32; ci * offs.len() * co_pad];
    weight_grad_part(
        grid,
        x,
        xstride,
        ci,
        offs,
        gyt,
        co_pad,
        samples,
        false,
        &mut part,
        &[],
    );
    add_part(&part, co_pad, dw);
}

/// `dw[o][k] += part[k][o]`: a [`weight_grad_part`] sum in the weights' layout.
#[cfg(test)]
pub(crate) fn add_part(part: &[f32], co_pad: usize, dw: &mut [f32]) {
    let kt = part.len() / co_pad;
    for (k, p) in part.chunks_exact(co_pad).enumerate() {
        for (o, &v) in p.iter().enumerate() {
            dw[o * kt + k] += v;
        }
    }
}

/// The sums of [`weight_grad`] transposed, `part[i·taps + t][o]`, starting from `part`'s values
/// when `accumulate` (else from zero): calls over consecutive samples, each accumulating, add the
/// same products in the same order as one call over all of them. `prefetch` as for
/// [`forward_into`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn weight_grad_part(
    grid: &Grid,
    x: &[f32],
    xstride: usize,
    ci: usize,
    offs: &[usize],
    gyt: &[f32],
    co_pad: usize,
    samples: usize,
    accumulate: bool,
    part: &mut [f32],
    prefetch: &[&[f32]],
) {
    struct Pick<'a>(WeightGrad<'a, 1, 1>);
    impl WithSimd for Pick<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: Simd>(self, simd: S) {
            let WeightGrad {
                x,
                xstride,
                grid,
                ci,
                offs,
                gyt,
                co_pad,
                samples,
                accumulate,
                part,
                prefetch,
            } = self.0;
            // Register block: R rows (input channel x tap) by V vectors of output channels,
            // measured on a Xeon: 12x1, 8x2, 4x4 vectors.
            let vectors = co_pad / S::F32_LANES;
            macro_rules! run {
                ($r:literal, $v:literal) => {
                    WeightGrad::<$r, $v> {
                        x,
                        xstride,
                        grid,
                        ci,
                        offs,
                        gyt,
                        co_pad,
                        samples,
                        accumulate,
                        part,
                        prefetch,
                    }
                    .with_simd(simd)
                };
            }
            let three = grid.kh == 3 && grid.kw == 3 && three_by_three(offs, grid.wp);
            // The 3x3 kernel on 16 channels and rows of at least 20 pixels (measured on a
            // Xeon, one thread, in cache: 28x28 111 -> 121 GFLOP/s; 14x14 110 -> 92, its edge
            // columns weigh more).
            // AVX2 (16 registers): 6 x 2 (12 accumulators, 2 gradient vectors, a broadcast);
            // AVX-512's blocks spill there. Measured on a Zen 3, one thread, in cache, with the
            // fixed-length rows of `dw_row`: 32 channels at 14x14 49 -> 85 GFLOP/s, 64 at 7x7
            // 46 -> 71 (4 x 4 with the same rows: 45 and 40).
            if S::F32_LANES == 8 && vectors.is_multiple_of(2) {
                return run!(6, 2);
            }
            if three && vectors == 1 && grid.ow >= 20 {
                WeightGrad3::<2, 1>(WeightGrad {
                    x,
                    xstride,
                    grid,
                    ci,
                    offs,
                    gyt,
                    co_pad,
                    samples,
                    accumulate,
                    part,
                    prefetch,
                })
                .with_simd(simd)
            } else if vectors.is_multiple_of(4) {
                run!(4, 4)
            } else if vectors.is_multiple_of(2) {
                run!(8, 2)
            } else {
                run!(12, 1)
            }
        }
    }
    debug_assert!(co_pad.is_multiple_of(CO_BLOCK));
    let shape = [ci, co_pad, samples * grid.oh * grid.ow, offs.len()];
    dispatch_timed(
        "dw channels",
        shape,
        Pick(WeightGrad {
            x,
            xstride,
            grid,
            ci,
            offs,
            gyt,
            co_pad,
            samples,
            accumulate,
            part,
            prefetch,
        }),
    );
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Every line of every stream is requested once, in order, within the steps given.
    #[test]
    fn prefetcher_covers_every_line_within_its_steps() {
        let data = rand(1000, 9);
        for (lens, steps) in [
            (vec![0usize, 0], 5usize),
            (vec![17, 0, 33], 1),
            (vec![16, 1, 160], 4),
            (vec![999], 3),
            (vec![5], 100),
        ] {
            let mut at = 0;
            let streams: Vec<&[f32]> = lens
                .iter()
                .map(|&l| {
                    at += l;
                    &data[at - l..at]
                })
                .collect();
            let want: Vec<*const f32> = streams
                .iter()
                .flat_map(|s| s.iter().step_by(LINE).map(|v| v as *const f32))
                .collect();
            let mut pf = Prefetcher::new(&streams, steps);
            let mut got = vec![];
            for _ in 0..steps {
                for _ in 0..pf.per_step {
                    got.extend(pf.next().map(|v| v as *const f32));
                }
            }
            assert_eq!(got, want, "{lens:?} over {steps}");
            assert!(pf.next().is_none());
            pf.step(); // nothing left: no request, no panic
        }
    }

    /// The bit patterns of `v` (to compare results bit for bit, -0.0 and NaN included).
    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|f| f.to_bits()).collect()
    }

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut r = Rng::new(seed);
        (0..n).map(|_| r.uniform() * 2.0 - 1.0).collect()
    }

    /// Plain loops: `y[o][oy][ox] = Σ w[o][i][ky][kx] · x[i][oy + ky - ph][ox + kx - pw]`.
    fn reference(x: &[f32], w: &[f32], g: &Grid, ci: usize, co: usize) -> Vec<f32> {
        let mut y = vec![0.0f32; co * g.oh * g.ow];
        for o in 0..co {
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    let mut s = 0.0f64;
                    for i in 0..ci {
                        for ky in 0..g.kh {
                            for kx in 0..g.kw {
                                let (iy, ix) = (oy + ky, ox + kx);
                                if iy < g.ph || ix < g.pw || iy - g.ph >= g.h || ix - g.pw >= g.w {
                                    continue;
                                }
                                s += (w[((o * ci + i) * g.kh + ky) * g.kw + kx]
                                    * x[(i * g.h + iy - g.ph) * g.w + ix - g.pw])
                                    as f64;
                            }
                        }
                    }
                    y[(o * g.oh + oy) * g.ow + ox] = s as f32;
                }
            }
        }
        y
    }

    /// Forward and weight-gradient outputs of one run on `level`.
    fn run_kernels(
        level: Level,
        ci: usize,
        co: usize,
        g: &Grid,
        seed: u64,
    ) -> (Vec<f32>, Vec<f32>) {
        set_level(level);
        let samples = 3;
        let taps = g.kh * g.kw;
        let (x, wt) = (
            rand(samples * ci * g.h * g.w, seed),
            rand(co * ci * taps, seed + 1),
        );
        let gy = rand(samples * co * g.oh * g.ow, seed + 2);
        let mut xp = vec![0.0f32; samples * ci * g.plane];
        for s in 0..samples {
            g.pad(&x[s * ci * g.h * g.w..], ci, &mut xp[s * ci * g.plane..]);
        }
        let cop = padded_channels(co);
        let mut out = vec![0.0f32; cop * g.nq];
        let wp = pack_weights(&wt, co, ci, taps, false, g.co_block());
        forward(g, &xp, g.plane, ci, &g.offsets(), &wp, &mut out);
        let pixels = g.oh * g.ow;
        let mut gyt = vec![0.0f32; samples * pixels * cop];
        for s in 0..samples {
            g.transpose_out(
                &gy[s * co * g.oh * g.ow..],
                co,
                cop,
                &mut gyt[s * pixels * cop..],
            );
        }
        let mut dw = vec![0.0f32; cop * ci * taps];
        weight_grad(
            g,
            &xp,
            ci * g.plane,
            ci,
            &g.offsets(),
            &gyt,
            cop,
            samples,
            &mut dw,
        );
        set_level(Level::Auto);
        (out, dw)
    }

    #[test]
    fn every_simd_level_is_bit_identical_to_scalar() {
        let mut ran = vec![];
        for (i, (ci, co, h, w, k, p)) in [
            (3, 5, 7, 9, 3, 1),
            (16, 16, 28, 28, 3, 1),
            (4, 32, 14, 14, 3, 1),
            (5, 33, 6, 4, 3, 0),
            (2, 64, 7, 7, 3, 1),
            (7, 20, 5, 11, 5, 2),
            (1, 3, 1, 2, 2, 1),
        ]
        .into_iter()
        .enumerate()
        {
            let g = Grid::new(h, w, p, p, k, k).unwrap();
            let want = run_kernels(Level::Scalar, ci, co, &g, i as u64);
            for level in [
                Level::Auto,
                #[cfg(target_arch = "x86_64")]
                Level::Avx2,
                #[cfg(target_arch = "x86_64")]
                Level::Avx512,
            ] {
                if !level.available() {
                    continue;
                }
                let got = run_kernels(level, ci, co, &g, i as u64);
                assert!(
                    got.0 == want.0,
                    "{level:?} forward differs from scalar ({ci} {co} {h}x{w} k{k})"
                );
                assert!(
                    got.1 == want.1,
                    "{level:?} weight gradient differs from scalar ({ci} {co} {h}x{w} k{k})"
                );
                if !ran.contains(&level) {
                    ran.push(level);
                }
            }
        }
        // Which vector paths this machine checked against the scalar one.
        eprintln!("direct conv: checked {ran:?} against Scalar");
    }

    /// The weight gradient along the grid: the plain loops' sums (to rounding), and the same
    /// bits on every instruction set, over samples summed call by call.
    #[test]
    fn grid_weight_gradient_matches_plain_loops_and_scalar_bits() {
        let mut ran = vec![];
        for (i, (samples, ci, co, h, w, k)) in [
            (3, 3, 5, 7, 9, 3),
            (2, 16, 16, 28, 28, 3),
            (2, 1, 16, 28, 28, 3),
            (3, 2, 7, 5, 11, 5),
            (2, 4, 3, 1, 1, 3),
            (1, 5, 9, 13, 2, 3),
        ]
        .into_iter()
        .enumerate()
        {
            let p = (k - 1) / 2;
            let fwd = Grid::new(h, w, p, p, k, k).unwrap();
            let back = Grid::new(fwd.oh, fwd.ow, k - 1 - p, k - 1 - p, k, k).unwrap();
            assert!(grids_align(&fwd, &back), "{h}x{w} k{k}");
            let taps = k * k;
            let (x, gy) = (
                rand(samples * ci * h * w, i as u64),
                rand(samples * co * fwd.oh * fwd.ow, i as u64 + 7),
            );
            let run = |level: Level| {
                set_level(level);
                let mut acc = vec![0.0f32; co * ci * taps * GRID_SUM_LANES];
                let (mut xp, mut gp) = (
                    vec![f32::NAN; ci * fwd.plane],
                    vec![f32::NAN; co * back.plane],
                );
                for s in 0..samples {
                    fwd.pad(&x[s * ci * h * w..], ci, &mut xp);
                    back.pad(&gy[s * co * fwd.oh * fwd.ow..], co, &mut gp);
                    weight_grad_grid(&fwd, &back, &xp, ci, &fwd.offsets(), &gp, co, &mut acc, &[]);
                }
                set_level(Level::Auto);
                let mut dw = vec![0.0f32; co * ci * taps];
                reduce_grid_sums(&acc, &mut dw);
                dw
            };
            let want = run(Level::Scalar);
            // Plain loops: dw[o][i][ky][kx] = Σ gy[o][oy][ox] · x[i][oy + ky - p][ox + kx - p].
            for o in 0..co {
                for c in 0..ci {
                    for t in 0..taps {
                        let (ky, kx) = (t / k, t % k);
                        let mut sum = 0.0f64;
                        for s in 0..samples {
                            for oy in 0..fwd.oh {
                                for ox in 0..fwd.ow {
                                    let (iy, ix) = (
                                        (oy + ky) as isize - p as isize,
                                        (ox + kx) as isize - p as isize,
                                    );
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    let g = gy[((s * co + o) * fwd.oh + oy) * fwd.ow + ox];
                                    let xv = x[((s * ci + c) * h + iy as usize) * w + ix as usize];
                                    sum += g as f64 * xv as f64;
                                }
                            }
                        }
                        let got = want[(o * ci + c) * taps + t];
                        assert!(
                            (got as f64 - sum).abs() <= 1e-4 * (1.0 + sum.abs()),
                            "{ci} {co} {h}x{w} k{k}: dw[{o}][{c}][{t}] {got} vs {sum}"
                        );
                    }
                }
            }
            for level in levels() {
                assert!(
                    run(level) == want,
                    "{level:?} differs from scalar ({ci} {co} {h}x{w} k{k})"
                );
                if !ran.contains(&level) {
                    ran.push(level);
                }
            }
        }
        eprintln!("weight gradient on the grid: checked {ran:?} against Scalar");
    }

    /// The product along the channels: the grid kernel's bits on every level (rows of 7, 14,
    /// 21 and 28, in pairs or not, odd channel counts, one and two channel vectors), its pixel-major output extracted
    /// as the grid's is (bias, adding, a zero bias leaving -0.0 alone).
    #[test]
    fn rows_kernel_and_pixel_extract_are_the_grid_kernels_bits() {
        let mut ran = vec![];
        // 3x3 kernels (the three-tap loop, `RowsBlock::run3`) and others (`RowsBlock::run`).
        for (i, (ci, co, h, w, k, p)) in [
            (64, 64, 7, 7, 3, 1),
            (5, 33, 7, 14, 3, 1),
            (20, 50, 14, 7, 3, 1),
            (3, 16, 4, 7, 3, 1),
            // Rows of four and three blocks (AVX2's 28x28 layers), two passes of input channels;
            // on AVX2, blocks of two rows (`RowsBlock::run3`) where the rows are even in
            // number and a multiple of 4 pixels long.
            (16, 16, 28, 28, 3, 1),
            (18, 16, 9, 21, 3, 1),
            (20, 24, 6, 28, 3, 1),
            (5, 16, 7, 28, 3, 1),
            (6, 32, 7, 7, 5, 2),
            (17, 40, 5, 14, 1, 0),
            (4, 20, 6, 8, 2, 0),
        ]
        .into_iter()
        .enumerate()
        {
            let g = Grid::new(h, w, p, p, k, k).unwrap();
            let taps = k * k;
            let cop = padded_channels(co);
            let (x, wt) = (
                rand(ci * h * w, i as u64),
                rand(co * ci * taps, i as u64 + 3),
            );
            let mut xp = vec![0.0f32; ci * g.plane];
            g.pad(&x, ci, &mut xp);
            let offs = g.offsets();
            let mut grid_out = vec![0.0f32; cop * g.nq];
            let wk = pack_weights(&wt, co, ci, taps, false, g.co_block());
            forward(&g, &xp, g.plane, ci, &offs, &wk, &mut grid_out);
            let mut bias = rand(co, 9);
            bias[0] = 0.0;
            let mut want = vec![0.0f32; co * h * w];
            g.extract(&grid_out, co, &mut want, Some(&bias));
            let mut want_add = rand(co * h * w, 11);
            want_add[0] = -0.0;
            let base = want_add.clone();
            g.extract_add(&grid_out, co, &mut want_add);
            let wr = pack_weights(&wt, co, ci, taps, false, rows_block(cop));
            for level in levels() {
                set_level(level);
                let mut out = vec![f32::NAN; cop * h * w];
                forward_rows(&g, &xp, g.plane, ci, &offs, &wr, cop, &mut out, &[]);
                let mut got = vec![0.0f32; co * h * w];
                g.extract_pixels(&out, (co, cop), &mut got, Some(&bias), false);
                let mut got_add = base.clone();
                g.extract_pixels(&out, (co, cop), &mut got_add, None, true);
                set_level(Level::Auto);
                assert_eq!(bits(&got), bits(&want), "{level:?} {ci} {co} {h}x{w} k{k}");
                assert_eq!(
                    bits(&got_add),
                    bits(&want_add),
                    "{level:?} {ci} {co} {h}x{w} adding"
                );
                if !ran.contains(&level) {
                    ran.push(level);
                }
            }
        }
        eprintln!("rows kernel: checked {ran:?} against the grid kernel");
    }

    #[test]
    fn forward_matches_plain_loops_on_odd_shapes() {
        for (ci, co, h, w, k, p) in [
            (1, 16, 28, 28, 3, 1),
            (3, 24, 14, 14, 3, 1),
            (3, 5, 7, 9, 3, 1),
            (5, 17, 6, 4, 3, 0),
            (2, 33, 5, 11, 5, 2),
            (4, 3, 1, 1, 3, 1),
            (6, 8, 9, 3, 1, 0),
            (2, 4, 4, 6, 2, 1),
        ] {
            let g = Grid::new(h, w, p, p, k, k).unwrap();
            let (x, wt) = (rand(ci * h * w, 1), rand(co * ci * k * k, 2));
            let mut xp = vec![1.0f32; ci * g.plane];
            g.pad(&x, ci, &mut xp);
            let cop = padded_channels(co);
            let mut out = vec![0.0f32; cop * g.nq];
            let wp = pack_weights(&wt, co, ci, k * k, false, g.co_block());
            forward(&g, &xp, g.plane, ci, &g.offsets(), &wp, &mut out);
            let mut y = vec![0.0f32; co * g.oh * g.ow];
            g.extract(&out, co, &mut y, None);
            let want = reference(&x, &wt, &g, ci, co);
            for (a, b) in y.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "{ci} {co} {h}x{w} k{k}: {a} vs {b}"
                );
            }
        }
    }
    /// The levels this machine can run.
    pub(crate) fn levels() -> Vec<Level> {
        [
            Level::Scalar,
            Level::Auto,
            #[cfg(target_arch = "x86_64")]
            Level::Avx2,
            #[cfg(target_arch = "x86_64")]
            Level::Avx512,
        ]
        .into_iter()
        .filter(|l| l.available())
        .collect()
    }

    #[test]
    fn pad_extract_and_transpose_match_plain_loops_on_every_level() {
        for (c, h, w, p, k) in [
            (3, 5, 7, 1, 3),
            (2, 28, 28, 1, 3),
            (5, 1, 17, 2, 5),
            (1, 9, 33, 0, 2),
            (16, 28, 28, 1, 3),
            (33, 5, 7, 1, 3),
            (32, 4, 4, 1, 3),
            (64, 7, 7, 1, 3),
            (9, 3, 5, 1, 3),
        ] {
            let g = Grid::new(h, w, p, p, k, k).unwrap();
            let x = rand(c * h * w, 3);
            // Plain loops: the padded planes, a grid output's valid part (+ bias), the
            // pixel-major copy.
            let mut want_pad = vec![0.0f32; c * g.plane];
            for i in 0..c {
                for y in 0..h {
                    for xx in 0..w {
                        want_pad[i * g.plane + (y + p) * g.wp + xx + p] = x[(i * h + y) * w + xx];
                    }
                }
            }
            // Through batch norm + ReLU on the way in, `t > 0 ? t : 0` (the padding +0).
            let coef: Vec<Coef> = (0..c)
                .map(|i| {
                    (
                        0.1 * i as f32 - 0.2,
                        1.5 - 0.1 * i as f32,
                        0.05 * i as f32 - 0.1,
                    )
                })
                .collect();
            let mut want_bn = vec![0.0f32; c * g.plane];
            for i in 0..c {
                let (mu, k, b) = coef[i];
                for y in 0..h {
                    for xx in 0..w {
                        let t = (x[(i * h + y) * w + xx] - mu) * k + b;
                        want_bn[i * g.plane + (y + p) * g.wp + xx + p] =
                            if t > 0.0 { t } else { 0.0 };
                    }
                }
            }
            let grid_out = rand(c * g.nq, 4);
            // (The transposes' tiles, 8 x 8 with AVX, else 16 x 16: from 8 or 16 channels and
            // pixels on; the rest value by value.)
            let bias: Vec<f32> = (0..c)
                .map(|i| if i == 1 { 0.0 } else { i as f32 - 0.5 })
                .collect();
            let mut want_ext = vec![0.0f32; c * g.oh * g.ow];
            for i in 0..c {
                for y in 0..g.oh {
                    for xx in 0..g.ow {
                        let v = grid_out[i * g.nq + y * g.wp + xx];
                        want_ext[(i * g.oh + y) * g.ow + xx] =
                            if bias[i] == 0.0 { v } else { v + bias[i] };
                    }
                }
            }
            let cop = padded_channels(c);
            let mut want_t = vec![0.0f32; g.oh * g.ow * cop];
            for i in 0..c {
                for q in 0..g.oh * g.ow {
                    want_t[q * cop + i] = want_ext[i * g.oh * g.ow + q];
                }
            }
            // A pixel-major product back to planes: + bias (a zero one leaves -0.0 alone), or
            // added to what the planes held.
            let mut px = rand(g.oh * g.ow * cop, 5);
            px[1] = -0.0;
            let mut base = rand(c * g.oh * g.ow, 6);
            base[0] = -0.0;
            let (mut want_in, mut want_add) = (want_ext.clone(), base.clone());
            for i in 0..c {
                for q in 0..g.oh * g.ow {
                    let v = px[q * cop + i];
                    let at = i * g.oh * g.ow + q;
                    want_in[at] = if bias[i] == 0.0 { v } else { v + bias[i] };
                    want_add[at] += v;
                }
            }
            for level in levels() {
                set_level(level);
                let mut got = vec![f32::NAN; c * g.oh * g.ow];
                g.extract_pixels(&px, (c, cop), &mut got, Some(&bias), false);
                assert!(
                    bits(&got) == bits(&want_in),
                    "{level:?} pixels in {c} {h}x{w}"
                );
                let mut got = base.clone();
                g.extract_pixels(&px, (c, cop), &mut got, None, true);
                assert!(
                    bits(&got) == bits(&want_add),
                    "{level:?} pixels added {c} {h}x{w}"
                );
                // (Whole vectors run on past each part: the buffer's end stays untouched.)
                let len = c * g.plane;
                let mut got = vec![f32::NAN; len + 19];
                g.pad(&x, c, &mut got);
                assert!(got[..len] == want_pad, "{level:?} pad {c} {h}x{w} p{p}");
                assert!(got[len..].iter().all(|v| v.is_nan()), "{level:?} pad's end");
                let mut got = vec![f32::NAN; len + 19];
                g.pad_bn_relu(&x, c, &mut got, &coef);
                assert!(
                    bits(&got[..len]) == bits(&want_bn),
                    "{level:?} pad bn {c} {h}x{w} p{p}"
                );
                assert!(
                    got[len..].iter().all(|v| v.is_nan()),
                    "{level:?} pad bn's end"
                );
                let mut got = vec![f32::NAN; c * g.oh * g.ow];
                g.extract(&grid_out, c, &mut got, Some(&bias));
                assert!(got == want_ext, "{level:?} extract {c} {h}x{w} p{p}");
                let mut got = vec![f32::NAN; g.oh * g.ow * cop];
                g.transpose_out(&want_ext, c, cop, &mut got);
                assert!(got == want_t, "{level:?} transpose {c} {h}x{w} p{p}");
                set_level(Level::Auto);
            }
        }
    }

    /// [`WeightGrad3`] against [`WeightGrad`] on every level this CPU has: the same bits, on
    /// odd shapes (rows of 1-3 pixels, odd channel counts, channels past a block's end).
    #[test]
    fn three_by_three_weight_gradient_is_the_general_kernels_bits() {
        struct Both<'a>(&'a Grid, &'a [f32], usize, &'a [f32], usize, usize);
        impl WithSimd for Both<'_> {
            type Output = (Vec<f32>, Vec<f32>);
            fn with_simd<S: Simd>(self, simd: S) -> Self::Output {
                let Both(grid, x, ci, gyt, co_pad, samples) = self;
                let offs = grid.offsets();
                let len = ci * 9 * co_pad;
                let (mut general, mut three) = (vec![0.0f32; len], vec![0.0f32; len]);
                for (s, accumulate) in [(0, false), (1, true)] {
                    let args = |part| WeightGrad::<12, 1> {
                        x: &x[s * ci * grid.plane..],
                        xstride: ci * grid.plane,
                        grid,
                        ci,
                        offs: &offs,
                        gyt: &gyt[s * grid.oh * grid.ow * co_pad..],
                        co_pad,
                        samples: samples - s,
                        accumulate,
                        part,
                        prefetch: &[],
                    };
                    args(&mut general).with_simd(simd);
                    let WeightGrad {
                        x,
                        xstride,
                        grid,
                        ci,
                        offs,
                        gyt,
                        co_pad,
                        samples,
                        accumulate,
                        part,
                        prefetch,
                    } = args(&mut three);
                    WeightGrad3::<2, 1>(WeightGrad {
                        x,
                        xstride,
                        grid,
                        ci,
                        offs,
                        gyt,
                        co_pad,
                        samples,
                        accumulate,
                        part,
                        prefetch,
                    })
                    .with_simd(simd);
                }
                (general, three)
            }
        }
        let mut ran = vec![];
        for (i, (ci, h, w, p)) in [
            (1, 1, 1, 1),
            (3, 2, 2, 1),
            (5, 4, 3, 1),
            (2, 5, 4, 0),
            (16, 28, 28, 1),
            (7, 9, 23, 1),
        ]
        .into_iter()
        .enumerate()
        {
            let g = Grid::new(h, w, p, p, 3, 3).unwrap();
            let (samples, co_pad) = (3, CO_BLOCK);
            let x = rand(samples * ci * h * w, 40 + i as u64);
            let mut xp = vec![0.0f32; samples * ci * g.plane];
            for s in 0..samples {
                g.pad(&x[s * ci * h * w..], ci, &mut xp[s * ci * g.plane..]);
            }
            let gyt = rand(samples * g.oh * g.ow * co_pad, 50 + i as u64);
            let both = || Both(&g, &xp, ci, &gyt, co_pad, samples);
            let (general, three) = Simd::vectorize(pulp::Scalar, both());
            assert!(general == three, "scalar {ci} {h}x{w}");
            assert!(general.iter().any(|v| *v != 0.0));
            ran.push("scalar");
            #[cfg(target_arch = "x86_64")]
            {
                if let Some(simd) = pulp::x86::V3::try_new() {
                    let (g3, t3) = Simd::vectorize(simd, both());
                    assert!(g3 == t3 && t3 == general, "AVX2 {ci} {h}x{w}");
                    ran.push("avx2");
                }
                if let Some(simd) = pulp::x86::V4::try_new() {
                    let (g4, t4) = Simd::vectorize(simd, both());
                    assert!(g4 == t4 && t4 == general, "AVX-512 {ci} {h}x{w}");
                    ran.push("avx512");
                }
            }
        }
        ran.sort_unstable();
        ran.dedup();
        eprintln!("3x3 weight gradient: checked {ran:?}");
    }

    /// The stride-2 phase split against the zero-padded input read plainly, and the merge
    /// back (written, and added) as its inverse, on odd sizes and paddings 1-3.
    #[test]
    fn phase_split_and_merge_match_plain_loops() {
        for (c, h, w, p) in [
            (1usize, 1usize, 1usize, 1usize),
            (2, 9, 5, 1),
            (3, 28, 28, 1),
            (2, 6, 4, 2),
            (1, 11, 13, 3),
        ] {
            let k = 2 * p + 1;
            let (hp, wp) = ((h + 2 * p).div_ceil(2), (w + 2 * p).div_ceil(2));
            let kq = k.div_ceil(2);
            let g = Grid::new(hp, wp, 0, 0, kq, kq).unwrap();
            let x = rand(c * h * w, 60 + h as u64);
            let mut phases = vec![f32::NAN; 4 * c * g.plane];
            split_phases(&x, c, (h, w, p), &g, &mut phases);
            for (a, b, ch) in (0..4).flat_map(|ab| (0..c).map(move |ch| (ab / 2, ab % 2, ch))) {
                let plane = &phases[((2 * a + b) * c + ch) * g.plane..][..g.plane];
                for (q, &v) in plane.iter().enumerate() {
                    let (r, s) = (q / g.wp, q % g.wp);
                    let (y, xx) = (
                        (2 * r + a) as isize - p as isize,
                        (2 * s + b) as isize - p as isize,
                    );
                    let inside = q < hp * g.wp
                        && (0..h as isize).contains(&y)
                        && (0..w as isize).contains(&xx);
                    let want = if inside {
                        x[(ch * h + y as usize) * w + xx as usize]
                    } else {
                        0.0
                    };
                    assert_eq!(v, want, "{c} {h}x{w} p{p}: phase {a}{b} ch {ch} at {q}");
                }
            }
            let phase = |i: usize| &phases[i * c * g.plane..][..c * g.plane];
            let merge = |dst: &mut [f32], add: bool| {
                let all = [phase(0), phase(1), phase(2), phase(3)];
                merge_phases(all, g.plane, g.wp, c, (h, w, p), dst, add)
            };
            let mut back = vec![f32::NAN; c * h * w];
            merge(&mut back, false);
            assert_eq!(back, x, "{c} {h}x{w} p{p}: merge");
            let mut twice = x.clone();
            merge(&mut twice, true);
            let want: Vec<f32> = x.iter().map(|v| v + v).collect();
            assert_eq!(twice, want, "{c} {h}x{w} p{p}: merge added");
        }
    }

    #[test]
    fn weight_gradient_sums_run_on_across_calls_bit_for_bit() {
        let (ci, co, samples) = (5, 20, 4);
        let g = Grid::new(6, 9, 1, 1, 3, 3).unwrap();
        let cop = padded_channels(co);
        let xp: Vec<f32> = (0..samples)
            .flat_map(|s| {
                let x = rand(ci * g.h * g.w, 10 + s as u64);
                let mut d = vec![0.0f32; ci * g.plane];
                g.pad(&x, ci, &mut d);
                d
            })
            .collect();
        let pixels = g.oh * g.ow;
        let gyt: Vec<f32> = (0..samples)
            .flat_map(|s| {
                let gy = rand(co * pixels, 20 + s as u64);
                let mut d = vec![0.0f32; pixels * cop];
                g.transpose_out(&gy, co, cop, &mut d);
                d
            })
            .collect();
        let (offs, len) = (g.offsets(), ci * 9 * cop);
        let mut whole = vec![0.0f32; len];
        weight_grad_part(
            &g,
            &xp,
            ci * g.plane,
            ci,
            &offs,
            &gyt,
            cop,
            samples,
            false,
            &mut whole,
            &[],
        );
        let mut steps = vec![f32::NAN; len];
        for s in 0..samples {
            weight_grad_part(
                &g,
                &xp[s * ci * g.plane..],
                ci * g.plane,
                ci,
                &offs,
                &gyt[s * pixels * cop..],
                cop,
                1,
                s > 0,
                &mut steps,
                &[],
            );
        }
        assert!(steps == whole);
        // And the sums are the products': against f64 loops over the valid pixels.
        let mut dw = vec![0.0f32; cop * ci * 9];
        add_part(&whole, cop, &mut dw);
        for o in 0..co {
            for k in 0..ci * 9 {
                let (i, t) = (k / 9, k % 9);
                let mut want = 0.0f64;
                for s in 0..samples {
                    for oy in 0..g.oh {
                        for ox in 0..g.ow {
                            let q = oy * g.wp + ox;
                            want += gyt[(s * pixels + oy * g.ow + ox) * cop + o] as f64
                                * xp[s * ci * g.plane + i * g.plane + q + offs[t]] as f64;
                        }
                    }
                }
                let got = dw[o * ci * 9 + k] as f64;
                assert!(
                    (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "{o} {k}: {got} vs {want}"
                );
            }
        }
    }
}
