//! Winograd's minimal filtering for the 3x3 stride-1 products of the direct path: each `m x m`
//! block of output pixels (a tile) from the `(m + 2) x (m + 2)` block of padded input under
//! it, in `(m + 2)²` multiplies per input and output channel instead of `9·m²`. The products
//! use F(4x4, 3x3) (36 multiplies per 16 pixels instead of 144), or F(2x2, 3x3) (16 per 4) on
//! planes under 4x4 and at [`ConvPrecision::Highest`] ([`product_plan`]).
//!
//! Per sample: the zero-padded input planes are transposed to pixel-major (channels
//! innermost); each tile's `V = Bᵀ·d·B` (additions and multiplies by small integers, along the
//! channels) goes to `[tiles][ξ][ci_pad]` (each tile's values together: written position by
//! position across a `[ξ][tiles]` layout, 36 stores 3 KB apart per tile, the transform took
//! 1.5-2.5x as long); `(m + 2)²` products `M[ξ] = V[ξ]·U[ξ]` over the
//! input channels, with `U = G·g·Gᵀ` the transformed kernel (`[ξ][ci][co_pad]`, once per op),
//! on the CPU's widest vectors (register block 4 tiles (F(2x2): 6) x 16 output channels, the
//! tiles' inputs broadcast), into `[tiles][ξ][co_pad]`; each tile's `Y = Aᵀ·M·A` goes to the
//! pixel-major output of [`super::direct`]'s rows kernel. Every multiply-add is fused and
//! every sum runs in the same order on every level, so all levels give the same bits (tested);
//! the results differ from the direct product's by rounding (the transforms': F(2x2) a few
//! units in the last place of the sum of the products' magnitudes, F(4x4), whose transforms
//! have entries up to 8 and down to 1/24, about ten times that).
//!
//! The weight gradient runs in the same domains transposed (F(3x3, 2x2), or F(3x3, 4x4) on
//! planes with at least 32 such tiles, [`grad_tile`]; [`weight_grad_samples`]): each sample's
//! input tiles as above and its `m x m` output-gradient tiles as `A·g·Aᵀ`, their products
//! summed over tiles and samples per position, `Gᵀ·S·G` once at the end: 16 multiplies per 2x2
//! tile and channel pair instead of 36, or 36 per 4x4 tile instead of 144.

use pulp::{Simd, WithSimd};
use rayon::prelude::*;

#[cfg(doc)]
use super::conv::ConvPrecision;
use super::direct::{self, load, store, Grid, Prefetcher};

/// Tiles per register block of the product, F(2x2, 3x3) and F(4x4, 3x3).
const TB2: usize = 6;
const TB4: usize = 4;
/// Output channels per register block of the product.
const CB: usize = 16;
/// Transformed positions of an F(2x2, 3x3) tile (4x4): the weight gradient's domain.
const XI: usize = 16;

/// The tiling of one plane: `th x tw` tiles of `m x m` output pixels (2 or 4), their count
/// rounded up to whole register blocks of `tb` tiles.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tiles {
    m: usize,
    tb: usize,
    th: usize,
    tw: usize,
    padded: usize,
}

impl Tiles {
    /// The F(2x2, 3x3) tiles of `grid`'s output, `None` unless it is a 3x3 kernel on a
    /// stride-1 grid with at least two output rows and columns.
    pub(crate) fn new(grid: &Grid) -> Option<Self> {
        Self::with(grid, 2)
    }

    /// The tiles of `m x m` output pixels (2 or 4) of `grid`'s output (see [`Tiles::new`]).
    pub(crate) fn with(grid: &Grid, m: usize) -> Option<Self> {
        if grid.kh != 3 || grid.kw != 3 || grid.oh < 2 || grid.ow < 2 || !matches!(m, 2 | 4) {
            return None;
        }
        let tb = if m == 4 { TB4 } else { TB2 };
        let (th, tw) = (grid.oh.div_ceil(m), grid.ow.div_ceil(m));
        Some(Self {
            m,
            tb,
            th,
            tw,
            padded: (th * tw).div_ceil(tb) * tb,
        })
    }

    /// Transformed positions per tile, `(m + 2)²`.
    pub(crate) fn xi(&self) -> usize {
        (self.m + 2) * (self.m + 2)
    }

    /// Values of the transformed input of `ci` channels.
    pub(crate) fn input_len(&self, ci: usize) -> usize {
        self.xi() * direct::padded_channels(ci) * self.padded
    }

    /// Values of the pixel-major padded input of `ci` channels on `grid`.
    pub(crate) fn pixels_len(&self, grid: &Grid, ci: usize) -> usize {
        (grid.oh + 2) * grid.wp * direct::padded_channels(ci)
    }

    /// Values of the product for `co_pad` channels.
    pub(crate) fn product_len(&self, co_pad: usize) -> usize {
        self.padded * self.xi() * co_pad
    }
}

/// The output tile `m` (2 or 4) of the forward or input-gradient product of `ci -> co_pad`
/// channels on `grid` in Winograd's domain, or `None` where the direct kernels run: a 3x3
/// stride-1 grid ([`Tiles::new`]) on a machine whose widest vectors are AVX2's, with
/// F(4x4, 3x3) on planes of at least 4x4 pixels (36 multiplies per 16 pixels instead of
/// F(2x2)'s 64; a 4x4 tile on a smaller plane computes mostly padding) and 16 channels or more
/// each way, F(2x2, 3x3) from 32 channels. With `fast` false ([`ConvPrecision::Highest`]) only
/// F(2x2), whose rounding stays within a few units in the last place of the sum of the
/// products' magnitudes, as the direct kernels' does (F(4x4)'s is about ten times that).
///
/// Measured on a Zen 4 (AVX2 only) in ResNet-20's training step, thread time against kernels
/// left unchanged (alternating runs): F(2x2, 3x3) took 22 % less than the rows kernel on the
/// 32- and 64-channel products, F(4x4, 3x3) another 9 % (32 channels, 14x14) and 34 % (64, 7x7)
/// less, and 27 % less than the two-row rows kernel on the 16-channel 28x28 products. AVX-512
/// machines keep their measured kernels. The choice follows the machine, not the level a test
/// pins, so every level computes the same sums (bit-identical on this machine).
pub(crate) fn product_plan(grid: &Grid, ci: usize, co_pad: usize, fast: bool) -> Option<usize> {
    if Tiles::new(grid).is_none() || machine_lanes() != 8 {
        return None;
    }
    if fast && grid.oh >= 4 && grid.ow >= 4 && ci >= 16 && co_pad >= 16 {
        Some(4)
    } else if ci >= 32 && co_pad >= 32 {
        Some(2)
    } else {
        None
    }
}

/// The output-gradient tile `m` of the weight gradient of `ci -> co_pad` channels on `grid` in
/// Winograd's domain ([`weight_grad_samples`]), or `None`: where the products run there
/// ([`product_plan`]; 32+ channels), and on the large planes whose output-gradient tiles are
/// 4x4 ([`grad_tile`]) from 16 channels each way (ResNet-20's 28x28 stage: in the training
/// step on a Zen 4, 34 % less thread time than the grid kernel). With `fast` false, F(3x3, 2x2)
/// only, where the products run in F(2x2).
pub(crate) fn dw_plan(grid: &Grid, ci: usize, co_pad: usize, fast: bool) -> Option<usize> {
    if Tiles::new(grid).is_none() || machine_lanes() != 8 {
        return None;
    }
    let m = if fast { grad_tile(grid) } else { 2 };
    let wide = ci >= 32 && co_pad >= 32;
    (wide || (m == 4 && ci >= 16 && co_pad >= 16)).then_some(m)
}

/// The f32 lanes of the machine's widest vectors (whatever level a test pins).
fn machine_lanes() -> usize {
    static LANES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *LANES.get_or_init(|| pulp::Arch::new().dispatch(direct::Lanes))
}

