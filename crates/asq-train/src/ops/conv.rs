//! 2-D convolution on NCHW tensors: stride, zero padding, groups (depthwise included), parallel
//! over samples. Three paths: a direct kernel for stride-1 convolutions with few channels
//! (`ops::direct`, no im2col), direct loops for depthwise ones, and im2col + GEMM for the rest.
//!
//! Weight gradients are reduced over a fixed number of sample chunks combined in order, so the
//! result does not depend on the thread count.

use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2, IxDyn};
use rayon::prelude::*;

use crate::buffers;
use crate::error::{shape, Result};
use crate::graph::{Backward, Graph, Var};
use crate::ops::direct::{self, Grid};
use crate::ops::norm::{self, BnAct, BnTrainOp, Coef};
use crate::ops::scratch;
use crate::ops::winograd;
use crate::Tensor;

/// Geometry of a convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvSpec {
    /// Stride (both directions).
    pub stride: usize,
    /// Zero padding (both sides, both directions).
    pub pad: usize,
    /// Groups: `C_in` and `C_out` split into this many independent blocks (`C_in` = depthwise).
    pub groups: usize,
}

impl Default for ConvSpec {
    fn default() -> Self {
        Self {
            stride: 1,
            pad: 0,
            groups: 1,
        }
    }
}

/// How far the convolutions may trade rounding for speed (as PyTorch's
/// `torch.set_float32_matmul_precision`), set per thread with [`with_conv_precision`].
///
/// Only the 3x3 stride-1 products on machines whose widest vectors are AVX2's differ (the
/// Winograd kernels); everything else computes the same bits either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConvPrecision {
    /// The fastest kernels measured (the default): Winograd F(4x4, 3x3) from 16 channels on
    /// planes of 4x4 pixels or more, whose rounding is about ten times the direct sum's (a few
    /// units in the last place of the sum of the products' magnitudes, ~1e-6 relative). No
    /// accuracy is lost in training (ResNet-20 FP32 and LSQ W4A4 on Fashion-MNIST,
    /// docs/training.md), but a quantizer input on a rounding edge may take the other code than
    /// in PyTorch's float32 run, so a step-by-step comparison with it runs at
    /// [`ConvPrecision::Highest`].
    #[default]
    Fast,
    /// Rounding of the direct sum's order: the direct kernels, or Winograd F(2x2, 3x3) from 32
    /// channels.
    Highest,
}

impl ConvPrecision {
    /// The name the CLI and reports use: `fast` or `highest`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Fast => "fast",
            Self::Highest => "highest",
        }
    }
}

impl std::str::FromStr for ConvPrecision {
    type Err = String;

    /// [`ConvPrecision::name`]'s spellings.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        [Self::Fast, Self::Highest]
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("`{s}`: expected fast or highest"))
    }
}

thread_local! {
    static PRECISION: std::cell::Cell<ConvPrecision> =
        const { std::cell::Cell::new(ConvPrecision::Fast) };
}

/// This thread's [`ConvPrecision`], which the convolutions recorded on it follow (forward and
/// backward).
pub fn conv_precision() -> ConvPrecision {
    PRECISION.with(|p| p.get())
}

/// Runs `f` with this thread's convolutions at `precision`, the previous one restored after
/// (also when `f` panics).
pub fn with_conv_precision<R>(precision: ConvPrecision, f: impl FnOnce() -> R) -> R {
    struct Restore(ConvPrecision);
    impl Drop for Restore {
        fn drop(&mut self) {
            PRECISION.with(|p| p.set(self.0));
        }
    }
    let _restore = Restore(PRECISION.with(|p| p.replace(precision)));
    f()
}

/// Shapes of one convolution call, and the precision ([`conv_precision`]) it was recorded at.
#[derive(Debug, Clone, Copy)]
struct Geo {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    co: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    spec: ConvSpec,
    /// [`ConvPrecision::Fast`].
    fast: bool,
}

impl Geo {
    /// The geometry of input `[n, c, h, w]` and weight `[co, _, kh, kw]` (`sx`, `sw`); the
    /// caller has checked that the kernel fits the padded input.
    fn new(sx: &[usize], sw: &[usize], spec: ConvSpec) -> Self {
        let (n, c, h, w) = (sx[0], sx[1], sx[2], sx[3]);
        let (co, kh, kw) = (sw[0], sw[2], sw[3]);
        Self {
            n,
            c,
            h,
            w,
            co,
            kh,
            kw,
            oh: (h + 2 * spec.pad - kh) / spec.stride + 1,
            ow: (w + 2 * spec.pad - kw) / spec.stride + 1,
            spec,
            fast: conv_precision() == ConvPrecision::Fast,
        }
    }

    fn cg(&self) -> usize {
        self.c / self.spec.groups
    }
    fn cog(&self) -> usize {
        self.co / self.spec.groups
    }
    fn krows(&self) -> usize {
        self.cg() * self.kh * self.kw
    }
    fn opix(&self) -> usize {
        self.oh * self.ow
    }
}

/// Samples per chunk of the deterministic weight-gradient reduction.
const CHUNKS: usize = 16;

/// Most lane sums (`co·ci·taps·16`) for which the direct path's weight gradient runs along the
/// grid: 16 input and output channels, a 3x3 kernel (147 KB).
const GRID_SUMS_MAX: usize = 16 * 16 * 9 * direct::GRID_SUM_LANES;

/// Fewest grid positions for which it does: a 28x28 plane has 864, where it beats the
/// channel-vectorised kernel by 17 % in cache; a 14x14 one 224, where it loses (see
/// [`direct::weight_grad_grid`]).
const GRID_MIN_POSITIONS: usize = 400;

/// Output columns `ox` whose input column `ox·s + kx - p` lies inside `0..w`.
#[inline]
fn valid_cols(geo: &Geo, kx: usize) -> (usize, usize) {
    let (s, p) = (geo.spec.stride, geo.spec.pad);
    // ox·s + kx >= p  and  ox·s + kx - p < w
    let lo = p.saturating_sub(kx).div_ceil(s);
    let hi = if geo.w + p > kx {
        ((geo.w + p - kx - 1) / s + 1).min(geo.ow)
    } else {
        0
    };
    (lo.min(hi), hi)
}

/// `cols[(ci·kh + ky)·kw + kx, off + oy·ow + ox] = x[g·cg + ci, oy·s + ky - p, ox·s + kx - p]`
/// (0 outside), rows of length `ld`: several samples side by side share one GEMM.
fn im2col(x: &[f32], geo: &Geo, group: usize, cols: &mut [f32], ld: usize, off: usize) {
    // Compiled for the CPU's vectors (the stride-2 rows are strided copies the compiler
    // vectorises with shuffles there).
    pulp::Arch::new().dispatch(
        #[inline(always)]
        || im2col_rows(x, geo, group, cols, ld, off),
    )
}