/// Scratch slots ([`crate::ops::scratch`]) of [`product`]'s buffers.
const SLOTS: [usize; 3] = [4, 5, 6];

/// [`product`] with `m x m` output tiles ([`product_plan`]) and its buffers from this thread's
/// scratch slots.
#[allow(clippy::too_many_arguments)]
pub(crate) fn product_scratch(
    grid: &Grid,
    m: usize,
    x: &[f32],
    plane: usize,
    ci: usize,
    u: &[f32],
    co_pad: usize,
    out: &mut [f32],
    prefetch: &[&[f32]],
) {
    let tiles = Tiles::with(grid, m).expect("checked by product_plan");
    let [mut xt, mut v, mut m] = take_buffers(grid, &tiles, ci, co_pad, 1);
    let bufs = Scratch {
        xt: &mut xt,
        v: &mut v,
        m: &mut m,
    };
    product(grid, &tiles, x, plane, ci, u, co_pad, out, bufs, prefetch);
    give_buffers([xt, v, m]);
}

/// This thread's scratch buffers of [`product`] and [`weight_grad_samples`]: the pixel-major
/// input, the transformed input of `samples` (with [`IB`] values of slack past its end, which a
/// block of input channels past the last reads and drops) and the product (or their
/// transformed output gradients).
fn take_buffers(
    grid: &Grid,
    tiles: &Tiles,
    ci: usize,
    co_pad: usize,
    samples: usize,
) -> [Vec<f32>; 3] {
    use crate::ops::scratch;
    let lens = [
        tiles.pixels_len(grid, ci),
        samples * tiles.input_len(ci) + IB,
        samples * tiles.product_len(co_pad),
    ];
    // At least as long as asked: the product and the weight gradient of a layer take them in
    // turn with different lengths, and each growth would zero-fill the difference again.
    std::array::from_fn(|k| scratch::take_at_least(SLOTS[k], lens[k]))
}

/// Returns [`take_buffers`]' buffers for the next call on this thread.
fn give_buffers(bufs: [Vec<f32>; 3]) {
    for (k, b) in bufs.into_iter().enumerate() {
        crate::ops::scratch::give(SLOTS[k], b);
    }
}

/// The transformed kernel `U = G·g·Gᵀ` of weights `[co][ci][3][3]` for output tiles of
/// `m x m` (2 or 4), laid out `[(m + 2)²][ci][co_pad]` (padding channels zero). With
/// `transpose_flip`, the input gradient's kernel instead (output channel `ci`, input channel
/// `co`, taps reversed), as [`direct::pack_weights`]. F(4x4, 3x3)'s `G` (entries down to 1/24)
/// is applied in f64 and rounded once.
pub(crate) fn pack_weights(
    w: &[f32],
    co: usize,
    ci: usize,
    transpose_flip: bool,
    m: usize,
) -> Vec<f32> {
    assert!(matches!(m, 2 | 4), "tiles of {m}");
    let (n_in, n_out) = if transpose_flip { (co, ci) } else { (ci, co) };
    let out_pad = direct::padded_channels(n_out);
    let xi_n = (m + 2) * (m + 2);
    let stride = n_in * out_pad;
    let mut u = vec![0.0f32; xi_n * stride];
    // Input channels over the threads, each's positions `[ξ][n_out]` (`G·g` once per kernel:
    // per position and entry, the taps' scattered loads took 2 % of a ResNet-20 step), then
    // copied into place.
    let blocks: Vec<Vec<f32>> = (0..n_in)
        .into_par_iter()
        .map(|i| {
            let mut rows = vec![0.0f32; xi_n * n_out];
            for o in 0..n_out {
                let t: [f32; 9] = std::array::from_fn(|k| {
                    if transpose_flip {
                        w[(i * ci + o) * 9 + 8 - k]
                    } else {
                        w[(o * ci + i) * 9 + k]
                    }
                });
                if m == 2 {
                    // `G·g` (columns of taps), then each row's `(G·g)·Gᵀ`.
                    let cols: [[f32; 4]; 3] =
                        std::array::from_fn(|kx| kernel_side([t[kx], t[3 + kx], t[6 + kx]]));
                    for a in 0..4 {
                        let row = kernel_side([cols[0][a], cols[1][a], cols[2][a]]);
                        for (b, &val) in row.iter().enumerate() {
                            rows[(a * 4 + b) * n_out + o] = val;
                        }
                    }
                } else {
                    let col = |kx: usize| [t[kx], t[3 + kx], t[6 + kx]].map(f64::from);
                    let cols: [[f64; 6]; 3] = std::array::from_fn(|kx| kernel_side4(col(kx)));
                    for a in 0..6 {
                        let row = kernel_side4([cols[0][a], cols[1][a], cols[2][a]]);
                        for (b, &val) in row.iter().enumerate() {
                            rows[(a * 6 + b) * n_out + o] = val as f32;
                        }
                    }
                }
            }
            rows
        })
        .collect();
    for (i, rows) in blocks.iter().enumerate() {
        for (xi, row) in rows.chunks_exact(n_out).enumerate() {
            u[xi * stride + i * out_pad..][..n_out].copy_from_slice(row);
        }
    }
    u
}

/// `G·v` for a column `v` of 3 taps, F(2x2, 3x3).
fn kernel_side(v: [f32; 3]) -> [f32; 4] {
    [
        v[0],
        (v[0] + v[1] + v[2]) * 0.5,
        (v[0] - v[1] + v[2]) * 0.5,
        v[2],
    ]
}

/// `G·v` for a column `v` of 3 taps, F(4x4, 3x3) (interpolation points 0, ±1, ±2 and
/// infinity).
fn kernel_side4(v: [f64; 3]) -> [f64; 6] {
    let (sixth, twelfth, twenty_fourth) = (1.0 / 6.0, 1.0 / 12.0, 1.0 / 24.0);
    [
        v[0] * 0.25,
        -(v[0] + v[1] + v[2]) * sixth,
        -(v[0] - v[1] + v[2]) * sixth,
        v[0] * twenty_fourth + v[1] * twelfth + v[2] * sixth,
        v[0] * twenty_fourth - v[1] * twelfth + v[2] * sixth,
        v[2],
    ]
}

/// Scratch of [`product`]: the pixel-major input ([`Tiles::pixels_len`]), the transformed
/// input ([`Tiles::input_len`]) and the product ([`Tiles::product_len`]).
pub(crate) struct Scratch<'a> {
    pub xt: &'a mut [f32],
    pub v: &'a mut [f32],
    pub m: &'a mut [f32],
}

/// `grid`'s 3x3 product of `ci` zero-padded input planes (`plane` apart) with the transformed
/// kernel `u` ([`pack_weights`]) into the pixel-major `out` (`[oh·ow][co_pad]`), the layout of
/// [`direct::forward_rows`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn product(
    grid: &Grid,
    tiles: &Tiles,
    x: &[f32],
    plane: usize,
    ci: usize,
    u: &[f32],
    co_pad: usize,
    out: &mut [f32],
    scratch: Scratch,
    prefetch: &[&[f32]],
) {
    assert!(co_pad.is_multiple_of(CB), "{co_pad} channels");
    assert_eq!(u.len(), tiles.xi() * ci * co_pad, "weights");
    assert!(ci == 0 || x.len() >= (ci - 1) * plane + (grid.oh + 2) * grid.wp);
    assert!(out.len() >= grid.oh * grid.ow * co_pad, "output too short");
    let Scratch { xt, v, m } = scratch;
    let (xt, v, m) = (
        &mut xt[..tiles.pixels_len(grid, ci)],
        &mut v[..tiles.input_len(ci)],
        &mut m[..tiles.product_len(co_pad)],
    );
    direct::dispatch_timed(
        "winograd",
        [ci, co_pad, grid.oh * grid.ow, 9],
        Product {
            grid,
            tiles,
            x,
            plane,
            ci,
            u,
            co_pad,
            out,
            v,
            m,
            xt,
            prefetch,
        },
    )
}