#[inline(always)]
fn im2col_rows(x: &[f32], geo: &Geo, group: usize, cols: &mut [f32], ld: usize, off: usize) {
    let (s, p) = (geo.spec.stride, geo.spec.pad);
    let opix = geo.opix();
    for ci in 0..geo.cg() {
        let plane = &x[(group * geo.cg() + ci) * geo.h * geo.w..][..geo.h * geo.w];
        for ky in 0..geo.kh {
            for kx in 0..geo.kw {
                let row = &mut cols[((ci * geo.kh + ky) * geo.kw + kx) * ld + off..][..opix];
                let (lo, hi) = valid_cols(geo, kx);
                for oy in 0..geo.oh {
                    let iy = (oy * s + ky) as isize - p as isize;
                    let dst = &mut row[oy * geo.ow..(oy + 1) * geo.ow];
                    if iy < 0 || iy as usize >= geo.h || lo >= hi {
                        dst.fill(0.0);
                        continue;
                    }
                    dst[..lo].fill(0.0);
                    dst[hi..].fill(0.0);
                    let src = &plane[iy as usize * geo.w..][..geo.w];
                    let first = lo * s + kx - p;
                    match s {
                        1 => dst[lo..hi].copy_from_slice(&src[first..first + (hi - lo)]),
                        2 => {
                            for (d, pair) in dst[lo..hi].iter_mut().zip(src[first..].chunks(2)) {
                                *d = pair[0];
                            }
                        }
                        _ => {
                            for (d, v) in dst[lo..hi].iter_mut().zip(src[first..].iter().step_by(s))
                            {
                                *d = *v;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Adds `cols` back into the input-shaped `dx` (the adjoint of [`im2col`]).
fn col2im(cols: &[f32], geo: &Geo, group: usize, dx: &mut [f32], ld: usize, off: usize) {
    // Compiled for the CPU's vectors, as [`im2col`].
    pulp::Arch::new().dispatch(
        #[inline(always)]
        || col2im_rows(cols, geo, group, dx, ld, off),
    )
}

#[inline(always)]
fn col2im_rows(cols: &[f32], geo: &Geo, group: usize, dx: &mut [f32], ld: usize, off: usize) {
    let (s, p) = (geo.spec.stride, geo.spec.pad);
    let opix = geo.opix();
    for ci in 0..geo.cg() {
        let plane = &mut dx[(group * geo.cg() + ci) * geo.h * geo.w..][..geo.h * geo.w];
        for ky in 0..geo.kh {
            for kx in 0..geo.kw {
                let row = &cols[((ci * geo.kh + ky) * geo.kw + kx) * ld + off..][..opix];
                let (lo, hi) = valid_cols(geo, kx);
                if lo >= hi {
                    continue;
                }
                for oy in 0..geo.oh {
                    let iy = (oy * s + ky) as isize - p as isize;
                    if iy < 0 || iy as usize >= geo.h {
                        continue;
                    }
                    let dst = &mut plane[iy as usize * geo.w..][..geo.w];
                    let src = &row[oy * geo.ow + lo..oy * geo.ow + hi];
                    let first = lo * s + kx - p;
                    match s {
                        1 => dst[first..first + (hi - lo)]
                            .iter_mut()
                            .zip(src)
                            .for_each(|(d, v)| *d += v),
                        2 => {
                            for (pair, v) in dst[first..].chunks_mut(2).zip(src) {
                                pair[0] += v;
                            }
                        }
                        _ => {
                            for (d, v) in dst[first..].iter_mut().step_by(s).zip(src) {
                                *d += v;
                            }
                        }
                    }
                }
            }
        }
    }
}

fn view<'a>(s: &'a [f32], r: usize, c: usize) -> ArrayView2<'a, f32> {
    ArrayView2::from_shape((r, c), s).expect("sizes computed from the geometry")
}

fn view_mut<'a>(s: &'a mut [f32], r: usize, c: usize) -> ArrayViewMut2<'a, f32> {
    ArrayViewMut2::from_shape((r, c), s).expect("sizes computed from the geometry")
}

/// The bias gradient `[channels]` of an `[n, channels, opix]` output gradient (f64 sums).
fn bias_grad(gy: &[f32], n: usize, channels: usize, opix: usize) -> Tensor {
    let mut db = vec![0.0f64; channels];
    for plane in gy.chunks_exact(opix).take(n * channels).enumerate() {
        db[plane.0 % channels] += plane.1.iter().map(|&v| v as f64).sum::<f64>();
    }
    Tensor::from_shape_vec(IxDyn(&[channels]), db.iter().map(|&v| v as f32).collect())
        .expect("bias")
}

/// Which kernels compute a convolution (forward and backward alike).
enum Path {
    /// im2col + GEMM (the general path, and the reference of the others).
    Gemm,
    /// Direct per-plane loops for depthwise convolutions.
    Depthwise,
    /// The direct stride-1 kernels of `ops::direct` (the backward pass pads the input again:
    /// keeping the forward pass's padded copy cost more memory traffic than it saved).
    Direct,
    /// Stride 2 as stride-1 direct convolutions on the four phases of the padded input (see
    /// [`Phases`]; the backward pass splits the input again).
    Strided,
}

struct ConvOp {
    geo: Geo,
    bias: bool,
    path: Path,
}

/// The operands of a forward pass as flat slices (copied only if not in standard layout) and
/// the bias values; `f` computes the output from them.
fn with_operands<R>(
    g: &Graph,
    x: Var,
    w: Var,
    b: Option<Var>,
    f: impl FnOnce(&[f32], &[f32], Option<&[f32]>) -> R,
) -> R {
    let (xs, ws) = (
        g.value(x).as_standard_layout(),
        g.value(w).as_standard_layout(),
    );
    let bias: Option<Vec<f32>> = b.map(|b| g.value(b).iter().copied().collect());
    f(
        xs.as_slice().expect("standard layout"),
        ws.as_slice().expect("standard layout"),
        bias.as_deref(),
    )
}

/// Where a backward pass puts the input gradient.
enum Dx<'a> {
    /// Not wanted.
    Skip,
    /// A new tensor.
    New,
    /// Added to the gradient the input already has ([`Backward::backward_adding`]); only the
    /// direct paths take it.
    Add(&'a mut [f32]),
}

impl<'a> Dx<'a> {
    /// Where `len` input-gradient values go: a pooled buffer for [`Dx::New`] (not zeroed: both
    /// direct paths write every value), the gradient to add into for [`Dx::Add`], nothing for
    /// [`Dx::Skip`].
    fn target(self, len: usize) -> DxTarget<'a> {
        match self {
            Dx::Skip => DxTarget::Skip,
            Dx::New => DxTarget::New(buffers::take(len)),
            Dx::Add(acc) => DxTarget::Add(acc),
        }
    }
}

/// [`Dx::target`].
enum DxTarget<'a> {
    Skip,
    New(Vec<f32>),
    Add(&'a mut [f32]),
}

impl DxTarget<'_> {
    /// The values to write (or add) into; empty without an input gradient (a zero-length
    /// stand-in still splits the samples into the same chunks).
    fn values(&mut self) -> &mut [f32] {
        match self {
            DxTarget::Skip => &mut [],
            DxTarget::New(v) => v,
            DxTarget::Add(acc) => acc,
        }
    }

    /// The new tensor's values, if one was asked for.
    fn into_new(self) -> Option<Vec<f32>> {
        match self {
            DxTarget::New(v) => Some(v),
            _ => None,
        }
    }
}

impl ConvOp {
    /// The gradients `[dx, dw, (db)]`; `dx` is `None` unless [`Dx::New`].
    fn grads(&self, inputs: &[&Tensor], grad: &Tensor, dx: Dx) -> Vec<Option<Tensor>> {
        let geo = self.geo;
        let (xs, ws, gs) = (
            inputs[0].as_standard_layout(),
            inputs[1].as_standard_layout(),
            grad.as_standard_layout(),
        );
        let [x, w, gy] = [&xs, &ws, &gs].map(|t| t.as_slice().expect("standard layout"));
        let want_dx = matches!(dx, Dx::New);
        let (dx, dw) = match (&self.path, dx) {
            (Path::Depthwise, _) => {
                let (dx, dw) = depthwise_grads(&geo, x, w, gy);
                (want_dx.then_some(dx), dw)
            }
            (Path::Direct, dx) => direct_grads(&geo, x, w, gy, dx, None, None),
            (Path::Strided, dx) => strided_grads(&geo, x, w, gy, dx),
            (Path::Gemm, _) => gemm_grads(&geo, x, w, gy, want_dx),
        };
        let mut out = vec![
            dx.map(|dx| Tensor::from_shape_vec(inputs[0].raw_dim(), dx).expect("input shape")),
            Some(Tensor::from_shape_vec(inputs[1].raw_dim(), dw).expect("weight shape")),
        ];
        if self.bias {
            out.push(Some(bias_grad(gy, geo.n, geo.co, geo.opix())));
        }
        out
    }
}

impl Backward for ConvOp {
    fn backward(&self, inputs: &[&Tensor], out: &Tensor, grad: &Tensor) -> Vec<Option<Tensor>> {
        self.backward_needed(inputs, out, grad, &[true; 3])
    }

    fn backward_needed(
        &self,
        inputs: &[&Tensor],
        _: &Tensor,
        grad: &Tensor,
        needed: &[bool],
    ) -> Vec<Option<Tensor>> {
        let dx = if needed.first().copied().unwrap_or(true) {
            Dx::New
        } else {
            Dx::Skip
        };
        self.grads(inputs, grad, dx)
    }

    /// The direct paths add the input gradient into the one already there (a residual block's
    /// input: the shortcut's gradient comes first), as their last write of each sample.
    fn backward_adding(
        &self,
        inputs: &[&Tensor],
        _: &Tensor,
        grad: &Tensor,
        _: &[bool],
        input: usize,
        acc: &mut Tensor,
    ) -> Option<Vec<Option<Tensor>>> {
        if input != 0 || !matches!(self.path, Path::Direct | Path::Strided) {
            return None;
        }
        let acc = acc.as_slice_mut()?;
        Some(self.grads(inputs, grad, Dx::Add(acc)))
    }

    fn name(&self) -> &'static str {
        match self.path {
            Path::Gemm => "conv (im2col + GEMM)",
            Path::Depthwise => "conv (depthwise)",
            Path::Direct => "conv (direct)",
            Path::Strided => "conv (direct, stride 2)",
        }
    }
}

/// The fixed sample chunks of a backward pass, `(first sample, samples)`, each with its part of
/// `dx` (`in_len` values per sample; empty parts when `dx` is empty, i.e. no input gradient is
/// wanted). The chunking does not depend on the thread count, so neither do the sums.
fn sample_chunks(n: usize, in_len: usize, dx: &mut [f32]) -> Vec<((usize, usize), &mut [f32])> {
    let per_chunk = n.div_ceil(CHUNKS.min(n).max(1)).max(1);
    let chunks = (0..n)
        .step_by(per_chunk)
        .map(move |n0| (n0, per_chunk.min(n - n0)));
    if dx.is_empty() {
        chunks.map(|c| (c, Default::default())).collect()
    } else {
        chunks.zip(dx.chunks_mut(per_chunk * in_len)).collect()
    }
}

/// The element-wise sum of the chunks' partial weight gradients, in chunk order (the partials
/// go back to [`buffers`]: a 64x64x3x3 kernel's 147 KB came from fresh pages every time).
fn sum_in_order(partials: Vec<Vec<f32>>, len: usize) -> Vec<f32> {
    // Each element's sum in chunk order, the elements split over the threads (a 64x64x3x3
    // kernel's 16 partials are 2.4 MB: one thread's pass kept the other waiting).
    const SPLIT: usize = 4096;
    let mut dw = buffers::take(len);
    dw.par_chunks_mut(SPLIT).enumerate().for_each(|(b, d)| {
        d.fill(0.0);
        for p in &partials {
            d.iter_mut().zip(&p[b * SPLIT..]).for_each(|(a, v)| *a += v);
        }
    });
    partials.into_iter().for_each(buffers::give);
    dw
}

/// `(dx, dw)` through im2col + GEMM, weight gradients reduced over fixed sample chunks; no `dx`
/// unless `want_dx`.
fn gemm_grads(
    geo: &Geo,
    x: &[f32],
    w: &[f32],
    gy: &[f32],
    want_dx: bool,
) -> (Option<Vec<f32>>, Vec<f32>) {
    let geo = *geo;
    let (in_len, out_len) = (geo.c * geo.h * geo.w, geo.co * geo.opix());
    let (krows, opix, cog) = (geo.krows(), geo.opix(), geo.cog());
    // Without `dx`, a zero-length stand-in still splits the samples into the same chunks. Each
    // chunk zeroes its own part (col2im adds into it), in parallel.
    let mut dx = if want_dx {
        buffers::take(geo.n * in_len)
    } else {
        Vec::new()
    };
    let partials: Vec<Vec<f32>> = sample_chunks(geo.n, in_len, &mut dx)
        .into_par_iter()
        .map(|((n0, samples), dxc)| {
            dxc.fill(0.0);
            let ld = samples * opix;
            let mut dw = buffers::take_zeroed(w.len());
            let mut cols = scratch::take(0, krows * ld);
            let mut gyb = scratch::take(1, cog * ld);
            for grp in 0..geo.spec.groups {
                for j in 0..samples {
                    let n = n0 + j;
                    im2col(
                        &x[n * in_len..(n + 1) * in_len],
                        &geo,
                        grp,
                        &mut cols,
                        ld,
                        j * opix,
                    );
                    for o in 0..cog {
                        let src = &gy[n * out_len + (grp * cog + o) * opix..][..opix];
                        gyb[o * ld + j * opix..][..opix].copy_from_slice(src);
                    }
                }
                let gyg = view(&gyb, cog, ld);
                let wg = view(&w[grp * cog * krows..][..cog * krows], cog, krows);
                let mut dwg = view_mut(&mut dw[grp * cog * krows..][..cog * krows], cog, krows);
                general_mat_mul(1.0, &gyg, &view(&cols, krows, ld).t(), 1.0, &mut dwg);
                if want_dx {
                    let mut dcols = view_mut(&mut cols, krows, ld);
                    general_mat_mul(1.0, &wg.t(), &gyg, 0.0, &mut dcols);
                    for (j, dxn) in dxc.chunks_mut(in_len).enumerate() {
                        col2im(&cols, &geo, grp, dxn, ld, j * opix);
                    }
                }
            }
            scratch::give(0, cols);
            scratch::give(1, gyb);
            dw
        })
        .collect();
    (want_dx.then_some(dx), sum_in_order(partials, w.len()))
}

/// Convolution of `x` `[N, C, H, W]` with `w` `[C_out, C / groups, KH, KW]` and an optional
/// bias `[C_out]`; output `[N, C_out, OH, OW]`.
pub fn conv2d(g: &mut Graph, x: Var, w: Var, b: Option<Var>, spec: ConvSpec) -> Result<Var> {
    let (sx, sw) = (g.shape(x).to_vec(), g.shape(w).to_vec());
    if sx.len() != 4 || sw.len() != 4 {
        return Err(shape(
            "conv2d",
            format!("input {sx:?} and weight {sw:?} must be 4-D"),
        ));
    }
    let (n, c, h, wd) = (sx[0], sx[1], sx[2], sx[3]);
    let (co, kh, kw) = (sw[0], sw[2], sw[3]);
    if spec.groups == 0
        || spec.stride == 0
        || c % spec.groups != 0
        || co % spec.groups != 0
        || sw[1] != c / spec.groups
    {
        return Err(shape(
            "conv2d",
            format!("input {sx:?}, weight {sw:?}, groups {}", spec.groups),
        ));
    }
    if h + 2 * spec.pad < kh || wd + 2 * spec.pad < kw {
        return Err(shape(
            "conv2d",
            format!("kernel {kh}x{kw} larger than padded input {h}x{wd}"),
        ));
    }
    if let Some(b) = b {
        if g.shape(b) != [co] {
            return Err(shape(
                "conv2d",
                format!("bias {:?} for {co} channels", g.shape(b)),
            ));
        }
    }
    let geo = Geo::new(&sx, &sw, spec);
    let reference = FORCE_IM2COL.with(|f| f.get());
    let depthwise = !reference && geo.spec.groups == c && co == c;
    let direct = !reference && !depthwise && direct_fits(&geo);
    let strided = !reference && !depthwise && Phases::new(&geo).is_some();
    // In training, the direct paths also sum their output planes for a batch norm after them.
    let sums = g.is_training();
    let ((y, plane_sums), path) = with_operands(g, x, w, b, |xv, wv, bias| {
        if depthwise {
            (
                (depthwise_forward(&geo, xv, wv, bias), None),
                Path::Depthwise,
            )
        } else if direct {
            (direct_forward(&geo, xv, wv, bias, sums, None), Path::Direct)
        } else if strided {
            (strided_forward(&geo, xv, wv, bias, sums), Path::Strided)
        } else {
            ((gemm_forward(&geo, xv, wv, bias), None), Path::Gemm)
        }
    });
    let y = Tensor::from_shape_vec(IxDyn(&[n, co, geo.oh, geo.ow]), y).expect("output shape");
    let inputs: Vec<Var> = [x, w].into_iter().chain(b).collect();
    let out = g.record(
        y,
        &inputs,
        ConvOp {
            geo,
            bias: b.is_some(),
            path,
        },
    );
    if let Some(ps) = plane_sums {
        g.set_plane_sums(out, ps);
    }
    Ok(out)
}

/// [`bn_relu_conv2d`]'s output, the batch mean and the biased variance.
pub type BnConv = (Var, Vec<f32>, Vec<f32>);

/// `conv2d(relu(batch_norm(x)), w)` in training as one op, when the convolution takes the
/// direct stride-1 path (else `None`: the caller records the two ops): the batch norm's
/// statistics as [`norm::batch_norm2d_train`]'s, its normalisation and ReLU applied while each
/// sample's input is padded for the kernel, so the normalised activation (a tensor the size of
/// `x`) is neither written nor read back, forward or backward. The same values and gradients,
/// bit for bit, as the separate ops (tested). Returns the output, the batch mean and the biased
/// variance (for the running statistics). No bias: a ResNet block's second convolution.
pub fn bn_relu_conv2d(
    g: &mut Graph,
    x: Var,
    (gamma, beta, eps): (Var, Var, f32),
    w: Var,
    spec: ConvSpec,
) -> Result<Option<BnConv>> {
    let Some(geo) = bn_relu_conv_geo(g, x, g.shape(w), spec) else {
        return Ok(None);
    };
    let c = geo.c;
    if g.shape(gamma) != [c] || g.shape(beta) != [c] {
        return Err(shape(
            "batch_norm2d",
            format!(
                "input {:?}, gamma {:?}, beta {:?}",
                g.shape(x),
                g.shape(gamma),
                g.shape(beta)
            ),
        ));
    }
    let n = geo.n;
    let co = geo.co;
    let (mean, var, inv_std) = norm::batch_stats(g, x, eps);
    let coef = norm::normalise_coef(&mean, &inv_std, g.value(gamma), g.value(beta));
    let (y, sums) = {
        let (xs, ws) = (
            g.value(x).as_standard_layout(),
            g.value(w).as_standard_layout(),
        );
        let (xv, wv) = (
            xs.as_slice().expect("standard layout"),
            ws.as_slice().expect("standard layout"),
        );
        direct_forward(&geo, xv, wv, None, true, Some(&coef))
    };
    let y = Tensor::from_shape_vec(IxDyn(&[n, co, geo.oh, geo.ow]), y).expect("output shape");
    let out = g.record(
        y,
        &[x, gamma, beta, w],
        BnReluConvOp {
            geo,
            bn: BnTrainOp {
                mean: mean.clone(),
                inv_std,
                act: BnAct::Relu,
                residual: false,
            },
        },
    );
    if let Some(ps) = sums {
        g.set_plane_sums(out, ps);
    }
    Ok(Some((out, mean, var)))
}

/// Whether [`bn_relu_conv2d`] records one op for input `x` and a weight of shape `w`: in
/// training, on the direct stride-1 path (stride 1, no groups, a kernel larger than 1x1, up to
/// 128 channels).
pub fn bn_relu_conv_fits(g: &Graph, x: Var, w: &[usize], spec: ConvSpec) -> bool {
    bn_relu_conv_geo(g, x, w, spec).is_some()
}

fn bn_relu_conv_geo(g: &Graph, x: Var, sw: &[usize], spec: ConvSpec) -> Option<Geo> {
    let sx = g.shape(x);
    if !g.is_training() || sx.len() != 4 || sw.len() != 4 || spec.groups != 1 || sw[1] != sx[1] {
        return None;
    }
    if spec.stride == 0 || sx[2] + 2 * spec.pad < sw[2] || sx[3] + 2 * spec.pad < sw[3] {
        return None;
    }
    let geo = Geo::new(sx, sw, spec);
    (!FORCE_IM2COL.with(|f| f.get()) && direct_fits(&geo)).then_some(geo)
}

/// [`bn_relu_conv2d`]'s backward: the convolution's gradients with its input rebuilt from `x`
/// while padded, then batch norm + ReLU's from the convolution's input gradient.
struct BnReluConvOp {
    geo: Geo,
    bn: BnTrainOp,
}

impl Backward for BnReluConvOp {
    fn backward(&self, inputs: &[&Tensor], _: &Tensor, grad: &Tensor) -> Vec<Option<Tensor>> {
        let (x, gamma, beta, w) = (inputs[0], inputs[1], inputs[2], inputs[3]);
        let coef = norm::normalise_coef(&self.bn.mean, &self.bn.inv_std, gamma, beta);
        let (xs, ws, gs) = (
            x.as_standard_layout(),
            w.as_standard_layout(),
            grad.as_standard_layout(),
        );
        let [xv, wv, gy] = [&xs, &ws, &gs].map(|t| t.as_slice().expect("standard layout"));
        // Batch norm's gradient sums taken from each sample's `dz` while it is in cache (one
        // pass over `dz` and `x` fewer).
        let mut sums = vec![(0.0f64, 0.0f64); self.geo.n * self.geo.c];
        let bn_sums = Some((&self.bn.mean[..], &mut sums[..]));
        let (dz, dw) = direct_grads(&self.geo, xv, wv, gy, Dx::New, Some(&coef), bn_sums);
        let dz = Tensor::from_shape_vec(x.raw_dim(), dz.expect("asked for")).expect("input shape");
        // Batch norm + ReLU without a residual reads only its input and gradient (the ReLU
        // mask recomputed from the input), not its output: `x` stands in for it.
        let mut grads = self.bn.backward_from(&[x, gamma, beta], x, &dz, Some(sums));
        // Back to the pool, as the graph does with the gradients it is done with (a dropped
        // 6.4 MB buffer costs the next one fresh pages).
        buffers::recycle(dz);
        grads.push(Some(
            Tensor::from_shape_vec(w.raw_dim(), dw).expect("weight shape"),
        ));
        grads
    }

    fn name(&self) -> &'static str {
        "conv (direct, batch norm + ReLU in)"
    }
}

/// im2col + GEMM forward pass, `[N, C_out, OH, OW]` values.
fn gemm_forward(geo: &Geo, xv: &[f32], wv: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let geo = *geo;
    let (n, c, h, wd, co, spec) = (geo.n, geo.c, geo.h, geo.w, geo.co, geo.spec);
    let (in_len, out_len, krows, opix, cog) = (
        c * h * wd,
        co * geo.opix(),
        geo.krows(),
        geo.opix(),
        geo.cog(),
    );
    let mut y = buffers::take(n * out_len);
    let per_chunk = n.div_ceil(CHUNKS.min(n).max(1));
    y.par_chunks_mut(per_chunk * out_len)
        .enumerate()
        .for_each(|(chunk, yc)| {
            let samples = yc.len() / out_len;
            let n0 = chunk * per_chunk;
            let ld = samples * opix;
            let mut cols = scratch::take(0, krows * ld);
            let mut tmp = scratch::take(1, cog * ld);
            for grp in 0..spec.groups {
                for j in 0..samples {
                    im2col(
                        &xv[(n0 + j) * in_len..][..in_len],
                        &geo,
                        grp,
                        &mut cols,
                        ld,
                        j * opix,
                    );
                }
                let wg = view(&wv[grp * cog * krows..][..cog * krows], cog, krows);
                general_mat_mul(
                    1.0,
                    &wg,
                    &view(&cols, krows, ld),
                    0.0,
                    &mut view_mut(&mut tmp, cog, ld),
                );
                for (j, yn) in yc.chunks_mut(out_len).enumerate() {
                    for o in 0..cog {
                        let dst = &mut yn[(grp * cog + o) * opix..][..opix];
                        dst.copy_from_slice(&tmp[o * ld + j * opix..][..opix]);
                        if let Some(bias) = &bias {
                            let bv = bias[grp * cog + o];
                            dst.iter_mut().for_each(|v| *v += bv);
                        }
                    }
                }
            }
            scratch::give(0, cols);
            scratch::give(1, tmp);
        });
    y
}

/// Whether the direct stride-1 kernels take this convolution: stride 1, no groups, a kernel
/// larger than 1x1 with padding below its size (the input gradient is then the same kernel on
/// the padded output gradient), and channel counts where im2col + GEMM spends its time copying
/// (up to 128; measured on ResNet-20's 16-64).
fn direct_fits(geo: &Geo) -> bool {
    geo.spec.stride == 1
        && geo.spec.groups == 1
        && geo.kh * geo.kw > 1
        && geo.spec.pad < geo.kh
        && geo.spec.pad < geo.kw
        && geo.c <= 128
        && geo.co <= 128
}

/// The forward grid of a direct convolution.
fn forward_grid(geo: &Geo) -> Grid {
    let p = geo.spec.pad;
    Grid::new(geo.h, geo.w, p, p, geo.kh, geo.kw).expect("checked by conv2d")
}

/// Sample `n` of a batch with `len` values per sample, empty past the end.
fn sample(v: &[f32], n: usize, len: usize) -> &[f32] {
    v.get(n * len..(n + 1) * len).unwrap_or(&[])
}

/// What a backward pass prefetches during a sample's weight gradient: sample `n`'s output
/// gradient, and its input too when no input gradient's kernel will have fetched it.
fn next_operands<'a>(
    (gy, out_len): (&'a [f32], usize),
    (x, in_len): (&'a [f32], usize),
    n: usize,
    with_input: bool,
) -> [&'a [f32]; 2] {
    let input = if with_input {
        sample(x, n, in_len)
    } else {
        &[]
    };
    [sample(gy, n, out_len), input]
}

/// One sample's index, output, input and plane sums in [`per_sample_forward`].
type Operands<'a> = (usize, ((&'a mut [f32], &'a [f32]), &'a mut [(f64, f64)]));

/// The forward pass of the direct paths, per sample in parallel: `prepare` lays the sample's
/// input out in a per-thread buffer of `len` values, `product` computes the output channels on
/// `grid` from it, and the valid part goes to the output with the bias. With `sums`, also each
/// output plane's `(Σ y, Σ y²)` (see [`Graph::set_plane_sums`]), taken while it is in cache.
///
/// `product` also gets memory to prefetch while it computes (see [`direct::forward_into`]): the
/// next sample's input (the thread's next one unless rayon split the range there) and this
/// sample's output, which the copies around the kernel would otherwise wait for (a 16-channel
/// 28x28 forward on a Xeon, 2 threads: 2.58 -> 2.32 ms).
#[allow(clippy::too_many_arguments)]
fn per_sample_forward(
    geo: &Geo,
    grid: &Grid,
    xv: &[f32],
    len: usize,
    bias: Option<&[f32]>,
    sums: bool,
    prepare: impl Fn(&[f32], &mut [f32]) + Sync,
    (product, pixel_major): (impl Fn(&[f32], &mut [f32], &[&[f32]]) + Sync, bool),
) -> (Vec<f32>, Option<Vec<(f64, f64)>>) {
    let (in_len, out_len) = (geo.c * geo.h * geo.w, geo.co * geo.opix());
    let co_pad = direct::padded_channels(geo.co);
    let mut y = buffers::take(geo.n * out_len);
    let mut plane_sums = vec![(0.0f64, 0.0f64); if sums { geo.n * geo.co } else { 0 }];
    let per_sample = |(n, ((yn, xn), ps)): Operands| {
        let mut xp = scratch::take(0, len);
        let mut tmp = scratch::take(1, co_pad * grid.nq);
        prepare(xn, &mut xp);
        product(&xp, &mut tmp, &[sample(xv, n + 1, in_len), yn]);
        if pixel_major {
            grid.extract_pixels(&tmp, (geo.co, co_pad), yn, bias, false);
        } else {
            grid.extract(&tmp, geo.co, yn, bias);
        }
        if !ps.is_empty() {
            norm::plane_value_sums(yn, geo.opix(), ps);
        }
        scratch::give(0, xp);
        scratch::give(1, tmp);
    };
    let samples = y.par_chunks_mut(out_len).zip(xv.par_chunks(in_len));
    if sums {
        samples
            .zip(plane_sums.par_chunks_mut(geo.co))
            .enumerate()
            .for_each(per_sample);
    } else {
        samples
            .enumerate()
            .for_each(|(n, s)| per_sample((n, (s, &mut []))));
    }
    (y, sums.then_some(plane_sums))
}