struct Product<'a> {
    grid: &'a Grid,
    tiles: &'a Tiles,
    x: &'a [f32],
    plane: usize,
    ci: usize,
    u: &'a [f32],
    co_pad: usize,
    out: &'a mut [f32],
    v: &'a mut [f32],
    m: &'a mut [f32],
    xt: &'a mut [f32],
    prefetch: &'a [&'a [f32]],
}

impl WithSimd for Product<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Self {
            grid,
            tiles,
            x,
            plane,
            ci,
            u,
            co_pad,
            out,
            v,
            m,
            xt,
            prefetch,
        } = self;
        let ci_pad = direct::padded_channels(ci);
        let n = tiles.input_len(ci);
        transformed_input(simd, grid, tiles, (x, plane), ci, xt, &mut v[..n], true);
        let steps = tiles.xi() * (co_pad / CB) * (tiles.padded / tiles.tb);
        let mut pf = Prefetcher::new(prefetch, steps);
        multiply(simd, tiles, v, ci, ci_pad, u, co_pad, m, &mut pf);
        output_tiles(simd, grid, tiles, m, co_pad, out);
    }
}

/// The transformed input `v` ([`input_tiles`]) of `ci` zero-padded planes (`x`, `plane`
/// apart), through their pixel-major copy `xt` (`[hp·wp][ci_pad]`, padding channels zero),
/// tile-major (`v[tile][ξ][ci_pad]`, the product's) or not (`v[ξ][tile][ci_pad]`, the weight
/// gradient's).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn transformed_input<S: Simd>(
    simd: S,
    grid: &Grid,
    tiles: &Tiles,
    (x, plane): (&[f32], usize),
    ci: usize,
    xt: &mut [f32],
    v: &mut [f32],
    tile_major: bool,
) {
    let ci_pad = direct::padded_channels(ci);
    let pixels = (grid.oh + 2) * grid.wp;
    direct::transpose_copy(simd, (x, plane), (&mut *xt, ci_pad), (ci, pixels));
    let strides = if tile_major {
        (ci_pad, tiles.xi() * ci_pad)
    } else {
        (tiles.padded * ci_pad, ci_pad)
    };
    if tiles.m == 4 {
        input_tiles4(simd, grid, tiles, xt, ci_pad, v, strides);
    } else {
        input_tiles(simd, grid, tiles, xt, ci_pad, v, strides);
    }
}

/// Zeroes the transformed input of the padding tiles (past the plane's `th·tw`), each
/// position's `ci_pad` values at `ξ·xs + t·ts`.
fn zero_padding_tiles(tiles: &Tiles, ci_pad: usize, v: &mut [f32], (xs, ts): (usize, usize)) {
    for t in tiles.th * tiles.tw..tiles.padded {
        for xi in 0..tiles.xi() {
            v[xi * xs + t * ts..][..ci_pad].fill(0.0);
        }
    }
}

/// F(4x4, 3x3)'s `V = Bᵀ·d·B` of every 6x6 input tile (4 output pixels apart) of the
/// pixel-major padded input `x` into `v` (`ξ` of 36), as [`input_tiles`]. In fused multiply-adds
/// from registers; the 36 values between the two passes are more than the registers, so they
/// live in one array written before it is read (zero-filling it per tile and vector was a
/// memset each time, 20 % of this function's time).
#[inline(always)]
fn input_tiles4<S: Simd>(
    simd: S,
    grid: &Grid,
    tiles: &Tiles,
    x: &[f32],
    ci_pad: usize,
    v: &mut [f32],
    (xs, ts): (usize, usize),
) {
    let lanes = S::F32_LANES;
    let (hp, wp) = (grid.oh + 2, grid.wp);
    let Tiles { th, tw, .. } = *tiles;
    let zero = simd.splat_f32s(0.0);
    // Every value written before it is read; zero-filled once here, not per tile and vector
    // (36 vectors, more than the registers: a memset each time).
    let mut e = [[zero; 6]; 6];
    for ty in 0..th {
        for tx in 0..tw {
            let t = ty * tw + tx;
            let base = t * ts;
            let inside = 4 * ty + 6 <= hp && 4 * tx + 6 <= wp;
            for c in (0..ci_pad).step_by(lanes) {
                // Bᵀ·d down each column, then ·B along the rows.
                for (l, el) in e.iter_mut().enumerate() {
                    let col = 4 * tx + l;
                    let mut d = [zero; 6];
                    for (k, dk) in d.iter_mut().enumerate() {
                        let r = 4 * ty + k;
                        if inside || (r < hp && col < wp) {
                            *dk = load::<S>(&x[(r * wp + col) * ci_pad + c..]);
                        }
                    }
                    *el = input_side4(simd, d);
                }
                for a in 0..6 {
                    let row = std::array::from_fn(|l| e[l][a]);
                    for (b, val) in input_side4(simd, row).into_iter().enumerate() {
                        store::<S>(&mut v[(a * 6 + b) * xs + base + c..], val);
                    }
                }
            }
        }
    }
    zero_padding_tiles(tiles, ci_pad, v, (xs, ts));
}

/// `Bᵀ·d` of F(4x4, 3x3) for a column `d` of 6 values (rows of Bᵀ: `[4 0 -5 0 1 0]`,
/// `[0 -4 -4 1 1 0]`, `[0 4 -4 -1 1 0]`, `[0 -2 -1 2 1 0]`, `[0 2 -1 -2 1 0]`,
/// `[0 4 0 -5 0 1]`), in fused multiply-adds.
#[inline(always)]
fn input_side4<S: Simd>(simd: S, d: [S::f32s; 6]) -> [S::f32s; 6] {
    let c = |v: f32| simd.splat_f32s(v);
    let t0 = simd.mul_add_f32s(c(-4.0), d[2], d[4]);
    let t1 = simd.mul_add_f32s(c(-4.0), d[1], d[3]);
    let t2 = simd.sub_f32s(d[4], d[2]);
    let t3 = simd.mul_f32s(c(2.0), simd.sub_f32s(d[3], d[1]));
    [
        simd.mul_add_f32s(c(4.0), d[0], simd.mul_add_f32s(c(-5.0), d[2], d[4])),
        simd.add_f32s(t0, t1),
        simd.sub_f32s(t0, t1),
        simd.add_f32s(t2, t3),
        simd.sub_f32s(t2, t3),
        simd.mul_add_f32s(c(4.0), d[1], simd.mul_add_f32s(c(-5.0), d[3], d[5])),
    ]
}

/// `V = Bᵀ·d·B` of every tile of the pixel-major padded input `x` (`[hp·wp][ci_pad]`) into
/// `v`, position `ξ` of tile `t` at `ξ·xs + t·ts` (strides in values: `[ξ][tile][ci_pad]` or
/// `[tile][ξ][ci_pad]`), along the channels; rows and columns past the padded plane read as
/// zero; the padding tiles are zero.
#[inline(always)]
fn input_tiles<S: Simd>(
    simd: S,
    grid: &Grid,
    tiles: &Tiles,
    x: &[f32],
    ci_pad: usize,
    v: &mut [f32],
    (xs, ts): (usize, usize),
) {
    let lanes = S::F32_LANES;
    let (hp, wp) = (grid.oh + 2, grid.wp);
    let Tiles { th, tw, .. } = *tiles;
    let zero = simd.splat_f32s(0.0);
    // Every value written before it is read (zero-filled once, as in input_tiles4).
    let (mut d, mut e) = ([[zero; 4]; 4], [[zero; 4]; 4]);
    for ty in 0..th {
        for tx in 0..tw {
            let t = ty * tw + tx;
            let base = t * ts;
            let inside = 2 * ty + 3 < hp && 2 * tx + 3 < wp;
            for c in (0..ci_pad).step_by(lanes) {
                for (k, dk) in d.iter_mut().enumerate() {
                    let r = 2 * ty + k;
                    for (l, dkl) in dk.iter_mut().enumerate() {
                        let col = 2 * tx + l;
                        *dkl = if inside || (r < hp && col < wp) {
                            load::<S>(&x[(r * wp + col) * ci_pad + c..])
                        } else {
                            zero
                        };
                    }
                }
                // Bᵀ·d down the rows, then ·B along them.
                for l in 0..4 {
                    e[0][l] = simd.sub_f32s(d[0][l], d[2][l]);
                    e[1][l] = simd.add_f32s(d[1][l], d[2][l]);
                    e[2][l] = simd.sub_f32s(d[2][l], d[1][l]);
                    e[3][l] = simd.sub_f32s(d[1][l], d[3][l]);
                }
                for (a, ea) in e.iter().enumerate() {
                    let vals = [
                        simd.sub_f32s(ea[0], ea[2]),
                        simd.add_f32s(ea[1], ea[2]),
                        simd.sub_f32s(ea[2], ea[1]),
                        simd.sub_f32s(ea[1], ea[3]),
                    ];
                    for (b, &val) in vals.iter().enumerate() {
                        store::<S>(&mut v[(a * 4 + b) * xs + base + c..], val);
                    }
                }
            }
        }
    }
    zero_padding_tiles(tiles, ci_pad, v, (xs, ts));
}