/// Forward pass on the direct stride-1 kernels (see [`direct_fits`]), each sample's input
/// padded into a per-thread buffer, through batch norm + ReLU with `act`'s coefficients
/// ([`Grid::pad_bn_relu`]) when given.
fn direct_forward(
    geo: &Geo,
    xv: &[f32],
    wv: &[f32],
    bias: Option<&[f32]>,
    sums: bool,
    act: Option<&[Coef]>,
) -> (Vec<f32>, Option<Vec<(f64, f64)>>) {
    let grid = forward_grid(geo);
    let co_pad = direct::padded_channels(geo.co);
    let wino = winograd::product_plan(&grid, geo.c, co_pad, geo.fast);
    let rows = wino.is_some() || direct::rows_fit(&grid, co_pad);
    let cb = if rows {
        direct::rows_block(co_pad)
    } else {
        grid.co_block()
    };
    let wk = if let Some(m) = wino {
        winograd::pack_weights(wv, geo.co, geo.c, false, m)
    } else {
        direct::pack_weights(wv, geo.co, geo.c, geo.kh * geo.kw, false, cb)
    };
    let offs = grid.offsets();
    let (c, plane) = (geo.c, grid.plane);
    per_sample_forward(
        geo,
        &grid,
        xv,
        geo.c * grid.plane,
        bias,
        sums,
        |xn, xp| match act {
            None => grid.pad(xn, geo.c, xp),
            Some(coef) => grid.pad_bn_relu(xn, geo.c, xp, coef),
        },
        (
            |xp: &[f32], out: &mut [f32], pf: &[&[f32]]| {
                if let Some(m) = wino {
                    winograd::product_scratch(&grid, m, xp, plane, c, &wk, co_pad, out, pf)
                } else if rows {
                    direct::forward_rows(&grid, xp, plane, c, &offs, &wk, co_pad, out, pf)
                } else {
                    direct::forward_into(&grid, false, xp, plane, c, &offs, &wk, out, pf)
                }
            },
            rows,
        ),
    )
}

/// A batch norm's mean per channel and its per-sample gradient sums `[N][C]` to fill
/// ([`norm::relu_grad_sums`]).
type BnSums<'a> = (&'a [f32], &'a mut [(f64, f64)]);

/// `(dx, dw)` on the direct kernels: `dx` (a new tensor, added into the input's gradient, or
/// none: [`Dx`]) is the forward kernel run on the output gradient padded by `k - 1 - pad` with
/// the kernel transposed and flipped; `dw` is reduced over fixed sample chunks in order, as on
/// the GEMM path. With `act`, the convolution's input is `x` through batch norm + ReLU (as in
/// [`direct_forward`]; `dx` is then the gradient w.r.t. that input, and with `bn_sums`
/// `(mean, sums)` each sample's batch norm + ReLU gradient sums of `dx` go to `sums` (`[N][C]`,
/// [`norm::relu_grad_sums`]) while it is in cache).
fn direct_grads(
    geo: &Geo,
    x: &[f32],
    w: &[f32],
    gy: &[f32],
    dx: Dx,
    act: Option<&[Coef]>,
    bn_sums: Option<BnSums>,
) -> (Option<Vec<f32>>, Vec<f32>) {
    let geo = *geo;
    let (taps, in_len, out_len) = (geo.kh * geo.kw, geo.c * geo.h * geo.w, geo.co * geo.opix());
    let fwd = forward_grid(&geo);
    let mut back = Grid::new(
        geo.oh,
        geo.ow,
        geo.kh - 1 - geo.spec.pad,
        geo.kw - 1 - geo.spec.pad,
        geo.kh,
        geo.kw,
    )
    .expect("the transposed kernel fits the padded output gradient");
    debug_assert_eq!((back.oh, back.ow), (geo.h, geo.w));
    // The weight gradient along the grid, its output gradient the input gradient's padded copy,
    // where its lane sums fit in L2 beside the operands (ResNet's 16-channel layers; see
    // [`direct::weight_grad_grid`]), unless Winograd's F(3x3, 4x4) runs there (on AVX2,
    // [`winograd::dw_plan`]).
    let lane_sums = geo.co * geo.c * geo.kh * geo.kw * direct::GRID_SUM_LANES;
    let dw_plan = winograd::dw_plan(&fwd, geo.c, direct::padded_channels(geo.co), geo.fast);
    let on_grid = dw_plan != Some(4)
        && direct::grids_align(&fwd, &back)
        && lane_sums <= GRID_SUMS_MAX
        && fwd.nq >= GRID_MIN_POSITIONS;
    if on_grid {
        direct::align_planes(&mut back);
    }
    let (ci_pad, co_pad) = (
        direct::padded_channels(geo.c),
        direct::padded_channels(geo.co),
    );
    // The input gradient's product along the channels on small planes (as the forward's), or
    // Winograd's where it fits.
    let wino = winograd::product_plan(&back, geo.co, ci_pad, geo.fast);
    let rows = wino.is_some() || direct::rows_fit(&back, ci_pad);
    let cb = if rows {
        direct::rows_block(ci_pad)
    } else {
        back.co_block()
    };
    let wt = if let Some(m) = wino {
        winograd::pack_weights(w, geo.co, geo.c, true, m)
    } else {
        direct::pack_weights(w, geo.co, geo.c, taps, true, cb)
    };
    // The weight gradient in Winograd's domain where it fits (32+ channels, or 16+ on planes
    // with 4x4 tiles).
    let wino_dw = if on_grid { None } else { dw_plan };
    let part_len = if let Some(dw_tile) = wino_dw {
        winograd::sums_len(dw_tile, geo.c, co_pad)
    } else {
        co_pad * geo.c * taps
    };
    let (offs_f, offs_b) = (fwd.offsets(), back.offsets());
    let pixels = geo.oh * geo.ow;
    let mut target = dx.target(geo.n * in_len);
    let add = matches!(target, DxTarget::Add(_));
    let chunks = sample_chunks(geo.n, in_len, target.values());
    // Each chunk's part of the batch norm sums (none without them).
    let (mean, mut bn_rest) = match bn_sums {
        Some((mean, sums)) => (mean, sums),
        None => (&[][..], &mut [][..]),
    };
    let mut bn_parts = Vec::with_capacity(chunks.len());
    for &((_, samples), _) in &chunks {
        let take = (samples * geo.c).min(bn_rest.len());
        let (part, rest) = std::mem::take(&mut bn_rest).split_at_mut(take);
        bn_parts.push(part);
        bn_rest = rest;
    }
    let partials: Vec<Vec<f32>> = chunks
        .into_par_iter()
        .zip(bn_parts)
        .map(|(((n0, samples), dxc), bn_part)| {
            // Sample by sample: the input gradient (when wanted: else `dxc` is empty), then the
            // weight gradient's operands and sums, while the sample's output gradient is still
            // in cache. The weight-gradient sums run on in `part` from one sample to the next.
            let pad_len = geo.c * fwd.plane;
            let mut gp_buf = scratch::take(0, geo.co * back.plane + direct::GRID_SUM_LANES);
            let start = direct::aligned_start(&gp_buf, &back);
            let gp = &mut gp_buf[start..][..geo.co * back.plane];
            let mut tmp = scratch::take(1, ci_pad * back.nq);
            // The Winograd weight gradient takes `batch` samples at a time, their padded
            // inputs and output gradients side by side.
            let batch = if wino_dw.is_some() {
                winograd::DW_BATCH
            } else {
                1
            };
            let gyt_len = pixels * co_pad;
            let mut gyt_buf = scratch::take(2, batch * gyt_len);
            let mut xp_buf = scratch::take(3, batch * pad_len);
            // Overwritten by the first sample's sums (the grid path sums into `sums` instead).
            let mut part = buffers::take(if on_grid { 0 } else { part_len });
            let mut sums = buffers::take_zeroed(if on_grid { lane_sums } else { 0 });
            for j in 0..samples {
                let gyn = &gy[(n0 + j) * out_len..][..out_len];
                let xn = &x[(n0 + j) * in_len..][..in_len];
                // While the input gradient's kernel computes, this sample's input and input
                // gradient come into cache; while the weight gradient's does, the next
                // sample's output gradient (and input, when no input gradient is computed).
                if let Some(dxn) = dxc.chunks_exact_mut(in_len).nth(j) {
                    back.pad(gyn, geo.co, gp);
                    let streams = [xn, &*dxn];
                    if let Some(m) = wino {
                        winograd::product_scratch(
                            &back, m, gp, back.plane, geo.co, &wt, ci_pad, &mut tmp, &streams,
                        );
                        back.extract_pixels(&tmp, (geo.c, ci_pad), dxn, None, add);
                    } else if rows {
                        direct::forward_rows(
                            &back, gp, back.plane, geo.co, &offs_b, &wt, ci_pad, &mut tmp, &streams,
                        );
                        back.extract_pixels(&tmp, (geo.c, ci_pad), dxn, None, add);
                    } else {
                        direct::forward_into(
                            &back, false, gp, back.plane, geo.co, &offs_b, &wt, &mut tmp, &streams,
                        );
                        if add {
                            back.extract_add(&tmp, geo.c, dxn);
                        } else {
                            back.extract(&tmp, geo.c, dxn, None);
                        }
                    }
                    if let (Some(coef), false) = (act, bn_part.is_empty()) {
                        let sums = &mut bn_part[j * geo.c..][..geo.c];
                        norm::relu_grad_sums(dxn, xn, geo.h * geo.w, mean, coef, sums);
                    }
                }
                // This sample's place in the batch.
                let b = j % batch;
                let xp = &mut xp_buf[b * pad_len..][..pad_len];
                match act {
                    None => fwd.pad(xn, geo.c, xp),
                    Some(coef) => fwd.pad_bn_relu(xn, geo.c, xp, coef),
                }
                let streams = next_operands((gy, out_len), (x, in_len), n0 + j + 1, dxc.is_empty());
                if on_grid {
                    if dxc.is_empty() {
                        back.pad(gyn, geo.co, gp);
                    }
                    direct::weight_grad_grid(
                        &fwd, &back, xp, geo.c, &offs_f, gp, geo.co, &mut sums, &streams,
                    );
                    continue;
                }
                let gyt = &mut gyt_buf[b * gyt_len..][..gyt_len];
                fwd.transpose_out(gyn, geo.co, co_pad, gyt);
                if let Some(m) = wino_dw {
                    // The batch's sums once it is full (or the chunk ends), added to the
                    // earlier batches'.
                    if b + 1 == batch || j + 1 == samples {
                        let (xs, gs) = ((&xp_buf[..], pad_len, fwd.plane), (&gyt_buf[..], gyt_len));
                        winograd::weight_grad_samples(
                            &fwd,
                            m,
                            xs,
                            geo.c,
                            gs,
                            b + 1,
                            co_pad,
                            j > b,
                            &mut part,
                            &streams,
                        );
                    }
                    continue;
                }
                direct::weight_grad_part(
                    &fwd,
                    xp,
                    pad_len,
                    geo.c,
                    &offs_f,
                    gyt,
                    co_pad,
                    1,
                    j > 0,
                    &mut part,
                    &streams,
                );
            }
            scratch::give(0, gp_buf);
            scratch::give(1, tmp);
            scratch::give(2, gyt_buf);
            scratch::give(3, xp_buf);
            // The chunk's sums: in the weights' layout off the grid's lanes, else as the
            // kernel left them (`[ci·taps][co_pad]`, transposed once after the chunks' sum).
            if on_grid {
                let mut dwp = buffers::take(w.len());
                direct::reduce_grid_sums(&sums, &mut dwp);
                buffers::give(part);
                buffers::give(sums);
                dwp
            } else {
                buffers::give(sums);
                part
            }
        })
        .collect();
    let dw = if on_grid {
        sum_in_order(partials, w.len())
    } else if let Some(dw_tile) = wino_dw {
        let total = sum_in_order(partials, part_len);
        let dw = winograd::weight_grad_from_sums(&total, geo.co, geo.c, co_pad, dw_tile);
        buffers::give(total);
        dw
    } else {
        let total = sum_in_order(partials, co_pad * geo.c * taps);
        let mut dw = buffers::take(w.len());
        for (k, px) in total.chunks_exact(co_pad).enumerate() {
            for (o, &v) in px[..geo.co].iter().enumerate() {
                dw[o * geo.c * taps + k] = v;
            }
        }
        buffers::give(total);
        dw
    };
    (target.into_new(), dw)
}

/// A stride-2 convolution with an odd `k x k` kernel and padding `(k - 1) / 2` as stride-1
/// direct convolutions: phase `(a, b)` of the zero-padded input holds its pixels `(2i + a,
/// 2j + b)`, and output `(oy, ox)` is the sum over the phases of their `(ky, kx) ≡ (a, b) mod 2`
/// taps at `(oy + ky/2, ox + kx/2)`. So the four phase planes (each a quarter of the input) go
/// through one [`direct::forward_into`] product over all nine taps, each tap's offset into its
/// phase's planes ([`Phases::combined`]): exactly the convolution's multiply-adds, and no
/// im2col copy.
#[derive(Debug, Clone)]
struct Phases {
    /// The phase planes' grid (`ceil((H + 2p) / 2)` rows of `ceil((W + 2p) / 2)`) for the
    /// largest phase kernel, `(k + 1) / 2` square; its output is the convolution's.
    grid: Grid,
    /// Per phase `a·2 + b`: its kernel taps `(ky, kx)`, row-major.
    taps: [Vec<(usize, usize)>; 4],
}

impl Phases {
    /// `None` unless the convolution is one this path takes: stride 2, no groups, an odd
    /// square kernel larger than 1x1 with padding `(k - 1) / 2`, and up to 128 channels.
    fn new(geo: &Geo) -> Option<Self> {
        let (k, p) = (geo.kh, geo.spec.pad);
        if geo.spec.stride != 2
            || geo.spec.groups != 1
            || geo.kw != k
            || k < 3
            || k % 2 == 0
            || p != (k - 1) / 2
            || geo.c > 128
            || geo.co > 128
        {
            return None;
        }
        let (hp, wp) = ((geo.h + 2 * p).div_ceil(2), (geo.w + 2 * p).div_ceil(2));
        let kq = k.div_ceil(2);
        let grid = Grid::new(hp, wp, 0, 0, kq, kq)?;
        if (grid.oh, grid.ow) != (geo.oh, geo.ow) {
            return None;
        }
        let taps = std::array::from_fn(|ph| {
            let (a, b) = (ph / 2, ph % 2);
            (a..k)
                .step_by(2)
                .flat_map(|ky| (b..k).step_by(2).map(move |kx| (ky, kx)))
                .collect()
        });
        Some(Self { grid, taps })
    }

    /// Phase `ph`'s kernel height and width.
    fn size(&self, ph: usize, k: usize) -> (usize, usize) {
        ((k - ph / 2).div_ceil(2), (k - ph % 2).div_ceil(2))
    }

    /// Grid offsets of phase `ph`'s taps.
    fn offsets(&self, ph: usize) -> Vec<usize> {
        let wp = self.grid.wp;
        self.taps[ph]
            .iter()
            .map(|&(ky, kx)| (ky / 2) * wp + kx / 2)
            .collect()
    }

    /// All the taps, phase after phase, and their offsets into one sample's four phase plane
    /// sets (`[4][ci][plane]`): the stride-2 convolution as one stride-1 product whose taps
    /// read different planes.
    fn combined(&self, ci: usize) -> (Vec<(usize, usize)>, Vec<usize>) {
        let set = ci * self.grid.plane;
        let taps = self.taps.iter().flatten().copied().collect();
        let offs = (0..4)
            .flat_map(|ph| self.offsets(ph).into_iter().map(move |o| ph * set + o))
            .collect();
        (taps, offs)
    }

    /// The weights `[co][ci][taps]` of `taps` out of `w` `[co][ci][k][k]`.
    fn weights_of(taps: &[(usize, usize)], w: &[f32], co: usize, ci: usize, k: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(co * ci * taps.len());
        for oi in 0..co * ci {
            out.extend(taps.iter().map(|&(ky, kx)| w[(oi * k + ky) * k + kx]));
        }
        out
    }

    /// Phase `ph`'s weights `[co][ci][taps]` out of `w` `[co][ci][k][k]`.
    fn weights(&self, ph: usize, w: &[f32], co: usize, ci: usize, k: usize) -> Vec<f32> {
        Self::weights_of(&self.taps[ph], w, co, ci, k)
    }

    /// The four phase planes `[4][C][plane]` of one sample's `C x H x W` input.
    fn split(&self, x: &[f32], geo: &Geo, dst: &mut [f32]) {
        let hwp = (geo.h, geo.w, geo.spec.pad);
        direct::split_phases(x, geo.c, hwp, &self.grid, dst)
    }
}

/// Forward pass on the phases (see [`Phases`]), each sample split into a per-thread buffer.
fn strided_forward(
    geo: &Geo,
    xv: &[f32],
    wv: &[f32],
    bias: Option<&[f32]>,
    sums: bool,
) -> (Vec<f32>, Option<Vec<(f64, f64)>>) {
    let ph = Phases::new(geo).expect("checked by conv2d");
    let grid = &ph.grid;
    let k = geo.kh;
    // One product over all the taps (each sum over the input channels, a channel's taps in
    // phase order), not one accumulating pass per phase.
    let (taps, offs) = ph.combined(geo.c);
    let co_pad = direct::padded_channels(geo.co);
    let rows = direct::rows_fit(grid, co_pad);
    let cb = if rows {
        direct::rows_block(co_pad)
    } else {
        grid.co_block()
    };
    let wk = Phases::weights_of(&taps, wv, geo.co, geo.c, k);
    let wk = direct::pack_weights(&wk, geo.co, geo.c, taps.len(), false, cb);
    let (c, plane) = (geo.c, grid.plane);
    per_sample_forward(
        geo,
        grid,
        xv,
        4 * geo.c * grid.plane,
        bias,
        sums,
        |xn, xp| ph.split(xn, geo, xp),
        (
            |xp: &[f32], out: &mut [f32], pf: &[&[f32]]| {
                if rows {
                    direct::forward_rows(grid, xp, plane, c, &offs, &wk, co_pad, out, pf)
                } else {
                    direct::forward_into(grid, false, xp, plane, c, &offs, &wk, out, pf)
                }
            },
            rows,
        ),
    )
}

/// `(dx, dw)` on the phases: each phase's input gradient is its stride-1 kernel's (the forward
/// kernel, transposed and flipped, on the output gradient padded once for the largest phase
/// kernel), the four interleaved back into the input's pixels; the weight gradient is one
/// product over all nine taps on the phase planes (split again from the input), as the forward.
/// `dw` is reduced over fixed sample chunks in order.
fn strided_grads(
    geo: &Geo,
    x: &[f32],
    w: &[f32],
    gy: &[f32],
    dx: Dx,
) -> (Option<Vec<f32>>, Vec<f32>) {
    let geo = *geo;
    let ph = Phases::new(&geo).expect("checked by conv2d");
    let (grid, k, p) = (&ph.grid, geo.kh, geo.spec.pad);
    let (in_len, out_len) = (geo.c * geo.h * geo.w, geo.co * geo.opix());
    let (ci_pad, co_pad) = (
        direct::padded_channels(geo.c),
        direct::padded_channels(geo.co),
    );
    // The input gradient: per phase, its transposed (flipped) kernel of `ka x kb` taps on the
    // output gradient padded by `ka - 1, kb - 1`; all four run on one grid padded for the
    // largest phase kernel (`kq x kq`), a phase's taps shifted by the padding it lacks, so the
    // output gradient is padded once per sample. The weight gradient: the forward offsets.
    struct Back {
        wt: Vec<f32>,
        offs: Vec<usize>,
    }
    let kq = k.div_ceil(2);
    let back = Grid::new(geo.oh, geo.ow, kq - 1, kq - 1, kq, kq)
        .expect("the largest phase kernel fits its padded output gradient");
    // On even planes whose phases fit the rows kernel ([`direct::rows_fit`]: ResNet's 14x14 ->
    // 7x7 transition, on AVX2 the 28x28 -> 14x14 one too), each phase's pixels exactly on it,
    // vectorised along the input channels (49 positions a 7x7 phase instead of the grid's 96,
    // and few-tap phases at the rows kernel's rate); the same sums in the same order, so the
    // same bits (tested). The exact grid starts at the phase's first row and column inside
    // the input (its offsets shifted there).
    let exact = Grid {
        oh: geo.h / 2,
        ow: geo.w / 2,
        ..back
    };
    let on_rows = geo.h.is_multiple_of(2)
        && geo.w.is_multiple_of(2)
        && direct::rows_fit(&exact, ci_pad)
        && !FORCE_GRID_DX.with(|f| f.get());
    let backs: Vec<Back> = (0..4)
        .map(|i| {
            let (ka, kb) = ph.size(i, k);
            let wk = ph.weights(i, w, geo.co, geo.c, k);
            let cb = if on_rows {
                direct::rows_block(ci_pad)
            } else {
                back.co_block()
            };
            let wt = direct::pack_weights(&wk, geo.co, geo.c, ka * kb, true, cb);
            let origin = if on_rows {
                direct::phase_origin(i / 2, p) * back.wp + direct::phase_origin(i % 2, p)
            } else {
                0
            };
            let offs = (0..ka * kb)
                .map(|t| (t / kb + kq - ka) * back.wp + t % kb + kq - kb + origin)
                .collect();
            Back { offs, wt }
        })
        .collect();
    let phase_len = if on_rows {
        exact.oh * exact.ow * ci_pad
    } else {
        ci_pad * back.nq
    };
    let split_len = 4 * geo.c * grid.plane;
    let (taps, offs) = ph.combined(geo.c);
    let mut target = dx.target(geo.n * in_len);
    let add = matches!(target, DxTarget::Add(_));
    let partials: Vec<Vec<f32>> = sample_chunks(geo.n, in_len, target.values())
        .into_par_iter()
        .map(|((n0, samples), dxc)| {
            // Sample by sample: the input gradient phase by phase (when wanted: else `dxc` is
            // empty), then the weight gradient's operands and sums over all the phases' taps at
            // once (running on in `part` from one sample to the next) while the output gradient
            // is in cache.
            let mut part = buffers::take(co_pad * geo.c * taps.len());
            for j in 0..samples {
                let gyn = &gy[(n0 + j) * out_len..][..out_len];
                if let Some(dxn) = dxc.chunks_exact_mut(in_len).nth(j) {
                    let mut gp = scratch::take(0, geo.co * back.plane);
                    let mut tmp = scratch::take(1, 4 * phase_len);
                    back.pad(gyn, geo.co, &mut gp);
                    // As in `direct_grads`: this sample's input and input gradient come into
                    // cache during the first phase's kernel, the next sample's output gradient
                    // during the first weight gradient's.
                    let xn = &x[(n0 + j) * in_len..][..in_len];
                    let streams = [xn, &*dxn];
                    let outs = tmp.chunks_exact_mut(phase_len);
                    for ((i, b), out) in backs.iter().enumerate().zip(outs) {
                        let pf: &[&[f32]] = if i == 0 { &streams } else { &[] };
                        if on_rows {
                            direct::forward_rows(
                                &exact, &gp, back.plane, geo.co, &b.offs, &b.wt, ci_pad, out, pf,
                            );
                        } else {
                            direct::forward_into(
                                &back, false, &gp, back.plane, geo.co, &b.offs, &b.wt, out, pf,
                            );
                        }
                    }
                    // Phase pixel (r, s) is input pixel (2r + a - p, 2s + b - p): the four
                    // phases interleaved back, every input pixel out of exactly one.
                    let phase = |i: usize| &tmp[i * phase_len..][..phase_len];
                    let phases = [phase(0), phase(1), phase(2), phase(3)];
                    if on_rows {
                        direct::merge_phase_pixels(
                            phases,
                            (geo.c, ci_pad),
                            (geo.h, geo.w, p),
                            dxn,
                            add,
                        );
                    } else {
                        direct::merge_phases(
                            phases,
                            back.nq,
                            back.wp,
                            geo.c,
                            (geo.h, geo.w, p),
                            dxn,
                            add,
                        );
                    }
                    scratch::give(0, gp);
                    scratch::give(1, tmp);
                }
                let mut phases = scratch::take(3, split_len);
                let mut gyt = scratch::take(2, geo.opix() * co_pad);
                ph.split(&x[(n0 + j) * in_len..][..in_len], &geo, &mut phases);
                grid.transpose_out(gyn, geo.co, co_pad, &mut gyt);
                let streams = next_operands((gy, out_len), (x, in_len), n0 + j + 1, dxc.is_empty());
                direct::weight_grad_part(
                    grid,
                    &phases,
                    split_len,
                    geo.c,
                    &offs,
                    &gyt,
                    co_pad,
                    1,
                    j > 0,
                    &mut part,
                    &streams,
                );
                scratch::give(2, gyt);
                scratch::give(3, phases);
            }
            // `[ci·taps][co_pad]`, transposed into the weights' layout once after the sum.
            part
        })
        .collect();
    let total = sum_in_order(partials, co_pad * geo.c * taps.len());
    let mut dw = buffers::take_zeroed(w.len());
    for (it, px) in total.chunks_exact(co_pad).enumerate() {
        let (i, (ky, kx)) = (it / taps.len(), taps[it % taps.len()]);
        for (o, &v) in px[..geo.co].iter().enumerate() {
            dw[((o * geo.c + i) * k + ky) * k + kx] = v;
        }
    }
    buffers::give(total);
    (target.into_new(), dw)
}