/// `m[tile][ξ][co] = Σ_i v[tile][ξ][i]·u[ξ][i][co]`, over `i` in order, fused multiply-adds.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn multiply<S: Simd>(
    simd: S,
    tiles: &Tiles,
    v: &[f32],
    ci: usize,
    ci_pad: usize,
    u: &[f32],
    co_pad: usize,
    m: &mut [f32],
    pf: &mut Prefetcher,
) {
    let cv = CB / S::F32_LANES;
    let args = (tiles, v, ci, ci_pad, u, co_pad);
    match (cv, tiles.tb) {
        (1, TB4) => multiply_block::<S, 1, TB4>(simd, args, m, pf),
        (1, _) => multiply_block::<S, 1, TB2>(simd, args, m, pf),
        (2, TB4) => multiply_block::<S, 2, TB4>(simd, args, m, pf),
        (2, _) => multiply_block::<S, 2, TB2>(simd, args, m, pf),
        (4, TB4) => multiply_block::<S, 4, TB4>(simd, args, m, pf),
        (4, _) => multiply_block::<S, 4, TB2>(simd, args, m, pf),
        (_, TB4) => multiply_block::<S, 16, TB4>(simd, args, m, pf),
        _ => multiply_block::<S, 16, TB2>(simd, args, m, pf),
    }
}

/// [`multiply`]'s operands: the tiles, the transformed input and its channels (and padded),
/// the transformed kernel and its padded output channels.
type Operands<'a> = (&'a Tiles, &'a [f32], usize, usize, &'a [f32], usize);

/// [`multiply`] on register blocks of `TB` tiles x `CV` vectors of output channels.
#[inline(always)]
fn multiply_block<S: Simd, const CV: usize, const TB: usize>(
    simd: S,
    (tiles, v, ci, ci_pad, u, co_pad): Operands,
    m: &mut [f32],
    pf: &mut Prefetcher,
) {
    let lanes = S::F32_LANES;
    let xi_n = tiles.xi();
    debug_assert_eq!(tiles.tb, TB);
    for xi in 0..xi_n {
        let ux = &u[xi * ci * co_pad..][..ci * co_pad];
        for c0 in (0..co_pad).step_by(CB) {
            // The transformed input is tile-major: `v[tile][ξ][ci_pad]`.
            for (blk, vb) in v.chunks_exact(TB * xi_n * ci_pad).enumerate() {
                pf.step();
                let rows: [&[f32]; TB] =
                    std::array::from_fn(|t| &vb[(t * xi_n + xi) * ci_pad..][..ci]);
                let mut acc = [[simd.splat_f32s(0.0); CV]; TB];
                for (i, uw) in ux.chunks_exact(co_pad).enumerate() {
                    let uw = &uw[c0..][..CB];
                    let mut uv = [simd.splat_f32s(0.0); CV];
                    for (c, w) in uv.iter_mut().enumerate() {
                        *w = load::<S>(&uw[c * lanes..]);
                    }
                    for (a, row) in acc.iter_mut().zip(&rows) {
                        let b = simd.splat_f32s(row[i]);
                        for (av, &w) in a.iter_mut().zip(&uv) {
                            *av = simd.mul_add_f32s(w, b, *av);
                        }
                    }
                }
                for (t, a) in acc.iter().enumerate() {
                    let dst = &mut m[((blk * TB + t) * xi_n + xi) * co_pad + c0..][..CB];
                    for (c, &av) in a.iter().enumerate() {
                        store::<S>(&mut dst[c * lanes..], av);
                    }
                }
            }
        }
    }
}

/// `Y = Aᵀ·M·A` of every tile into the pixel-major `out`, the pixels inside the plane only.
#[inline(always)]
fn output_tiles<S: Simd>(
    simd: S,
    grid: &Grid,
    tiles: &Tiles,
    m: &[f32],
    co_pad: usize,
    out: &mut [f32],
) {
    if tiles.m == 4 {
        return output_tiles4(simd, grid, tiles, m, co_pad, out);
    }
    let lanes = S::F32_LANES;
    let (oh, ow) = (grid.oh, grid.ow);
    // Every value written before it is read (zero-filled once, as in input_tiles4).
    let zero = simd.splat_f32s(0.0);
    let (mut g, mut r) = ([zero; XI], [[zero; 4]; 2]);
    for ty in 0..tiles.th {
        for tx in 0..tiles.tw {
            let mt = &m[(ty * tiles.tw + tx) * XI * co_pad..][..XI * co_pad];
            for c in (0..co_pad).step_by(lanes) {
                for (xi, gv) in g.iter_mut().enumerate() {
                    *gv = load::<S>(&mt[xi * co_pad + c..]);
                }
                // Aᵀ·M down the rows, then ·A along them.
                for b in 0..4 {
                    r[0][b] = simd.add_f32s(simd.add_f32s(g[b], g[4 + b]), g[8 + b]);
                    r[1][b] = simd.sub_f32s(simd.sub_f32s(g[4 + b], g[8 + b]), g[12 + b]);
                }
                for (p, r) in r.iter().enumerate() {
                    let oy = 2 * ty + p;
                    if oy >= oh {
                        continue;
                    }
                    let y0 = simd.add_f32s(simd.add_f32s(r[0], r[1]), r[2]);
                    let y1 = simd.sub_f32s(simd.sub_f32s(r[1], r[2]), r[3]);
                    let ox = 2 * tx;
                    store::<S>(&mut out[(oy * ow + ox) * co_pad + c..], y0);
                    if ox + 1 < ow {
                        store::<S>(&mut out[(oy * ow + ox + 1) * co_pad + c..], y1);
                    }
                }
            }
        }
    }
}

/// F(4x4, 3x3)'s `Y = Aᵀ·M·A` of every tile (`M` of 6x6) into the pixel-major `out`, the
/// pixels inside the plane only, as [`output_tiles`].
#[inline(always)]
fn output_tiles4<S: Simd>(
    simd: S,
    grid: &Grid,
    tiles: &Tiles,
    m: &[f32],
    co_pad: usize,
    out: &mut [f32],
) {
    let lanes = S::F32_LANES;
    let (oh, ow) = (grid.oh, grid.ow);
    // Zero-filled once (as in input_tiles4).
    let mut r = [[simd.splat_f32s(0.0); 6]; 4];
    for ty in 0..tiles.th {
        for tx in 0..tiles.tw {
            let mt = &m[(ty * tiles.tw + tx) * 36 * co_pad..][..36 * co_pad];
            for c in (0..co_pad).step_by(lanes) {
                // Aᵀ·M down each column, then ·A along the rows.
                for b in 0..6 {
                    let col: [S::f32s; 6] =
                        std::array::from_fn(|a| load::<S>(&mt[(a * 6 + b) * co_pad + c..]));
                    for (p, rp) in output_side4(simd, col).into_iter().enumerate() {
                        r[p][b] = rp;
                    }
                }
                for (p, rp) in r.iter().enumerate() {
                    let oy = 4 * ty + p;
                    if oy >= oh {
                        break;
                    }
                    for (q, y) in output_side4(simd, *rp).into_iter().enumerate() {
                        let ox = 4 * tx + q;
                        if ox >= ow {
                            break;
                        }
                        store::<S>(&mut out[(oy * ow + ox) * co_pad + c..], y);
                    }
                }
            }
        }
    }
}

/// `Aᵀ·m` of F(4x4, 3x3) for a column `m` of 6 values (rows of Aᵀ: `[1 1 1 1 1 0]`,
/// `[0 1 -1 2 -2 0]`, `[0 1 1 4 4 0]`, `[0 1 -1 8 -8 1]`), in fused multiply-adds.
#[inline(always)]
fn output_side4<S: Simd>(simd: S, m: [S::f32s; 6]) -> [S::f32s; 4] {
    let c = |v: f32| simd.splat_f32s(v);
    let (a, b) = (simd.add_f32s(m[1], m[2]), simd.sub_f32s(m[1], m[2]));
    let (p, q) = (simd.add_f32s(m[3], m[4]), simd.sub_f32s(m[3], m[4]));
    [
        simd.add_f32s(simd.add_f32s(m[0], a), p),
        simd.mul_add_f32s(c(2.0), q, b),
        simd.mul_add_f32s(c(4.0), p, a),
        simd.add_f32s(simd.mul_add_f32s(c(8.0), q, b), m[5]),
    ]
}

/// Input channels per register block of the weight gradient's sums.
const IB: usize = 6;

/// Samples per call of [`weight_grad_samples`] in the training step's backward pass.
pub(crate) const DW_BATCH: usize = 2;

/// Values of [`weight_grad_samples`]' sums for `ci -> co_pad` channels on tiles of `m x m`:
/// `[(m + 2)²][ci][co_pad]`.
pub(crate) fn sums_len(m: usize, ci: usize, co_pad: usize) -> usize {
    (m + 2) * (m + 2) * ci * co_pad
}

/// The output-gradient tile of [`weight_grad_samples`] on `grid`: 4x4 (F(3x3, 4x4): 36
/// multiplies per 16 output-gradient pixels instead of F(3x3, 2x2)'s 64) where a sample has at
/// least 32 of them, else 2x2. Each sample's pass loads and stores the sums once per block of
/// channels, over 2.25 times the positions with 4x4 tiles: measured on a Zen 4 in the step,
/// 28x28 (49 tiles of 4x4) took 34 % less time than the grid kernel, 14x14 (16) 10-20 % more
/// than 2x2 tiles.
pub(crate) fn grad_tile(grid: &Grid) -> usize {
    if grid.oh.div_ceil(4) * grid.ow.div_ceil(4) >= 32 {
        4
    } else {
        2
    }
}

/// The weight gradient of `samples` consecutive samples in Winograd's F(3x3, m x m) domain
/// (`m` 2 or 4, [`grad_tile`]; written here for 2): with `d` the 4x4 input tile under a 2x2
/// tile `g` of the output gradient (6x6 under 4x4 for `m = 4`), the 3x3
/// `Σ_{p,q} g[p][q]·d[p + ky][q + kx]` is `Gᵀ·[(A·g·Aᵀ) ⊙ (Bᵀ·d·B)]·G`, so the products are
/// summed over the tiles and samples in the transformed domain,
/// `sums[ξ][i][o] (+)= Σ_b Σ_t V_b[ξ][t][i]·(A·g_b·Aᵀ)[ξ][t][o]`, and turned into the 3x3
/// gradient once ([`weight_grad_from_sums`]). `x`: `(inputs, stride, plane)`, sample `b`'s
/// zero-padded input planes at `b·stride`, `plane` apart (as [`product`]); `gyt`:
/// `(gradients, stride)`, each sample's output gradient pixel-major (`[oh·ow][co_pad]`,
/// [`Grid::transpose_out`]); `accumulate`: add onto `sums` (else overwrite). Each sum runs over
/// the samples in order, then their tiles, with fused multiply-adds in registers: the same bits
/// on every level, and the same as one call per sample (tested), the sums loaded and stored
/// once per batch instead of once per sample.
#[allow(clippy::too_many_arguments)]
pub(crate) fn weight_grad_samples(
    grid: &Grid,
    m: usize,
    (x, x_stride, plane): (&[f32], usize, usize),
    ci: usize,
    (gyt, gyt_stride): (&[f32], usize),
    samples: usize,
    co_pad: usize,
    accumulate: bool,
    sums: &mut [f32],
    prefetch: &[&[f32]],
) {
    let tiles = Tiles::with(grid, m).expect("checked by dw_plan");
    assert!(co_pad.is_multiple_of(CB), "{co_pad} channels");
    let pixels = grid.oh * grid.ow * co_pad;
    let reach = (grid.oh + 2) * grid.wp;
    if samples > 0 {
        assert!(
            gyt.len() >= (samples - 1) * gyt_stride + pixels,
            "output gradient"
        );
        assert!(ci == 0 || x.len() >= (samples - 1) * x_stride + (ci - 1) * plane + reach);
    }
    let sums = &mut sums[..sums_len(m, ci, co_pad)];
    let [mut xt, mut v, mut gt] = take_buffers(grid, &tiles, ci, co_pad, samples.max(1));
    direct::dispatch_timed_samples(
        "dw winograd",
        [ci, co_pad, grid.oh * grid.ow, 9],
        samples,
        WeightGradSample {
            grid,
            tiles: &tiles,
            x: (x, x_stride, plane),
            ci,
            gyt: (gyt, gyt_stride),
            samples,
            co_pad,
            accumulate,
            sums,
            xt: &mut xt,
            v: &mut v,
            gt: &mut gt,
            prefetch,
        },
    );
    give_buffers([xt, v, gt]);
}

/// [`weight_grad_samples`] of one sample.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn weight_grad_sample(
    grid: &Grid,
    m: usize,
    x: &[f32],
    plane: usize,
    ci: usize,
    gyt: &[f32],
    co_pad: usize,
    accumulate: bool,
    sums: &mut [f32],
    prefetch: &[&[f32]],
) {
    let (x, gyt) = ((x, 0, plane), (gyt, 0));
    weight_grad_samples(grid, m, x, ci, gyt, 1, co_pad, accumulate, sums, prefetch);
}

struct WeightGradSample<'a> {
    grid: &'a Grid,
    tiles: &'a Tiles,
    /// The inputs, their stride and plane length.
    x: (&'a [f32], usize, usize),
    ci: usize,
    /// The output gradients and their stride.
    gyt: (&'a [f32], usize),
    samples: usize,
    co_pad: usize,
    accumulate: bool,
    sums: &'a mut [f32],
    xt: &'a mut [f32],
    v: &'a mut [f32],
    gt: &'a mut [f32],
    prefetch: &'a [&'a [f32]],
}