thread_local! {
    /// Tests only: route every convolution through im2col + GEMM (the reference).
    static FORCE_IM2COL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Tests only: the stride-2 input gradient on the padded phase grids, not on the rows
    /// kernel (to compare the two bit for bit).
    static FORCE_GRID_DX: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The window taps of output row `oy` that fall inside the input: `(ky, iy)` pairs.
fn rows_in(geo: &Geo, oy: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
    let (s, p) = (geo.spec.stride, geo.spec.pad);
    (0..geo.kh).filter_map(move |ky| {
        let iy = (oy * s + ky).checked_sub(p)?;
        (iy < geo.h).then_some((ky, iy))
    })
}

/// `dst[j] (+)= wv · src[first + j·s]` for `j < dst.len()` (an axpy along a row).
#[inline]
fn axpy_row(dst: &mut [f32], src: &[f32], first: usize, s: usize, wv: f32) {
    if s == 1 {
        let len = dst.len();
        for (d, v) in dst.iter_mut().zip(&src[first..first + len]) {
            *d += wv * v;
        }
    } else {
        for (d, v) in dst.iter_mut().zip(src[first..].iter().step_by(s)) {
            *d += wv * v;
        }
    }
}

/// Depthwise convolution (`groups = C_in = C_out`) computed directly, plane by plane: a GEMM per
/// channel would be a 1-row product per group (MobileNetV2 has up to 960 such channels).
fn depthwise_forward(geo: &Geo, xv: &[f32], wv: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let geo = *geo;
    let (hw, opix, taps) = (geo.h * geo.w, geo.opix(), geo.kh * geo.kw);
    let mut y = buffers::take(geo.n * geo.c * opix);
    y.par_chunks_mut(opix).enumerate().for_each(|(plane, yp)| {
        let ch = plane % geo.c;
        yp.fill(bias.map_or(0.0, |b| b[ch]));
        let xp = &xv[plane * hw..(plane + 1) * hw];
        let wc = &wv[ch * taps..(ch + 1) * taps];
        for oy in 0..geo.oh {
            let dst_row = &mut yp[oy * geo.ow..(oy + 1) * geo.ow];
            for (ky, iy) in rows_in(&geo, oy) {
                for kx in 0..geo.kw {
                    let (lo, hi) = valid_cols(&geo, kx);
                    if lo >= hi {
                        continue;
                    }
                    let first = lo * geo.spec.stride + kx - geo.spec.pad;
                    let src = &xp[iy * geo.w..(iy + 1) * geo.w];
                    axpy_row(
                        &mut dst_row[lo..hi],
                        src,
                        first,
                        geo.spec.stride,
                        wc[ky * geo.kw + kx],
                    );
                }
            }
        }
    });
    y
}

/// `(dx, dw)` of the direct depthwise convolution: `dx` plane by plane (the adjoint of the
/// forward axpys), `dw` per channel summed over samples in a fixed order.
fn depthwise_grads(geo: &Geo, x: &[f32], w: &[f32], gy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let geo = *geo;
    let (hw, opix, taps, s, p) = (
        geo.h * geo.w,
        geo.opix(),
        geo.kh * geo.kw,
        geo.spec.stride,
        geo.spec.pad,
    );
    // dx: per plane, scatter every tap of gy back (the adjoint of the forward axpys).
    let mut dx = buffers::take_zeroed(geo.n * geo.c * hw);
    dx.par_chunks_mut(hw).enumerate().for_each(|(plane, dxp)| {
        let ch = plane % geo.c;
        let gp = &gy[plane * opix..(plane + 1) * opix];
        let wc = &w[ch * taps..(ch + 1) * taps];
        for oy in 0..geo.oh {
            let grow = &gp[oy * geo.ow..(oy + 1) * geo.ow];
            for (ky, iy) in rows_in(&geo, oy) {
                let drow = &mut dxp[iy * geo.w..(iy + 1) * geo.w];
                for kx in 0..geo.kw {
                    let (lo, hi) = valid_cols(&geo, kx);
                    if lo >= hi {
                        continue;
                    }
                    let first = lo * s + kx - p;
                    let wv = wc[ky * geo.kw + kx];
                    if s == 1 {
                        for (d, g) in drow[first..first + (hi - lo)].iter_mut().zip(&grow[lo..hi]) {
                            *d += wv * g;
                        }
                    } else {
                        for (d, g) in drow[first..].iter_mut().step_by(s).zip(&grow[lo..hi]) {
                            *d += wv * g;
                        }
                    }
                }
            }
        }
    });
    // dw[ch, tap]: sums over samples in a fixed order (per channel, samples ascending), so
    // the result does not depend on the thread count.
    let mut dw = vec![0.0f32; w.len()];
    dw.par_chunks_mut(taps).enumerate().for_each(|(ch, dwc)| {
        for n in 0..geo.n {
            let plane = n * geo.c + ch;
            let (xp, gp) = (
                &x[plane * hw..(plane + 1) * hw],
                &gy[plane * opix..(plane + 1) * opix],
            );
            for oy in 0..geo.oh {
                let grow = &gp[oy * geo.ow..(oy + 1) * geo.ow];
                for (ky, iy) in rows_in(&geo, oy) {
                    let xrow = &xp[iy * geo.w..(iy + 1) * geo.w];
                    for kx in 0..geo.kw {
                        let (lo, hi) = valid_cols(&geo, kx);
                        if lo >= hi {
                            continue;
                        }
                        let first = lo * s + kx - p;
                        let dot: f32 = if s == 1 {
                            grow[lo..hi]
                                .iter()
                                .zip(&xrow[first..first + (hi - lo)])
                                .map(|(g, v)| g * v)
                                .sum()
                        } else {
                            grow[lo..hi]
                                .iter()
                                .zip(xrow[first..].iter().step_by(s))
                                .map(|(g, v)| g * v)
                                .sum()
                        };
                        dwc[ky * geo.kw + kx] += dot;
                    }
                }
            }
        }
    });
    (dx, dw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check, random};

    /// `conv2(relu(bn(conv1(x))))` with batch norm + ReLU folded into the second convolution:
    /// the separate ops' output, statistics and every gradient, bit for bit (the 28x28 grid
    /// weight gradient, the 7x7 / 14-wide rows kernels, small odd shapes), and the finite
    /// differences on a small one.
    #[test]
    fn batch_norm_relu_folded_into_the_convolution_is_the_separate_ops_bits() {
        let spec = ConvSpec {
            stride: 1,
            pad: 1,
            groups: 1,
        };
        for (n, c, co, h, w, seed) in [
            (2, 16, 16, 28, 28, 1),
            (3, 64, 64, 7, 7, 2),
            (2, 3, 5, 9, 7, 3),
            (2, 20, 50, 7, 14, 4),
        ] {
            let x = random(&[n, c, h, w], seed);
            let w1 = random(&[c, c, 3, 3], seed + 1);
            let gamma = random(&[c], seed + 2);
            let beta = random(&[c], seed + 3);
            let w2 = random(&[co, c, 3, 3], seed + 4);
            let r = random(&[n, co, h, w], seed + 5);
            let run = |fused: bool| {
                let mut g = Graph::new(true);
                let vars: Vec<Var> = [&x, &w1, &gamma, &beta, &w2]
                    .iter()
                    .map(|t| g.input_with_grad((*t).clone()))
                    .collect();
                // The first convolution attaches its plane sums, as in a ResNet block.
                let y1 = conv2d(&mut g, vars[0], vars[1], None, spec).unwrap();
                let (y, mean, var) = if fused {
                    bn_relu_conv2d(&mut g, y1, (vars[2], vars[3], 1e-5), vars[4], spec)
                        .unwrap()
                        .expect("the direct path")
                } else {
                    let (z, mean, var) = norm::batch_norm2d_train_act(
                        &mut g,
                        y1,
                        vars[2],
                        vars[3],
                        1e-5,
                        None,
                        BnAct::Relu,
                    )
                    .unwrap();
                    (conv2d(&mut g, z, vars[4], None, spec).unwrap(), mean, var)
                };
                let rv = g.input(r.clone());
                let l = crate::ops::basic::mul(&mut g, y, rv).unwrap();
                let l = crate::ops::basic::sum(&mut g, l);
                let all = g.gradients(l).unwrap();
                let bits = |v: &mut dyn Iterator<Item = &f32>| v.map(|f| f.to_bits()).collect();
                let mut out: Vec<Vec<u32>> = vec![
                    bits(&mut g.value(y).iter()),
                    bits(&mut mean.iter()),
                    bits(&mut var.iter()),
                ];
                for v in &vars {
                    out.push(bits(&mut all[v.0].as_ref().expect("gradient").iter()));
                }
                out
            };
            let (got, want) = (run(true), run(false));
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(a == b, "{n} {c} {co} {h}x{w}: item {i} differs");
            }
        }
        // Inputs where no normalised value lies within 0.05 of the ReLU's kink (a
        // finite-difference step then never crosses it).
        let (x, gamma, beta) = (0..100)
            .map(|s| {
                (
                    random(&[2, 2, 3, 3], 100 + s),
                    random(&[2], 300 + s),
                    random(&[2], 500 + s),
                )
            })
            .find(|(x, gamma, beta)| {
                let mut g = Graph::new(true);
                let v = [x, gamma, beta].map(|t| g.input(t.clone()));
                let (z, _, _) = norm::batch_norm2d_train(&mut g, v[0], v[1], v[2], 1e-5).unwrap();
                g.value(z).iter().all(|v| v.abs() > 0.05)
            })
            .expect("a seed without normalised values near 0");
        let w = random(&[4, 2, 3, 3], 14);
        check(&[x, gamma, beta, w], 1e-3, 2e-2, 25, |g, v| {
            bn_relu_conv2d(g, v[0], (v[1], v[2], 1e-5), v[3], spec)
                .unwrap()
                .expect("the direct path")
                .0
        });
    }

    #[test]
    fn depthwise_direct_path_matches_im2col_and_finite_differences() {
        for (stride, pad, k, h, w) in [
            (1, 1, 3, 5, 6),
            (2, 1, 3, 7, 5),
            (2, 0, 3, 6, 6),
            (1, 2, 5, 4, 7),
            (3, 1, 1, 5, 5),
        ] {
            let spec = ConvSpec {
                stride,
                pad,
                groups: 4,
            };
            let x = random(&[3, 4, h, w], 7);
            let wt = random(&[4, 1, k, k], 8);
            let b = random(&[4], 9);
            check(
                &[x.clone(), wt.clone(), b.clone()],
                1e-2,
                1e-2,
                25,
                |g, v| conv2d(g, v[0], v[1], Some(v[2]), spec).unwrap(),
            );
            compare_with_im2col(&x, &wt, &b, spec);
        }
    }

    /// Forward values and all gradients of `conv2d` against the im2col + GEMM path.
    fn compare_with_im2col(x: &Tensor, wt: &Tensor, b: &Tensor, spec: ConvSpec) {
        let run = |force: bool| {
            FORCE_IM2COL.with(|f| f.set(force));
            let mut g = Graph::new(true);
            let (xv, wv, bv) = (
                g.input_with_grad(x.clone()),
                g.input_with_grad(wt.clone()),
                g.input_with_grad(b.clone()),
            );
            let y = conv2d(&mut g, xv, wv, Some(bv), spec).unwrap();
            let yv = g.value(y).clone();
            // A loss with a different weight per output element, so that every gradient
            // element is exercised.
            let r = random(yv.shape(), 77);
            let rv = g.input(r);
            let l = crate::ops::basic::mul(&mut g, y, rv).unwrap();
            let l = crate::ops::basic::sum(&mut g, l);
            let all = g.gradients(l).unwrap();
            let grads: Vec<Tensor> = [xv, wv, bv]
                .iter()
                .map(|v| all[v.0].clone().expect("gradient"))
                .collect();
            FORCE_IM2COL.with(|f| f.set(false));
            (yv, grads)
        };
        // Garbage where the pool hands out the input gradient's buffer (large shapes): a value
        // the direct paths failed to write would show.
        buffers::give(vec![f32::NAN; x.len()]);
        let (y1, g1) = run(false);
        let (y2, g2) = run(true);
        assert_eq!(y1.shape(), y2.shape());
        // Each output within 2e-5 of its products' magnitudes `Σ|w·x| + |b|` (im2col on the
        // absolute values): the transforms of Winograd's F(4x4, 3x3) round to about 2e-6 of it.
        let mag = {
            FORCE_IM2COL.with(|f| f.set(true));
            let mut g = Graph::new(false);
            let [xa, wa, ba] = [x, wt, b].map(|t| g.input(t.mapv(f32::abs)));
            let m = conv2d(&mut g, xa, wa, Some(ba), spec).unwrap();
            FORCE_IM2COL.with(|f| f.set(false));
            g.value(m).clone()
        };
        for ((a, b), m) in y1.iter().zip(y2.iter()).zip(mag.iter()) {
            assert!(
                (a - b).abs() <= 1e-5 * (1.0 + b.abs()) + 2e-5 * m,
                "{spec:?}: {a} vs {b} (magnitude {m})"
            );
        }
        for (ga, gb) in g1.iter().zip(&g2) {
            assert_eq!(ga.shape(), gb.shape());
            for (a, b) in ga.iter().zip(gb.iter()) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{spec:?}: grad {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn direct_path_matches_im2col_and_finite_differences() {
        for (n, c, co, h, w, k, pad, seed) in [
            (3, 3, 5, 7, 9, 3, 1, 1),
            (2, 16, 16, 28, 28, 3, 1, 2),
            (5, 17, 33, 6, 4, 3, 0, 3),
            (2, 2, 4, 5, 11, 5, 2, 4),
            (1, 4, 3, 1, 1, 3, 1, 5),
            (4, 64, 64, 7, 7, 3, 1, 6),
            (19, 8, 24, 5, 5, 2, 1, 7),
            (2, 1, 16, 9, 3, 3, 2, 8),
            (2, 3, 5, 23, 21, 3, 1, 9),
            (2, 20, 50, 7, 14, 3, 1, 10),
            (2, 32, 32, 14, 14, 3, 1, 11),
            // Odd planes with 32+ channels (Winograd's tiles past the edge, on AVX2).
            (2, 32, 40, 9, 11, 3, 1, 12),
        ] {
            let spec = ConvSpec {
                stride: 1,
                pad,
                groups: 1,
            };
            let geo = Geo {
                n,
                c,
                h,
                w,
                co,
                kh: k,
                kw: k,
                oh: h + 2 * pad + 1 - k,
                ow: w + 2 * pad + 1 - k,
                spec,
                fast: true,
            };
            assert!(direct_fits(&geo));
            let x = random(&[n, c, h, w], seed);
            let wt = random(&[co, c, k, k], seed + 100);
            let b = random(&[co], seed + 200);
            compare_with_im2col(&x, &wt, &b, spec);
            if n * c * h * w < 400 {
                check(&[x, wt, b], 1e-2, 1e-2, 25, |g, v| {
                    conv2d(g, v[0], v[1], Some(v[2]), spec).unwrap()
                });
            }
        }
    }

    #[test]
    fn strided_input_gradient_on_rows_is_the_grids_bits() {
        // Phases of 7 and 14 pixels a row, at least 32 input channels: the rows kernel; a
        // 5x5 kernel (padding 2) moves the phases' first rows and columns. On AVX2 also 16
        // input channels (ResNet's 28x28 -> 14x14 transition) and phases of 21 pixels.
        for (n, c, co, hw, k, seed) in [
            (3, 32, 64, 14, 3, 1),
            (2, 64, 16, 28, 3, 2),
            (2, 32, 8, 14, 5, 3),
            (2, 40, 24, 14, 3, 4),
            (2, 16, 32, 28, 3, 5),
            (2, 5, 8, 42, 3, 6),
        ] {
            let spec = ConvSpec {
                stride: 2,
                pad: (k - 1) / 2,
                groups: 1,
            };
            let geo = Geo::new(&[n, c, hw, hw], &[co, c, k, k], spec);
            let x = random(&[n, c, hw, hw], seed);
            let w = random(&[co, c, k, k], seed + 10);
            let gy = random(&[n, co, geo.oh, geo.ow], seed + 20);
            let (xs, ws, gs) = (
                x.as_slice().unwrap(),
                w.as_slice().unwrap(),
                gy.as_slice().unwrap(),
            );
            let before = random(&[n, c, hw, hw], seed + 30);
            let run = |grid: bool| {
                FORCE_GRID_DX.with(|f| f.set(grid));
                let (dx, dw) = strided_grads(&geo, xs, ws, gs, Dx::New);
                let mut acc = before.as_slice().unwrap().to_vec();
                let (none, dw2) = strided_grads(&geo, xs, ws, gs, Dx::Add(&mut acc));
                FORCE_GRID_DX.with(|f| f.set(false));
                assert!(none.is_none());
                assert_eq!(dw, dw2);
                (dx.unwrap(), acc, dw)
            };
            let (rows, grid) = (run(false), run(true));
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&rows.0), bits(&grid.0), "dx {n} {c} {co} {hw} {k}");
            assert_eq!(
                bits(&rows.1),
                bits(&grid.1),
                "dx added {n} {c} {co} {hw} {k}"
            );
            assert_eq!(bits(&rows.2), bits(&grid.2), "dw");
            // Added onto what was there: the new gradient plus the old values.
            for ((&a, &d), &b) in rows.1.iter().zip(&rows.0).zip(before.iter()) {
                assert_eq!(a.to_bits(), (b + d).to_bits());
            }
        }
    }

    #[test]
    fn strided_path_matches_im2col_and_finite_differences() {
        for (n, c, co, h, w, k, seed) in [
            (3, 3, 5, 7, 9, 3, 1),
            (2, 16, 32, 28, 28, 3, 2),
            (2, 5, 7, 6, 4, 5, 3),
            (1, 4, 3, 1, 1, 3, 4),
            (3, 32, 64, 14, 14, 3, 5),
            (3, 2, 4, 8, 5, 3, 6),
            (2, 1, 16, 9, 3, 3, 7),
            (2, 3, 17, 11, 13, 7, 8),
        ] {
            let spec = ConvSpec {
                stride: 2,
                pad: (k - 1) / 2,
                groups: 1,
            };
            let geo = Geo {
                n,
                c,
                h,
                w,
                co,
                kh: k,
                kw: k,
                oh: (h + 2 * spec.pad - k) / 2 + 1,
                ow: (w + 2 * spec.pad - k) / 2 + 1,
                spec,
                fast: true,
            };
            assert!(Phases::new(&geo).is_some(), "{geo:?}");
            let x = random(&[n, c, h, w], seed);
            let wt = random(&[co, c, k, k], seed + 100);
            let b = random(&[co], seed + 200);
            compare_with_im2col(&x, &wt, &b, spec);
            if n * c * h * w < 400 {
                check(&[x, wt, b], 1e-2, 1e-2, 25, |g, v| {
                    conv2d(g, v[0], v[1], Some(v[2]), spec).unwrap()
                });
            }
        }
        // Not taken: even kernels, other paddings, 1x1, stride 3.
        for (k, pad, stride) in [(2, 0, 2), (3, 0, 2), (1, 0, 2), (3, 1, 3)] {
            let geo = Geo {
                n: 1,
                c: 2,
                h: 8,
                w: 8,
                co: 2,
                kh: k,
                kw: k,
                oh: (8 + 2 * pad - k) / stride + 1,
                ow: (8 + 2 * pad - k) / stride + 1,
                spec: ConvSpec {
                    stride,
                    pad,
                    groups: 1,
                },
                fast: true,
            };
            assert!(Phases::new(&geo).is_none(), "{geo:?}");
        }
    }

    /// A residual block's input: its gradient from the other op arrives first, and the direct
    /// paths add theirs in place. The same bits as a returned gradient summed by the tape
    /// (the other recording order), and as the convolution's own input gradient plus the
    /// other one; the weight gradient unchanged.
    #[test]
    fn input_gradient_added_in_place_equals_the_sum() {
        use crate::ops::basic::{add, mul, sum};
        for (stride, h, co) in [(1, 9, 6), (2, 10, 6), (2, 9, 17), (1, 7, 33)] {
            let spec = ConvSpec {
                stride,
                pad: 1,
                groups: 1,
            };
            let oh = (h + 2 - 3) / stride + 1;
            let (x, wt) = (random(&[3, 5, h, h], 1), random(&[co, 5, 3, 3], 2));
            let (r, ry) = (random(&[3, 5, h, h], 3), random(&[3, co, oh, oh], 4));
            let run = |conv_first: bool, other: bool| {
                let mut g = Graph::new(true);
                let xv = g.input_with_grad(x.clone());
                let wv = g.input_with_grad(wt.clone());
                let (rv, ryv) = (g.input(r.clone()), g.input(ry.clone()));
                let (y, m) = if conv_first {
                    let y = conv2d(&mut g, xv, wv, None, spec).unwrap();
                    (y, mul(&mut g, xv, rv).unwrap())
                } else {
                    let m = mul(&mut g, xv, rv).unwrap();
                    (conv2d(&mut g, xv, wv, None, spec).unwrap(), m)
                };
                let yw = mul(&mut g, y, ryv).unwrap();
                let mut l = sum(&mut g, yw);
                if other {
                    let ms = sum(&mut g, m);
                    l = add(&mut g, l, ms).unwrap();
                }
                let all = g.gradients(l).unwrap();
                (all[xv.0].clone().unwrap(), all[wv.0].clone().unwrap())
            };
            let (dx_conv, dw_conv) = run(true, false);
            let want: Vec<f32> = dx_conv.iter().zip(r.iter()).map(|(a, b)| a + b).collect();
            for conv_first in [true, false] {
                let (dx, dw) = run(conv_first, true);
                assert_eq!(
                    dx.as_slice().unwrap(),
                    &want[..],
                    "s{stride} {h} {conv_first}"
                );
                assert_eq!(dw, dw_conv, "s{stride} {h} {conv_first}");
            }
        }
    }

    #[test]
    fn weight_gradients_do_not_depend_on_whether_the_input_needs_one() {
        // The op skips the input gradient of a constant input (the images); the weight
        // gradient must not change, on the direct and the GEMM path.
        for (stride, seed) in [(1, 1), (2, 2)] {
            let spec = ConvSpec {
                stride,
                pad: 1,
                groups: 1,
            };
            let (x, wt) = (
                random(&[5, 3, 8, 7], seed),
                random(&[16, 3, 3, 3], seed + 9),
            );
            let run = |input_grad: bool| {
                let mut g = Graph::new(true);
                let xv = if input_grad {
                    g.input_with_grad(x.clone())
                } else {
                    g.input(x.clone())
                };
                let wv = g.input_with_grad(wt.clone());
                let y = conv2d(&mut g, xv, wv, None, spec).unwrap();
                let l = crate::ops::basic::sum(&mut g, y);
                let l = crate::ops::basic::mul(&mut g, l, l).unwrap();
                let all = g.gradients(l).unwrap();
                (all[xv.0].is_some(), all[wv.0].clone().unwrap())
            };
            let (with, dw1) = run(true);
            let (without, dw2) = run(false);
            assert!(with && !without);
            assert_eq!(dw1, dw2);
        }
    }

    #[test]
    fn direct_paths_are_independent_of_the_thread_count() {
        // Stride 1 (direct) and stride 2 (phases).
        for stride in [1, 2] {
            let spec = ConvSpec {
                stride,
                pad: 1,
                groups: 1,
            };
            // 16 -> 32 channels, and 32 -> 32 (on AVX2 machines Winograd's, stride 1).
            for (ci, co) in [(16, 32), (32, 32)] {
                let (x, wt) = (random(&[37, ci, 9, 9], 1), random(&[co, ci, 3, 3], 2));
                let run = |threads: usize| {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    pool.install(|| {
                        let mut g = Graph::new(true);
                        let (xv, wv) =
                            (g.input_with_grad(x.clone()), g.input_with_grad(wt.clone()));
                        let y = conv2d(&mut g, xv, wv, None, spec).unwrap();
                        let l = crate::ops::basic::sum(&mut g, y);
                        let l = crate::ops::basic::mul(&mut g, l, l).unwrap();
                        let all = g.gradients(l).unwrap();
                        (all[xv.0].clone().unwrap(), all[wv.0].clone().unwrap())
                    })
                };
                assert_eq!(run(1), run(3), "stride {stride}, {ci} -> {co}");
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        for (spec, c, co) in [
            (
                ConvSpec {
                    stride: 1,
                    pad: 1,
                    groups: 1,
                },
                3,
                4,
            ),
            (
                ConvSpec {
                    stride: 2,
                    pad: 0,
                    groups: 1,
                },
                2,
                3,
            ),
            (
                ConvSpec {
                    stride: 2,
                    pad: 1,
                    groups: 2,
                },
                4,
                6,
            ),
            (
                ConvSpec {
                    stride: 1,
                    pad: 1,
                    groups: 5,
                },
                5,
                5,
            ),
        ] {
            let x = random(&[2, c, 5, 6], 1);
            let w = random(&[co, c / spec.groups, 3, 3], 2);
            let b = random(&[co], 3);
            check(&[x, w, b], 1e-2, 1e-2, 25, |g, v| {
                conv2d(g, v[0], v[1], Some(v[2]), spec).unwrap()
            });
        }
    }

    #[test]
    fn matches_a_direct_convolution() {
        let spec = ConvSpec {
            stride: 2,
            pad: 1,
            groups: 1,
        };
        let (x, w) = (random(&[2, 3, 7, 5], 4), random(&[4, 3, 3, 3], 5));
        let mut g = Graph::new(false);
        let (xv, wv) = (g.input(x.clone()), g.input(w.clone()));
        let y = conv2d(&mut g, xv, wv, None, spec).unwrap();
        let y = g.value(y);
        assert_eq!(y.shape(), &[2, 4, 4, 3]);
        for n in 0..2 {
            for o in 0..4 {
                for oy in 0..4 {
                    for ox in 0..3 {
                        let mut s = 0.0f32;
                        for ci in 0..3 {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let (iy, ix) =
                                        ((oy * 2 + ky) as isize - 1, (ox * 2 + kx) as isize - 1);
                                    if (0..7).contains(&iy) && (0..5).contains(&ix) {
                                        s += x[[n, ci, iy as usize, ix as usize]]
                                            * w[[o, ci, ky, kx]];
                                    }
                                }
                            }
                        }
                        assert!((y[[n, o, oy, ox]] - s).abs() < 1e-5);
                    }
                }
            }
        }
    }

    /// The precision holds inside the closure only, and is restored when it panics.
    #[test]
    fn conv_precision_is_scoped_and_restored_after_a_panic() {
        assert_eq!(conv_precision(), ConvPrecision::Fast);
        let inner = with_conv_precision(ConvPrecision::Highest, || {
            let nested = with_conv_precision(ConvPrecision::Fast, conv_precision);
            (nested, conv_precision())
        });
        assert_eq!(inner, (ConvPrecision::Fast, ConvPrecision::Highest));
        assert_eq!(conv_precision(), ConvPrecision::Fast);
        let r = std::panic::catch_unwind(|| {
            with_conv_precision(ConvPrecision::Highest, || panic!("inside"))
        });
        assert!(r.is_err());
        assert_eq!(conv_precision(), ConvPrecision::Fast);
        for p in [ConvPrecision::Fast, ConvPrecision::Highest] {
            assert_eq!(p.name().parse::<ConvPrecision>(), Ok(p));
        }
        assert!("low".parse::<ConvPrecision>().is_err());
    }

    #[test]
    fn shape_errors() {
        let mut g = Graph::new(true);
        let x = g.input(random(&[1, 3, 4, 4], 1));
        let w = g.input(random(&[2, 2, 3, 3], 1));
        assert!(conv2d(&mut g, x, w, None, ConvSpec::default()).is_err());
        let w = g.input(random(&[2, 3, 7, 7], 1));
        assert!(conv2d(&mut g, x, w, None, ConvSpec::default()).is_err());
    }

    /// The direct paths' output, weight and input gradients (on AVX2: Winograd's F(4x4, 3x3)
    /// products and F(3x3, 4x4) / F(3x3, 2x2) weight gradients) within 1e-5 relative L2 of f64
    /// sums, on ResNet-like operands: activations after ReLU, zero-mean output gradients whose
    /// weight-gradient sums cancel; at [`ConvPrecision::Highest`] (F(2x2) at most) within 5e-7.
    /// Measured on a Zen 4: at most 2.1e-6 (Fast), 2.6e-7 (Highest; im2col: 2.1e-7).
    #[test]
    fn direct_paths_are_within_1e_5_of_f64_sums_on_resnet_like_operands() {
        // Past 16 samples the weight-gradient chunks hold several (34: chunks of 3, so the
        // Winograd weight gradient's batches of two and one; 20: of 2).
        for (n, c, co, h) in [
            (8, 16, 16, 28),
            (8, 32, 32, 14),
            (8, 64, 64, 7),
            (3, 33, 20, 9),
            (34, 16, 16, 28),
            (20, 64, 64, 7),
        ] {
            let x = random(&[n, c, h, h], 1).mapv(|v| v.max(0.0));
            let wt = random(&[co, c, 3, 3], 2).mapv(|v| v * 0.1);
            let gy = random(&[n, co, h, h], 3).mapv(|v| v * 1e-3);
            let spec = ConvSpec {
                stride: 1,
                pad: 1,
                groups: 1,
            };
            let run = |precision| {
                with_conv_precision(precision, || {
                    let mut g = Graph::new(true);
                    let (xv, wv) = (g.input_with_grad(x.clone()), g.input_with_grad(wt.clone()));
                    let y = conv2d(&mut g, xv, wv, None, spec).unwrap();
                    let yv = g.value(y).clone();
                    let r = g.input(gy.clone());
                    let l = crate::ops::basic::mul(&mut g, y, r).unwrap();
                    let l = crate::ops::basic::sum(&mut g, l);
                    let mut all = g.gradients(l).unwrap();
                    let (dw, dx) = (all[wv.0].take().unwrap(), all[xv.0].take().unwrap());
                    [yv, dw, dx]
                })
            };
            let (xs, ws, gs) = (
                x.as_slice().unwrap(),
                wt.as_slice().unwrap(),
                gy.as_slice().unwrap(),
            );
            let (mut y64, mut dw64, mut dx64) = (
                vec![0.0f64; n * co * h * h],
                vec![0.0f64; co * c * 9],
                vec![0.0f64; n * c * h * h],
            );
            for (s, o, i, t) in
                (0..n * co * c * 9).map(|k| (k / (co * c * 9), k / (c * 9) % co, k / 9 % c, k % 9))
            {
                let wv = ws[(o * c + i) * 9 + t] as f64;
                for (oy, ox) in (0..h * h).map(|p| (p / h, p % h)) {
                    let (iy, ix) = ((oy + t / 3).wrapping_sub(1), (ox + t % 3).wrapping_sub(1));
                    if iy >= h || ix >= h {
                        continue;
                    }
                    let (at_y, at_x) = (
                        ((s * co + o) * h + oy) * h + ox,
                        ((s * c + i) * h + iy) * h + ix,
                    );
                    y64[at_y] += wv * xs[at_x] as f64;
                    dw64[(o * c + i) * 9 + t] += gs[at_y] as f64 * xs[at_x] as f64;
                    dx64[at_x] += gs[at_y] as f64 * wv;
                }
            }
            let rel = |a: &Tensor, b: &[f64]| {
                let (e, t) = a.iter().zip(b).fold((0.0f64, 0.0f64), |(e, t), (&x, &y)| {
                    (e + (x as f64 - y).powi(2), t + y * y)
                });
                (e / t).sqrt()
            };
            for (precision, bound) in [(ConvPrecision::Fast, 1e-5), (ConvPrecision::Highest, 5e-7)]
            {
                let [y, dw, dx] = run(precision);
                let errs = [rel(&y, &y64), rel(&dw, &dw64), rel(&dx, &dx64)];
                eprintln!(
                    "{precision:?} {c}->{co} {h}x{h}: y, dw, dx relative L2 errors {:.1e} {:.1e} {:.1e}",
                    errs[0], errs[1], errs[2]
                );
                assert!(
                    errs.iter().all(|&e| e < bound),
                    "{precision:?} {c}->{co} {h}x{h}: {errs:?}"
                );
            }
        }
    }
}