impl WithSimd for WeightGradSample<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Self {
            grid,
            tiles,
            x: (x, x_stride, plane),
            ci,
            gyt: (gyt, gyt_stride),
            samples,
            co_pad,
            accumulate,
            sums,
            xt,
            v,
            gt,
            prefetch,
        } = self;
        let ci_pad = direct::padded_channels(ci);
        let (n, gn) = (tiles.input_len(ci), tiles.product_len(co_pad));
        for b in 0..samples {
            let xb = &x[b * x_stride..];
            let vb = &mut v[b * n..][..n];
            transformed_input(simd, grid, tiles, (xb, plane), ci, xt, vb, false);
            let (gb, gtb) = (&gyt[b * gyt_stride..], &mut gt[b * gn..][..gn]);
            if tiles.m == 4 {
                grad_tiles4(simd, grid, tiles, gb, co_pad, gtb);
            } else {
                grad_tiles(simd, grid, tiles, gb, co_pad, gtb);
            }
        }
        v[samples * n..][..IB].fill(0.0);
        let steps = tiles.xi() * (co_pad / CB) * ci.div_ceil(IB);
        let mut pf = Prefetcher::new(prefetch, steps);
        let (acc, pf) = (accumulate, &mut pf);
        let (v, gt) = ((&v[..], n, samples), (&gt[..], gn));
        match CB / S::F32_LANES {
            1 => grad_sums::<S, 1>(simd, tiles, v, ci, ci_pad, gt, co_pad, acc, sums, pf),
            2 => grad_sums::<S, 2>(simd, tiles, v, ci, ci_pad, gt, co_pad, acc, sums, pf),
            4 => grad_sums::<S, 4>(simd, tiles, v, ci, ci_pad, gt, co_pad, acc, sums, pf),
            _ => grad_sums::<S, 16>(simd, tiles, v, ci, ci_pad, gt, co_pad, acc, sums, pf),
        }
    }
}

/// `A·g·Aᵀ` of every 2x2 tile of the pixel-major output gradient `gyt` into
/// `gt[ξ][tile][co_pad]`, along the channels; pixels past the plane read as zero.
#[inline(always)]
fn grad_tiles<S: Simd>(
    simd: S,
    grid: &Grid,
    tiles: &Tiles,
    gyt: &[f32],
    co_pad: usize,
    gt: &mut [f32],
) {
    let lanes = S::F32_LANES;
    let (oh, ow) = (grid.oh, grid.ow);
    let Tiles { th, tw, padded, .. } = *tiles;
    let zero = simd.splat_f32s(0.0);
    for ty in 0..th {
        for tx in 0..tw {
            let t = ty * tw + tx;
            for c in (0..co_pad).step_by(lanes) {
                let mut g = [[zero; 2]; 2];
                for (p, gp) in g.iter_mut().enumerate() {
                    for (q, gpq) in gp.iter_mut().enumerate() {
                        let (oy, ox) = (2 * ty + p, 2 * tx + q);
                        if oy < oh && ox < ow {
                            *gpq = load::<S>(&gyt[(oy * ow + ox) * co_pad + c..]);
                        }
                    }
                }
                // A·g down the rows, then ·Aᵀ along them.
                let (c0, c1) = (
                    grad_side(simd, g[0][0], g[1][0]),
                    grad_side(simd, g[0][1], g[1][1]),
                );
                for a in 0..4 {
                    let row = grad_side(simd, c0[a], c1[a]);
                    for (b, &val) in row.iter().enumerate() {
                        store::<S>(&mut gt[((a * 4 + b) * padded + t) * co_pad + c..], val);
                    }
                }
            }
        }
    }
}

/// F(3x3, 4x4)'s `A·g·Aᵀ` of every 4x4 tile of the pixel-major output gradient `gyt` into
/// `gt[ξ][tile][co_pad]` (`ξ` of 36), as [`grad_tiles`].
#[inline(always)]
fn grad_tiles4<S: Simd>(
    simd: S,
    grid: &Grid,
    tiles: &Tiles,
    gyt: &[f32],
    co_pad: usize,
    gt: &mut [f32],
) {
    let lanes = S::F32_LANES;
    let (oh, ow) = (grid.oh, grid.ow);
    let Tiles { th, tw, padded, .. } = *tiles;
    let zero = simd.splat_f32s(0.0);
    // Zero-filled once (as in input_tiles4).
    let mut e = [[zero; 6]; 4];
    for ty in 0..th {
        for tx in 0..tw {
            let t = ty * tw + tx;
            for c in (0..co_pad).step_by(lanes) {
                // A·g down each column, then ·Aᵀ along the rows.
                for (q, eq) in e.iter_mut().enumerate() {
                    let mut g = [zero; 4];
                    for (p, gp) in g.iter_mut().enumerate() {
                        let (oy, ox) = (4 * ty + p, 4 * tx + q);
                        if oy < oh && ox < ow {
                            *gp = load::<S>(&gyt[(oy * ow + ox) * co_pad + c..]);
                        }
                    }
                    *eq = grad_side4(simd, g);
                }
                for a in 0..6 {
                    let row = grad_side4(simd, [e[0][a], e[1][a], e[2][a], e[3][a]]);
                    for (b, &val) in row.iter().enumerate() {
                        store::<S>(&mut gt[((a * 6 + b) * padded + t) * co_pad + c..], val);
                    }
                }
            }
        }
    }
}

/// `A·g` of F(3x3, 4x4) for a column `g` of 4 values (A = F(4x4, 3x3)'s output transform
/// transposed, rows `[1 0 0 0]`, `[1 1 1 1]`, `[1 -1 1 -1]`, `[1 2 4 8]`, `[1 -2 4 -8]`,
/// `[0 0 0 1]`), in fused multiply-adds.
#[inline(always)]
fn grad_side4<S: Simd>(simd: S, g: [S::f32s; 4]) -> [S::f32s; 6] {
    let c = |v: f32| simd.splat_f32s(v);
    let (even, odd) = (simd.add_f32s(g[0], g[2]), simd.add_f32s(g[1], g[3]));
    let even4 = simd.mul_add_f32s(c(4.0), g[2], g[0]);
    let odd4 = simd.mul_add_f32s(c(8.0), g[3], simd.mul_f32s(c(2.0), g[1]));
    [
        g[0],
        simd.add_f32s(even, odd),
        simd.sub_f32s(even, odd),
        simd.add_f32s(even4, odd4),
        simd.sub_f32s(even4, odd4),
        g[3],
    ]
}

/// `A·(a, b)` for A = `[1 0; 1 1; 1 -1; 0 -1]` (Aᵀ the output transform of [`product`]).
#[inline(always)]
fn grad_side<S: Simd>(simd: S, a: S::f32s, b: S::f32s) -> [S::f32s; 4] {
    [
        a,
        simd.add_f32s(a, b),
        simd.sub_f32s(a, b),
        simd.sub_f32s(simd.splat_f32s(0.0), b),
    ]
}

/// `sums[ξ][i][o] (+)= Σ_t v[ξ][t][i]·gt[ξ][t][o]` over the tiles in order; register block
/// [`IB`] input channels by 16 output channels.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn grad_sums<S: Simd, const CV: usize>(
    simd: S,
    tiles: &Tiles,
    (v, v_stride, samples): (&[f32], usize, usize),
    ci: usize,
    ci_pad: usize,
    (gt, gt_stride): (&[f32], usize),
    co_pad: usize,
    accumulate: bool,
    sums: &mut [f32],
    pf: &mut Prefetcher,
) {
    let lanes = S::F32_LANES;
    let (padded, n) = (tiles.padded, tiles.th * tiles.tw);
    for xi in 0..tiles.xi() {
        let sx = &mut sums[xi * ci * co_pad..][..ci * co_pad];
        for c0 in (0..co_pad).step_by(CB) {
            for i0 in (0..ci).step_by(IB) {
                pf.step();
                let rows = IB.min(ci - i0);
                let mut acc = [[simd.splat_f32s(0.0); CV]; IB];
                if accumulate {
                    for (r, a) in acc.iter_mut().enumerate().take(rows) {
                        for (c, av) in a.iter_mut().enumerate() {
                            *av = load::<S>(&sx[(i0 + r) * co_pad + c0 + c * lanes..]);
                        }
                    }
                }
                for s in 0..samples {
                    let vx = &v[s * v_stride + xi * padded * ci_pad..];
                    let gx = &gt[s * gt_stride + xi * padded * co_pad..][..n * co_pad];
                    for (t, gw) in gx.chunks_exact(co_pad).enumerate() {
                        let gw = &gw[c0..][..CB];
                        let mut gv = [simd.splat_f32s(0.0); CV];
                        for (c, g) in gv.iter_mut().enumerate() {
                            *g = load::<S>(&gw[c * lanes..]);
                        }
                        let xs: &[f32; IB] = vx[t * ci_pad + i0..][..IB].try_into().expect("block");
                        for (a, &xv) in acc.iter_mut().zip(xs) {
                            let b = simd.splat_f32s(xv);
                            for (av, &g) in a.iter_mut().zip(&gv) {
                                *av = simd.mul_add_f32s(g, b, *av);
                            }
                        }
                    }
                }
                for (r, a) in acc.iter().enumerate().take(rows) {
                    for (c, &av) in a.iter().enumerate() {
                        store::<S>(&mut sx[(i0 + r) * co_pad + c0 + c * lanes..], av);
                    }
                }
            }
        }
    }
}

/// The weight gradient `[co][ci][3][3]` from the transformed-domain sums `[ξ][ci][co_pad]`
/// ([`weight_grad_samples`] on output-gradient tiles of `m x m`, [`grad_tile`]): `Gᵀ·S·G` per
/// channel pair (F(3x3, 4x4)'s `G` in f64, rounded once).
pub(crate) fn weight_grad_from_sums(
    sums: &[f32],
    co: usize,
    ci: usize,
    co_pad: usize,
    m: usize,
) -> Vec<f32> {
    let mut dw = vec![0.0f32; co * ci * 9];
    // Gᵀ's rows: [1, 1/2, 1/2, 0], [0, 1/2, -1/2, 0], [0, 1/2, 1/2, 1].
    let back = |s: [f32; 4]| -> [f32; 3] {
        [
            s[0] + 0.5 * s[1] + 0.5 * s[2],
            0.5 * s[1] - 0.5 * s[2],
            0.5 * s[1] + 0.5 * s[2] + s[3],
        ]
    };
    // F(4x4)'s Gᵀ: [1/4, -1/6, -1/6, 1/24, 1/24, 0], [0, -1/6, 1/6, 1/12, -1/12, 0],
    // [0, -1/6, -1/6, 1/6, 1/6, 1].
    let back4 = |s: [f64; 6]| -> [f64; 3] {
        let (sixth, twelfth, twenty_fourth) = (1.0 / 6.0, 1.0 / 12.0, 1.0 / 24.0);
        [
            s[0] * 0.25 - (s[1] + s[2]) * sixth + (s[3] + s[4]) * twenty_fourth,
            (s[2] - s[1]) * sixth + (s[3] - s[4]) * twelfth,
            (s[3] + s[4] - s[1] - s[2]) * sixth + s[5],
        ]
    };
    dw.par_chunks_mut(ci * 9).enumerate().for_each(|(o, dwo)| {
        for (i, d) in dwo.chunks_exact_mut(9).enumerate() {
            let at = |xi: usize| sums[(xi * ci + i) * co_pad + o];
            // Gᵀ down the columns of S (a), then G along the rows (b).
            if m == 4 {
                let cols: [[f64; 3]; 6] = std::array::from_fn(|b| {
                    back4(std::array::from_fn(|a| f64::from(at(a * 6 + b))))
                });
                for ky in 0..3 {
                    let k = back4(std::array::from_fn(|b| cols[b][ky]));
                    for (dk, kv) in d[ky * 3..][..3].iter_mut().zip(k) {
                        *dk = kv as f32;
                    }
                }
            } else {
                let cols: [[f32; 3]; 4] =
                    std::array::from_fn(|b| back([at(b), at(4 + b), at(8 + b), at(12 + b)]));
                for ky in 0..3 {
                    let k = back([cols[0][ky], cols[1][ky], cols[2][ky], cols[3][ky]]);
                    d[ky * 3..][..3].copy_from_slice(&k);
                }
            }
        }
    });
    dw
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::direct::tests::levels;
    use crate::ops::direct::{set_level, Level};
    use crate::rng::Rng;

    /// F(4x4) only when fast, F(2x2) from 32 channels either way, nothing under 16 channels or
    /// off 3x3 stride-1 grids; on machines with wider vectors than AVX2's, nothing at all.
    #[test]
    fn plans_follow_the_precision_the_channels_and_the_machine() {
        let grid = |h: usize, k: usize| Grid::new(h, h, k / 2, k / 2, k, k).unwrap();
        let on = machine_lanes() == 8;
        let pick = |v: Option<usize>| v.filter(|_| on);
        for fast in [true, false] {
            let f4 = if fast { Some(4) } else { None };
            let (g28, g14, g7, g3) = (grid(28, 3), grid(14, 3), grid(7, 3), grid(3, 3));
            assert_eq!(product_plan(&g28, 16, 16, fast), pick(f4));
            assert_eq!(product_plan(&g28, 8, 16, fast), None);
            assert_eq!(product_plan(&g14, 32, 32, fast), pick(f4.or(Some(2))));
            assert_eq!(product_plan(&g7, 64, 64, fast), pick(f4.or(Some(2))));
            assert_eq!(product_plan(&g3, 64, 64, fast), pick(Some(2)));
            assert_eq!(product_plan(&g3, 16, 16, fast), None);
            assert_eq!(product_plan(&grid(28, 5), 32, 32, fast), None);
            // Weight gradient: 4x4 tiles on planes with 32 of them (28x28), else 2x2.
            assert_eq!(dw_plan(&g28, 16, 16, fast), pick(f4));
            assert_eq!(dw_plan(&g28, 32, 32, fast), pick(f4.or(Some(2))));
            assert_eq!(dw_plan(&g14, 32, 32, fast), pick(Some(2)));
            assert_eq!(dw_plan(&g14, 16, 16, fast), None);
            assert_eq!(dw_plan(&g7, 8, 64, fast), None);
        }
        eprintln!(
            "machine lanes {}: Winograd plans {}",
            machine_lanes(),
            if on { "on" } else { "off" }
        );
    }

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut r = Rng::new(seed);
        (0..n).map(|_| r.normal()).collect()
    }

    /// Runs the product with `m x m` tiles for a fresh layout of `ci -> co` channels on `h x w`.
    fn run(g: &Grid, m: usize, xp: &[f32], ci: usize, u: &[f32], cop: usize) -> Vec<f32> {
        let t = Tiles::with(g, m).unwrap();
        let mut xt = vec![f32::NAN; t.pixels_len(g, ci)];
        let mut v = vec![f32::NAN; t.input_len(ci)];
        let mut m = vec![f32::NAN; t.product_len(cop)];
        let mut out = vec![f32::NAN; g.oh * g.ow * cop];
        let scratch = Scratch {
            xt: &mut xt,
            v: &mut v,
            m: &mut m,
        };
        product(g, &t, xp, g.plane, ci, u, cop, &mut out, scratch, &[]);
        out
    }

    /// Both tile sizes, F(2x2, 3x3) and F(4x4, 3x3), with their error bounds relative to the
    /// sum of the products' magnitudes (F(4x4)'s transforms, with entries up to 8 and 1/24,
    /// round more: the largest error here was 2.9e-7 of that sum with F(2x2), 2.0e-6 with
    /// F(4x4)).
    #[test]
    fn winograd_is_the_direct_product_within_rounding_and_the_same_bits_on_every_level() {
        for (m, bound) in [(2, 1e-5), (4, 2e-5)] {
            product_within(m, bound);
        }
    }

    fn product_within(m: usize, bound: f64) {
        let mut ran = vec![];
        let mut worst = 0.0f64;
        for (i, (ci, co, h, w, flip)) in [
            (16, 16, 28, 28, false),
            (32, 32, 14, 14, true),
            (64, 64, 7, 7, false),
            (3, 20, 5, 9, false),
            (17, 5, 13, 6, true),
            (1, 16, 2, 2, false),
            (5, 33, 3, 11, true),
        ]
        .into_iter()
        .enumerate()
        {
            let g = Grid::new(h, w, 1, 1, 3, 3).unwrap();
            let (n_in, n_out) = if flip { (co, ci) } else { (ci, co) };
            let cop = direct::padded_channels(n_out);
            let x = rand(n_in * h * w, i as u64);
            let wt = rand(co * ci * 9, i as u64 + 7);
            let mut xp = vec![0.0f32; n_in * g.plane];
            g.pad(&x, n_in, &mut xp);
            let u = pack_weights(&wt, co, ci, flip, m);
            let reference = run(&g, m, &xp, n_in, &u, cop);
            // Within rounding of the sums in f64: |error| <= 1e-5 · Σ|w·x|.
            let wgt = |o: usize, i: usize, ky: usize, kx: usize| {
                if flip {
                    wt[(i * ci + o) * 9 + (2 - ky) * 3 + (2 - kx)]
                } else {
                    wt[(o * ci + i) * 9 + ky * 3 + kx]
                }
            };
            for oy in 0..h {
                for ox in 0..w {
                    for o in 0..n_out {
                        let (mut sum, mut mag) = (0.0f64, 0.0f64);
                        for i in 0..n_in {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let xv = xp[i * g.plane + (oy + ky) * g.wp + ox + kx];
                                    let p = (wgt(o, i, ky, kx) * xv) as f64;
                                    sum += p;
                                    mag += p.abs();
                                }
                            }
                        }
                        let got = reference[(oy * w + ox) * cop + o] as f64;
                        worst = worst.max((got - sum).abs() / mag);
                        assert!(
                            (got - sum).abs() <= bound * mag + 1e-30,
                            "F{m} {ci}->{co} {h}x{w} flip {flip}: ({oy}, {ox}, {o}) {got} vs {sum}"
                        );
                    }
                }
            }
            // The padding channels stay zero.
            for px in reference.chunks_exact(cop) {
                assert!(px[n_out..].iter().all(|&v| v == 0.0));
            }
            for level in levels() {
                set_level(level);
                let got = run(&g, m, &xp, n_in, &u, cop);
                set_level(Level::Auto);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&got),
                    bits(&reference),
                    "{level:?} F{m} {ci}->{co} {h}x{w}"
                );
                if !ran.contains(&level) {
                    ran.push(level);
                }
            }
        }
        eprintln!(
            "winograd F{m}: checked {ran:?} against the scalar level; largest error {worst:.2e} \
             of the magnitudes' sum"
        );
    }

    /// Both output-gradient tiles, F(3x3, 2x2) and F(3x3, 4x4) (largest errors here 6.4e-8 and
    /// 7.3e-8 of the tile magnitudes).
    #[test]
    fn winograd_weight_gradient_is_the_direct_sums_within_rounding_and_the_same_bits_on_every_level(
    ) {
        for (m, bound) in [(2, 1e-5), (4, 1e-5)] {
            weight_grad_within(m, bound);
        }
    }

    fn weight_grad_within(m: usize, bound: f64) {
        let mut ran = vec![];
        let mut worst = 0.0f64;
        for (i, (n, ci, co, h, w)) in [
            (3, 32, 32, 14, 14),
            (2, 64, 64, 7, 7),
            (3, 33, 20, 5, 9),
            (2, 7, 16, 13, 6),
            (1, 1, 16, 2, 2),
        ]
        .into_iter()
        .enumerate()
        {
            let g = Grid::new(h, w, 1, 1, 3, 3).unwrap();
            let cop = direct::padded_channels(co);
            let x = rand(n * ci * h * w, i as u64 + 20);
            let gy = rand(n * co * h * w, i as u64 + 30);
            let mut xp = vec![0.0f32; n * ci * g.plane];
            let mut gyt = vec![0.0f32; n * h * w * cop];
            for s in 0..n {
                g.pad(
                    &x[s * ci * h * w..][..ci * h * w],
                    ci,
                    &mut xp[s * ci * g.plane..],
                );
                let gs = &gy[s * co * h * w..][..co * h * w];
                g.transpose_out(gs, co, cop, &mut gyt[s * h * w * cop..][..h * w * cop]);
            }
            let run = || {
                let mut sums = vec![f32::NAN; sums_len(m, ci, cop)];
                for s in 0..n {
                    let (xs, gs) = (&xp[s * ci * g.plane..], &gyt[s * h * w * cop..]);
                    weight_grad_sample(&g, m, xs, g.plane, ci, gs, cop, s > 0, &mut sums, &[]);
                }
                weight_grad_from_sums(&sums, co, ci, cop, m)
            };
            // The samples in batches of two (the last alone when `n` is odd).
            let batched = || {
                let mut sums = vec![f32::NAN; sums_len(m, ci, cop)];
                for s in (0..n).step_by(2) {
                    let xs = (&xp[s * ci * g.plane..], ci * g.plane, g.plane);
                    let gs = (&gyt[s * h * w * cop..], h * w * cop);
                    let b = 2.min(n - s);
                    weight_grad_samples(&g, m, xs, ci, gs, b, cop, s > 0, &mut sums, &[]);
                }
                weight_grad_from_sums(&sums, co, ci, cop, m)
            };
            set_level(Level::Scalar);
            let reference = run();
            set_level(Level::Auto);
            // Within rounding of the sums in f64: |error| <= 1e-5 · Σ|g·x|.
            for o in 0..co {
                for c in 0..ci {
                    for t in 0..9 {
                        let (ky, kx) = (t / 3, t % 3);
                        let (mut sum, mut mag) = (0.0f64, 0.0f64);
                        for s in 0..n {
                            for oy in 0..h {
                                for ox in 0..w {
                                    let gv = gy[((s * co + o) * h + oy) * w + ox];
                                    let xv =
                                        xp[(s * ci + c) * g.plane + (oy + ky) * g.wp + ox + kx];
                                    let p = (gv * xv) as f64;
                                    sum += p;
                                    mag += p.abs();
                                }
                            }
                        }
                        // Winograd's rounding scales with the transformed tiles, bounded by
                        // Σ_tiles Σ|g|·Σ|d| (m x m gradient tile, (m + 2)² input tile).
                        let mut tiles_mag = 0.0f64;
                        for s in 0..n {
                            for ty in 0..h.div_ceil(m) {
                                for tx in 0..w.div_ceil(m) {
                                    let mut gm = 0.0f64;
                                    for t in 0..m * m {
                                        let (oy, ox) = (m * ty + t / m, m * tx + t % m);
                                        if oy < h && ox < w {
                                            gm += gy[((s * co + o) * h + oy) * w + ox].abs() as f64;
                                        }
                                    }
                                    let mut dm = 0.0f64;
                                    for r in m * ty..(m * ty + m + 2).min(h + 2) {
                                        for q in m * tx..(m * tx + m + 2).min(w + 2) {
                                            let at = (s * ci + c) * g.plane + r * g.wp + q;
                                            dm += xp[at].abs() as f64;
                                        }
                                    }
                                    tiles_mag += gm * dm;
                                }
                            }
                        }
                        let got = reference[(o * ci + c) * 9 + t] as f64;
                        let scale = mag.max(tiles_mag);
                        worst = worst.max((got - sum).abs() / scale);
                        assert!(
                            (got - sum).abs() <= bound * scale + 1e-30,
                            "F{m} {ci}->{co} {h}x{w}: dw[{o}][{c}][{t}] {got} vs {sum}"
                        );
                    }
                }
            }
            for level in levels() {
                set_level(level);
                let (got, got_batched) = (run(), batched());
                set_level(Level::Auto);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&got),
                    bits(&reference),
                    "{level:?} F{m} {ci}->{co} {h}x{w}"
                );
                assert_eq!(
                    bits(&got_batched),
                    bits(&reference),
                    "{level:?} F{m} {ci}->{co} {h}x{w}, batches of two"
                );
                if !ran.contains(&level) {
                    ran.push(level);
                }
            }
        }
        eprintln!(
            "winograd weight gradient F{m}: checked {ran:?} against the scalar level; largest \
             error {worst:.2e} of the magnitudes"
        );
    }
}
