//! Convolutions and pooling on quantized NHWC activations, on top of the GEMM.
//!
//! Activations enter as a [`QuantActivations`] with one row per sample holding `H·W·C` codes in
//! NHWC order and the sample's scale (ASQ: `s · beta_m`). Zero padding is code 0, which is the
//! value 0 for every activation range (no zero point), so padding is exact.
//!
//! - [`conv2d`] (groups = 1): im2col into `[batch·OH·OW, KH·KW·C]` rows that keep their sample's
//!   scale, then [`crate::gemm`]; weights are `[C_out, KH·KW·C_in]` in (ky, kx, c) order.
//! - [`depthwise_conv2d`] (groups = C, MobileNetV2): a direct integer kernel over blocks of 16
//!   channels (AVX2: activations and weights as i16, `vpmaddwd` over pairs of taps; portable
//!   loops elsewhere), weights `[C, KH·KW]`; the same epilogue, so every variant gives the same
//!   bits.
//! - [`max_pool2d`]: on codes (max commutes with a positive per-sample scale: exact).
//! - [`global_avg_pool`]: integer sums, one rescale per output.
//!
//! Residual additions are fused into the epilogue ([`Epilogue::residual`]).

use rayon::prelude::*;

use crate::activations::{encode_run, QuantActivations};
use crate::dispatch::Isa;
use crate::error::{Error, Result};
use asq_core::quant::Steps;
use asq_core::QuantRange;

use crate::frame::{
    finish, post_acc, Epilogue, Rows, Seg, KGROUP, MAX_TILE_ROWS, PARALLEL_MIN_MACS,
};
use crate::weights::{PackedWeights, WeightForm};

/// Geometry of a 2-D convolution or pooling window on NHWC data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dShape {
    /// Samples.
    pub batch: usize,
    /// Input height.
    pub in_h: usize,
    /// Input width.
    pub in_w: usize,
    /// Input channels.
    pub in_c: usize,
    /// Window height.
    pub kh: usize,
    /// Window width.
    pub kw: usize,
    /// Stride (both directions).
    pub stride: usize,
    /// Zero padding (both sides, both directions).
    pub pad: usize,
}

impl Conv2dShape {
    /// Output height.
    pub fn out_h(&self) -> usize {
        (self.in_h + 2 * self.pad - self.kh) / self.stride + 1
    }

    /// Output width.
    pub fn out_w(&self) -> usize {
        (self.in_w + 2 * self.pad - self.kw) / self.stride + 1
    }

    /// The geometry alone: no zero size, the window inside the padded input.
    fn validate_geometry(&self) -> Result<()> {
        if self.batch == 0 || self.in_c == 0 || self.kh == 0 || self.kw == 0 || self.stride == 0 {
            return Err(Error::Shape(format!("degenerate convolution {self:?}")));
        }
        if self.in_h + 2 * self.pad < self.kh || self.in_w + 2 * self.pad < self.kw {
            return Err(Error::Shape(format!(
                "window {}x{} larger than the padded input",
                self.kh, self.kw
            )));
        }
        Ok(())
    }

    fn validate(&self, x: &QuantActivations) -> Result<()> {
        self.validate_geometry()?;
        if x.rows() != self.batch || x.cols() != self.in_h * self.in_w * self.in_c {
            return Err(Error::Shape(format!(
                "input is [{}, {}], expected [{}, {}·{}·{}]",
                x.rows(),
                x.cols(),
                self.batch,
                self.in_h,
                self.in_w,
                self.in_c
            )));
        }
        Ok(())
    }

    /// Input position of output `(oy, ox)` and window offset `(ky, kx)`, `None` in the padding.
    #[inline]
    fn input_at(&self, oy: usize, ox: usize, ky: usize, kx: usize) -> Option<(usize, usize)> {
        let iy = (oy * self.stride + ky).checked_sub(self.pad)?;
        let ix = (ox * self.stride + kx).checked_sub(self.pad)?;
        (iy < self.in_h && ix < self.in_w).then_some((iy, ix))
    }
}

/// im2col: `[batch·OH·OW, KH·KW·C]` codes, each row with its sample's scale.
pub fn im2col(x: &QuantActivations, shape: &Conv2dShape) -> Result<QuantActivations> {
    im2col_rows(x, shape, 0..shape.batch * shape.out_h() * shape.out_w())
}

/// Rows `rows` of [`im2col`] (output positions in NHWC order): what a thread computing those
/// outputs needs.
pub fn im2col_rows(
    x: &QuantActivations,
    shape: &Conv2dShape,
    rows: std::ops::Range<usize>,
) -> Result<QuantActivations> {
    shape.validate(x)?;
    let (oh, ow, c) = (shape.out_h(), shape.out_w(), shape.in_c);
    if rows.start >= rows.end || rows.end > shape.batch * oh * ow {
        return Err(Error::Shape(format!(
            "rows {rows:?} of a convolution with {} output rows",
            shape.batch * oh * ow
        )));
    }
    let k = shape.kh * shape.kw * c;
    let mut out = QuantActivations::zeroed(rows.len(), k, x.range())?;
    let kp = out.stride();
    let (codes, scales) = out.rows_and_scales_mut();
    for n in 0..shape.batch {
        let src_row = x.row(n);
        for oy in 0..oh {
            for ox in 0..ow {
                let global = (n * oh + oy) * ow + ox;
                if !rows.contains(&global) {
                    continue;
                }
                let r = global - rows.start;
                scales[r] = x.scales()[n];
                let row = &mut codes[r * kp..r * kp + k];
                // The window's columns kx_lo..kx_hi lie inside the input: in NHWC their pixels
                // are one contiguous run per window row, on both sides.
                let x0 = (ox * shape.stride) as isize - shape.pad as isize;
                let kx_lo = (-x0).clamp(0, shape.kw as isize) as usize;
                let kx_hi = (shape.in_w as isize - x0).clamp(0, shape.kw as isize) as usize;
                if kx_lo >= kx_hi {
                    continue;
                }
                let len = (kx_hi - kx_lo) * c;
                for ky in 0..shape.kh {
                    let Some(iy) = (oy * shape.stride + ky).checked_sub(shape.pad) else {
                        continue;
                    };
                    if iy >= shape.in_h {
                        continue;
                    }
                    let src = (iy * shape.in_w) * c + (x0 + kx_lo as isize) as usize * c;
                    let dst = (ky * shape.kw + kx_lo) * c;
                    copy_run(&mut row[dst..dst + len], &src_row[src..src + len]);
                }
            }
        }
    }
    Ok(out)
}

/// Copies a window row. Runs are short (48 bytes for a 3x3 window over 16 channels): the
/// lengths of 3-wide windows over 16/32/64 channels are fixed-size copies (a few vector moves,
/// no loop), others go by 16-byte blocks; a memmove call would cost more than the copy.
#[inline(always)]
fn copy_run(d: &mut [u8], v: &[u8]) {
    fn fixed<const N: usize>(d: &mut [u8], v: &[u8]) {
        let d: &mut [u8; N] = d.try_into().expect("N bytes");
        d.copy_from_slice(&v[..N]);
    }
    match d.len() {
        48 => fixed::<48>(d, v),
        96 => fixed::<96>(d, v),
        192 => fixed::<192>(d, v),
        _ => {
            let mut d16 = d.chunks_exact_mut(16);
            let mut v16 = v.chunks_exact(16);
            for (a, b) in (&mut d16).zip(&mut v16) {
                a.copy_from_slice(b);
            }
            for (a, b) in d16.into_remainder().iter_mut().zip(v16.remainder()) {
                *a = *b;
            }
        }
    }
}

/// Convolution (groups = 1): `out` is `[batch, OH, OW, C_out]` f32, on the fastest variant of
/// this CPU. Implicit GEMM ([`ImplicitConv`]) where every window row is whole groups of 4 codes
/// (`KW·C_in` a multiple of 4), else im2col + GEMM; both give the same bits.
pub fn conv2d(
    x: &QuantActivations,
    w: &PackedWeights,
    shape: &Conv2dShape,
    epi: &Epilogue<'_>,
    out: &mut [f32],
) -> Result<()> {
    conv2d_with(Isa::best(), x, w, shape, epi, out)
}

/// [`conv2d`] on a chosen variant ([`Error::UnsupportedIsa`] if this CPU lacks it).
pub fn conv2d_with(
    isa: Isa,
    x: &QuantActivations,
    w: &PackedWeights,
    shape: &Conv2dShape,
    epi: &Epilogue<'_>,
    out: &mut [f32],
) -> Result<()> {
    check_weights(w, shape)?;
    if ImplicitConv::applies(shape) {
        let input = ImplicitConv::new(x, shape)?;
        input.conv2d_with(isa, w, epi, out)
    } else {
        let cols = im2col(x, shape)?;
        crate::gemm_with(isa, &cols, w, epi, out)
    }
}

fn check_weights(w: &PackedWeights, shape: &Conv2dShape) -> Result<()> {
    if w.cols() != shape.kh * shape.kw * shape.in_c {
        return Err(Error::Shape(format!(
            "weights have K = {}, a {}x{} window over {} channels needs {}",
            w.cols(),
            shape.kh,
            shape.kw,
            shape.in_c,
            shape.kh * shape.kw * shape.in_c
        )));
    }
    Ok(())
}

/// A convolution input laid out for the implicit GEMM: every sample's codes zero-padded in
/// NHWC (`(H + 2·pad) x (W + 2·pad) x C`), samples back to back, plus slack for the rows a tile
/// reads past its last output. The GEMM reads the im2col rows in place instead of copying them:
/// output `(n, oy, ox)`'s row is, for each window row `ky`, the `KW·C` contiguous codes at
/// padded position `(n, oy·stride + ky, ox·stride)` (one run per window row, the same for
/// every row), and the rows of a tile within one output row are `stride·C` bytes apart. The
/// copy is the input's size where im2col writes `KH·KW` times as much.
#[derive(Debug, Clone)]
pub struct ImplicitConv {
    codes: Vec<u8>,
    scales: Vec<f32>,
    range: QuantRange,
    shape: Conv2dShape,
    oh: usize,
    ow: usize,
    /// Bytes per padded sample and per padded image row.
    img: usize,
    row: usize,
    segs: Vec<Seg>,
    /// The output rows this layout can compute (all but after [`ImplicitConv::quantize_for`]).
    valid: std::ops::Range<usize>,
}

impl ImplicitConv {
    /// Whether the implicit path takes `shape`: each window row `KW·C` codes must be whole
    /// groups of 4 (the weights' reduction groups then never straddle two window rows).
    pub fn applies(shape: &Conv2dShape) -> bool {
        (shape.kw * shape.in_c).is_multiple_of(KGROUP)
    }

    /// Pads `x` (`[batch, H·W·C]` NHWC codes) for `shape`.
    pub fn new(x: &QuantActivations, shape: &Conv2dShape) -> Result<Self> {
        shape.validate(x)?;
        let mut out = Self::layout(shape, x.range())?;
        let c = shape.in_c;
        let line = shape.in_w * c;
        for n in 0..shape.batch {
            let src = x.row(n);
            for iy in 0..shape.in_h {
                let at = n * out.img + (iy + shape.pad) * out.row + shape.pad * c;
                out.codes[at..at + line].copy_from_slice(&src[iy * line..(iy + 1) * line]);
            }
        }
        out.scales.extend_from_slice(&x.scales()[..shape.batch]);
        Ok(out)
    }

    /// Quantizes float NHWC activations straight into the padded layout (no intermediate
    /// [`QuantActivations`]): `x` is `[batch, H, W, C]` given as consecutive pieces (their
    /// concatenation; e.g. the row ranges different threads produced), sample `n` with step
    /// `steps.get(n)`. The codes equal [`QuantActivations::quantize`]'s, so this equals
    /// `ImplicitConv::new(&QuantActivations::quantize(..), shape)`.
    pub fn quantize(
        x: &[&[f32]],
        shape: &Conv2dShape,
        range: QuantRange,
        steps: Steps<'_>,
    ) -> Result<Self> {
        let all = shape.batch * shape.out_h() * shape.out_w();
        Self::quantize_for(x, shape, range, steps, 0..all)
    }

    /// [`ImplicitConv::quantize`] of only the input rows that output rows `rows` read (their
    /// windows, padding aside): what a thread computing those rows needs. The result computes
    /// output rows inside `rows` only ([`ImplicitConv::conv2d_rows_with`] refuses others).
    pub fn quantize_for(
        x: &[&[f32]],
        shape: &Conv2dShape,
        range: QuantRange,
        steps: Steps<'_>,
        rows: std::ops::Range<usize>,
    ) -> Result<Self> {
        let line = shape.in_w * shape.in_c;
        let per = shape.in_h * line;
        let total: usize = x.iter().map(|p| p.len()).sum();
        if total != shape.batch * per || steps.rows() != shape.batch {
            return Err(Error::Shape(format!(
                "{total} values and {} steps for {shape:?}",
                steps.rows()
            )));
        }
        steps.validate()?;
        let mut out = Self::layout(shape, range)?;
        let (oh, ow) = (out.oh, out.ow);
        if rows.start > rows.end || rows.end > shape.batch * oh * ow {
            return Err(Error::Shape(format!(
                "rows {rows:?} of a convolution with {} output rows",
                shape.batch * oh * ow
            )));
        }
        out.valid = rows.clone();
        let simd = crate::activations::encode_simd();
        // Where each piece starts in the concatenation; an image row may span pieces.
        let starts: Vec<usize> = x
            .iter()
            .scan(0, |at, p| {
                let start = *at;
                *at += p.len();
                Some(start)
            })
            .collect();
        for n in 0..shape.batch {
            let s = steps.get(n);
            out.scales.push(s);
            // The input rows under the windows of this sample's outputs in `rows`.
            let (first, last) = (rows.start.max(n * oh * ow), rows.end.min((n + 1) * oh * ow));
            let needed = if first < last {
                let (oy0, oy1) = ((first - n * oh * ow) / ow, (last - 1 - n * oh * ow) / ow);
                (oy0 * shape.stride).saturating_sub(shape.pad)
                    ..(oy1 * shape.stride + shape.kh)
                        .saturating_sub(shape.pad)
                        .min(shape.in_h)
            } else {
                0..0
            };
            for iy in needed {
                let dst = n * out.img + (iy + shape.pad) * out.row + shape.pad * shape.in_c;
                let src = (n * shape.in_h + iy) * line;
                // The pieces overlapping values src..src + line, each encoded where it lands.
                let first_piece = starts.partition_point(|&st| st <= src) - 1;
                for (piece, &st) in x.iter().zip(&starts).skip(first_piece) {
                    if st >= src + line {
                        break;
                    }
                    let (lo, hi) = (src.max(st), (src + line).min(st + piece.len()));
                    if lo < hi {
                        encode_run(
                            &piece[lo - st..hi - st],
                            s,
                            range,
                            simd,
                            &mut out.codes[dst + lo - src..dst + hi - src],
                        )?;
                    }
                }
            }
        }
        Ok(out)
    }

    /// Zero codes in the padded layout of `shape`, no scales yet.
    fn layout(shape: &Conv2dShape, range: QuantRange) -> Result<Self> {
        let c = shape.in_c;
        shape.validate_geometry()?;
        if !Self::applies(shape) {
            return Err(Error::Shape(format!(
                "implicit convolution needs KW·C a multiple of 4, got {}·{}",
                shape.kw, c
            )));
        }
        let (hp, wp) = (shape.in_h + 2 * shape.pad, shape.in_w + 2 * shape.pad);
        let row = wp * c;
        let img = hp * row;
        // A tile reads up to MAX_TILE_ROWS - 1 rows (stride·C bytes each) past its last output.
        let slack = (MAX_TILE_ROWS - 1) * shape.stride * c;
        let total = shape
            .batch
            .checked_mul(img)
            .and_then(|v| v.checked_add(slack))
            .ok_or_else(|| Error::Shape(format!("padded input of {shape:?} is too large")))?;
        let segs = (0..shape.kh)
            .map(|ky| Seg {
                off: ky * row,
                groups: shape.kw * c / KGROUP,
            })
            .collect();
        Ok(Self {
            codes: vec![0u8; total],
            scales: Vec::with_capacity(shape.batch),
            range,
            shape: *shape,
            oh: shape.out_h(),
            ow: shape.out_w(),
            img,
            row,
            segs,
            valid: 0..shape.batch * shape.out_h() * shape.out_w(),
        })
    }

    /// The geometry.
    pub fn shape(&self) -> &Conv2dShape {
        &self.shape
    }

    /// Output rows of the GEMM: `batch·OH·OW`.
    pub fn rows(&self) -> usize {
        self.shape.batch * self.oh * self.ow
    }

    /// The scale of output row `m` (its sample's).
    #[inline]
    pub(crate) fn scale(&self, m: usize) -> f32 {
        self.scales[m / (self.oh * self.ow)]
    }

    /// The window rows' runs.
    pub(crate) fn segs(&self) -> &[Seg] {
        &self.segs
    }

    /// A tile from output row `m0`: codes from its first row's window on, the row stride
    /// (`stride·C`), and its rows (at most `max`, within `m0..end` and within one output row).
    #[inline]
    pub(crate) fn tile(&self, m0: usize, end: usize, max: usize) -> (&[u8], usize, usize) {
        let per = self.oh * self.ow;
        let (n, p) = (m0 / per, m0 % per);
        let (oy, ox) = (p / self.ow, p % self.ow);
        let lda = self.shape.stride * self.shape.in_c;
        let off = n * self.img + oy * self.shape.stride * self.row + ox * lda;
        let valid = max.min(end - m0).min(self.ow - ox);
        (&self.codes[off..], lda, valid)
    }

    /// The convolution of this input with `w` on variant `isa`: the same bits as im2col +
    /// [`crate::gemm_with`].
    pub fn conv2d_with(
        &self,
        isa: Isa,
        w: &PackedWeights,
        epi: &Epilogue<'_>,
        out: &mut [f32],
    ) -> Result<()> {
        self.conv2d_rows_with(isa, w, 0..self.rows(), epi, out)
    }

    /// Output rows `rows` (of the `batch·OH·OW` in NHWC order) of [`ImplicitConv::conv2d_with`]:
    /// `out` and the epilogue's residual hold those rows only (`rows.len() · C_out` values).
    /// Each output gets the same bits as in a whole call, so callers may split a layer between
    /// threads by rows.
    pub fn conv2d_rows_with(
        &self,
        isa: Isa,
        w: &PackedWeights,
        rows: std::ops::Range<usize>,
        epi: &Epilogue<'_>,
        out: &mut [f32],
    ) -> Result<()> {
        check_weights(w, &self.shape)?;
        if rows.start > rows.end || rows.start < self.valid.start || rows.end > self.valid.end {
            return Err(Error::Shape(format!(
                "rows {rows:?} of a convolution laid out for output rows {:?}",
                self.valid
            )));
        }
        let plan = crate::frame::check_parts(rows.len(), w.cols(), self.range, w, epi, out, isa)?;
        if rows.is_empty() {
            return Ok(());
        }
        crate::frame::gemm_planned(&plan, Rows::Conv(self), rows, w, epi, out);
        Ok(())
    }

    /// [`ImplicitConv::conv2d_with`] on the VNNI kernels running on the portable model of
    /// their instructions (tests of the AVX-512 code on CPUs without it).
    #[cfg(all(test, target_arch = "x86_64"))]
    pub(crate) fn conv2d_emulated_vnni(
        &self,
        w: &PackedWeights,
        epi: &Epilogue<'_>,
        out: &mut [f32],
    ) -> Result<()> {
        check_weights(w, &self.shape)?;
        crate::frame::check_parts(self.rows(), w.cols(), self.range, w, epi, out, Isa::Scalar)?;
        let plan = crate::dispatch::Plan::emulated_vnni(self.range, w)?;
        crate::frame::gemm_planned(&plan, Rows::Conv(self), 0..self.rows(), w, epi, out);
        Ok(())
    }
}

/// Depthwise convolution (one filter per channel): weights `[C, KH·KW]`, `out` is
/// `[batch, OH, OW, C]` f32. Integer sums per output, then the shared epilogue; runs on the
/// fastest variant of this CPU. Prepares the weights on every call: models keep a
/// [`DepthwiseWeights`] and call [`depthwise_conv2d_with`].
pub fn depthwise_conv2d(
    x: &QuantActivations,
    w: &PackedWeights,
    shape: &Conv2dShape,
    epi: &Epilogue<'_>,
    out: &mut [f32],
) -> Result<()> {
    let dw = DepthwiseWeights::new(w, shape.kh, shape.kw)?;
    depthwise_conv2d_with(Isa::best(), x, &dw, shape, epi, out)
}

/// Channels per block of the depthwise kernels (16 i16 lanes of an AVX2 register).
const DW_BLOCK: usize = 16;

/// Depthwise weights in the kernels' layout: integer values tap-major with the channels padded
/// to a multiple of 16 (i16, zeros in the padding), one table or the even/odd pair of exact
/// POST, and the per-channel scales.
#[derive(Debug, Clone, PartialEq)]
pub struct DepthwiseWeights {
    channels: usize,
    kh: usize,
    kw: usize,
    cp: usize,
    max_abs: u32,
    tables: Vec<Vec<i16>>,
    scales: Vec<f32>,
}

impl DepthwiseWeights {
    /// From packed `[C, KH·KW]` weights.
    pub fn new(w: &PackedWeights, kh: usize, kw: usize) -> Result<Self> {
        let (c, taps) = (w.rows(), kh * kw);
        if w.cols() != taps || taps == 0 {
            return Err(Error::Shape(format!(
                "depthwise weights are [{}, {}], a {kh}x{kw} window needs [C, {taps}]",
                w.rows(),
                w.cols()
            )));
        }
        let values: Vec<&[i8]> = match w.form() {
            WeightForm::Int8 { table } => vec![table],
            WeightForm::PostExact { even, odd } => vec![even, odd],
        };
        let cp = c.div_ceil(DW_BLOCK) * DW_BLOCK;
        let codes = w.codes();
        let tables = values
            .iter()
            .map(|table| {
                let mut v = vec![0i16; taps * cp];
                for (ch, row) in codes.chunks_exact(taps).enumerate() {
                    for (t, &code) in row.iter().enumerate() {
                        v[t * cp + ch] = table[code as usize] as i16;
                    }
                }
                v
            })
            .collect();
        Ok(Self {
            channels: c,
            kh,
            kw,
            cp,
            max_abs: w.form().max_abs(),
            tables,
            scales: w.scales().to_vec(),
        })
    }

    /// Channels.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Window `(KH, KW)`.
    pub fn window(&self) -> (usize, usize) {
        (self.kh, self.kw)
    }

    /// Per-channel scales.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }
}

/// [`depthwise_conv2d`] with prepared weights on a chosen variant ([`Error::UnsupportedIsa`]
/// if this CPU lacks it). Every variant gives the same bits: the sums are exact integers (AVX2:
/// activations and weights as i16, `vpmaddwd` adds the products of two taps in i32).
pub fn depthwise_conv2d_with(
    isa: Isa,
    x: &QuantActivations,
    w: &DepthwiseWeights,
    shape: &Conv2dShape,
    epi: &Epilogue<'_>,
    out: &mut [f32],
) -> Result<()> {
    if !isa.available() {
        return Err(Error::UnsupportedIsa(isa.name()));
    }
    shape.validate(x)?;
    let c = shape.in_c;
    let taps = shape.kh * shape.kw;
    if w.channels != c || w.window() != (shape.kh, shape.kw) {
        return Err(Error::Shape(format!(
            "depthwise weights are {} channels of {}x{}, the input {c} channels of {}x{}",
            w.channels, w.kh, w.kw, shape.kh, shape.kw
        )));
    }
    let (oh, ow) = (shape.out_h(), shape.out_w());
    if out.len() != shape.batch * oh * ow * c {
        return Err(Error::Shape(format!(
            "output has {} values, needs {}",
            out.len(),
            shape.batch * oh * ow * c
        )));
    }
    epi.validate(c, out.len())?;
    if taps as u64 * x.max_abs() as u64 * w.max_abs as u64 > i32::MAX as u64 {
        return Err(Error::Overflow(format!(
            "a {}x{} window can exceed i32",
            shape.kh, shape.kw
        )));
    }
    let (cp, two) = (w.cp, w.tables.len() == 2);
    let kernel = DwKernel {
        signed: x.is_signed(),
        simd: matches!(isa, Isa::Avx2 | Isa::Avx512Vnni),
    };
    let tables = &w.tables;
    let zeros = vec![0.0f32; c];
    let bias = epi.bias.unwrap_or(&zeros);
    // One task per output row (n, oy): disjoint output, sums independent of the split.
    let row_len = ow * c;
    let run_row = |r: usize, orow: &mut [f32]| {
        let (n, oy) = (r / oh, r % oh);
        let base = n * x.stride();
        // Sums per table, [ow][cp] (channel-padded so the SIMD kernel stores whole blocks).
        let mut sums = vec![0i32; tables.len() * ow * cp];
        let mut offs = Vec::with_capacity(taps);
        for ox in 0..ow {
            // (weight index, activation index) of every tap inside the input.
            offs.clear();
            for ky in 0..shape.kh {
                for kx in 0..shape.kw {
                    if let Some((iy, ix)) = shape.input_at(oy, ox, ky, kx) {
                        offs.push(((ky * shape.kw + kx) * cp, base + (iy * shape.in_w + ix) * c));
                    }
                }
            }
            for (ti, v) in tables.iter().enumerate() {
                let at = (ti * ow + ox) * cp;
                kernel.sums(x.codes(), &offs, c, v, &mut sums[at..at + cp]);
            }
        }
        // The shared epilogue, on slices without options so the loop vectorizes; adding the
        // 0.0 of an absent bias or residual is what `finish` does too (same bits).
        let sa = x.scales()[n];
        let (e, o) = sums.split_at(ow * cp);
        for (ox, orow) in orow.chunks_exact_mut(c).enumerate() {
            let res = match epi.residual {
                Some(v) => &v[(r * ow + ox) * c..(r * ow + ox + 1) * c],
                None => &zeros[..],
            };
            let (e, o) = (
                &e[ox * cp..ox * cp + c],
                &o[if two { ox * cp } else { 0 }..],
            );
            let ws = w.scales();
            if two {
                for ch in 0..c {
                    let acc = post_acc(e[ch], o[ch]);
                    orow[ch] = finish(acc, sa, ws[ch], bias[ch], res[ch], epi.relu);
                }
            } else {
                for ch in 0..c {
                    orow[ch] = finish(e[ch] as f32, sa, ws[ch], bias[ch], res[ch], epi.relu);
                }
            }
        }
    };
    let work = out.len() * taps;
    if work >= PARALLEL_MIN_MACS && crate::frame::threads() > 1 {
        out.par_chunks_mut(row_len)
            .enumerate()
            .for_each(|(r, orow)| run_row(r, orow));
    } else {
        for (r, orow) in out.chunks_mut(row_len).enumerate() {
            run_row(r, orow);
        }
    }
    Ok(())
}

/// The depthwise sums of one output pixel.
struct DwKernel {
    signed: bool,
    simd: bool,
}

impl DwKernel {
    /// `s[ch] = sum over (wi, ai) in offs of a[ai + ch] · v[wi + ch]` for the `c` channels
    /// (`s` is `c` rounded up to 16 long). The SIMD kernel reads whole blocks of 16 channels:
    /// it takes the blocks that stay inside `a` (lanes past `c` meet zero weights; they are
    /// never read back), portable loops the rest.
    #[inline]
    fn sums(&self, a: &[u8], offs: &[(usize, usize)], c: usize, v: &[i16], s: &mut [i32]) {
        let blocks = c.div_ceil(DW_BLOCK);
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if self.simd {
            let last = offs.iter().map(|&(_, o)| o).max().unwrap_or(0);
            done = blocks.min(a.len().saturating_sub(last) / DW_BLOCK);
            // SAFETY: `simd` is set only for variants that include AVX2, after their
            // availability was checked; the kernel bounds-checks every index.
            unsafe { crate::x86::avx2::depthwise_blocks(a, offs, done, v, self.signed, s) };
        }
        for c0 in (done * DW_BLOCK..c).step_by(DW_BLOCK) {
            let cols = DW_BLOCK.min(c - c0);
            let out = &mut s[c0..c0 + cols];
            out.fill(0);
            for &(wi, ai) in offs {
                let (ar, wr) = (&a[ai + c0..ai + c0 + cols], &v[wi + c0..wi + c0 + cols]);
                for ((o, &av), &wv) in out.iter_mut().zip(ar).zip(wr) {
                    let av = if self.signed {
                        av as i8 as i32
                    } else {
                        av as i32
                    };
                    *o += av * wv as i32;
                }
            }
        }
    }
}

/// Max pooling on codes: same per-sample scales, `[batch, OH·OW·C]` codes.
pub fn max_pool2d(x: &QuantActivations, shape: &Conv2dShape) -> Result<QuantActivations> {
    shape.validate(x)?;
    if shape.pad != 0 {
        return Err(Error::Shape(
            "max pooling with padding is not supported".into(),
        ));
    }
    let (oh, ow, c) = (shape.out_h(), shape.out_w(), shape.in_c);
    let mut out = QuantActivations::zeroed(shape.batch, oh * ow * c, x.range())?;
    let signed = x.is_signed();
    for n in 0..shape.batch {
        out.set_scale(n, x.scales()[n]);
        for oy in 0..oh {
            for ox in 0..ow {
                for ch in 0..c {
                    let mut best = i32::MIN;
                    for ky in 0..shape.kh {
                        for kx in 0..shape.kw {
                            let (iy, ix) = shape.input_at(oy, ox, ky, kx).expect("no padding");
                            let b = x.byte(n, (iy * shape.in_w + ix) * c + ch);
                            best = best.max(if signed { b as i8 as i32 } else { b as i32 });
                        }
                    }
                    out.row_mut(n)[(oy * ow + ox) * c + ch] = best as i8 as u8;
                }
            }
        }
    }
    Ok(out)
}

/// Global average pooling: `out[n, c] = scale_n · sum_{h,w} code / (H·W)`, `[batch, C]` f32.
pub fn global_avg_pool(
    x: &QuantActivations,
    h: usize,
    w: usize,
    c: usize,
    out: &mut [f32],
) -> Result<()> {
    if x.cols() != h * w * c || out.len() != x.rows() * c || h * w == 0 {
        return Err(Error::Shape(format!(
            "global pool of [{}, {}] as {h}x{w}x{c} into {}",
            x.rows(),
            x.cols(),
            out.len()
        )));
    }
    let signed = x.is_signed();
    for n in 0..x.rows() {
        for ch in 0..c {
            let mut s = 0i64;
            for p in 0..h * w {
                let b = x.byte(n, p * c + ch);
                s += if signed { b as i8 as i64 } else { b as i64 };
            }
            out[n * c + ch] = s as f32 * x.scales()[n] / (h * w) as f32;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suite::pseudo;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Quantizing pieces straight into the padded layout gives the codes and scales of
        /// quantize-then-pad, wherever the pieces are cut (inside image rows too), for both
        /// activation kinds and per-sample steps.
        #[test]
        fn quantize_into_the_layout_equals_quantize_then_pad(
            batch in 1usize..4, h in 1usize..7, w in 1usize..9, cq in 1usize..5,
            pad in 0usize..3, signed in any::<bool>(), bits in 2u32..=8,
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..4),
            seed in any::<u64>(), lo in any::<prop::sample::Index>(), hi in any::<prop::sample::Index>(),
        ) {
            let c = 4 * cq;
            let shape = Conv2dShape { batch, in_h: h, in_w: w, in_c: c, kh: 3, kw: 3, stride: 1, pad };
            prop_assume!(h + 2 * pad >= 3 && w + 2 * pad >= 3);
            let per = h * w * c;
            let x: Vec<f32> = (0..batch * per).map(|i| pseudo(seed, i) * 3.0).collect();
            let steps: Vec<f32> = (0..batch).map(|n| 0.05 + pseudo(seed ^ 1, n).abs() * 0.2).collect();
            let range = if signed { QuantRange::signed(bits) } else { QuantRange::unsigned(bits) }.unwrap();
            let whole = QuantActivations::quantize(&x, batch, per, range, Steps::PerRow(&steps)).unwrap();
            let expect = ImplicitConv::new(&whole, &shape).unwrap();
            let mut at: Vec<usize> = cuts.iter().map(|i| i.index(x.len() + 1)).collect();
            at.sort_unstable();
            let mut pieces = Vec::new();
            let mut prev = 0;
            for a in at.into_iter().chain([x.len()]) {
                pieces.push(&x[prev..a]);
                prev = a;
            }
            let got = ImplicitConv::quantize(&pieces, &shape, range, Steps::PerRow(&steps)).unwrap();
            prop_assert_eq!(&got.codes, &expect.codes);
            prop_assert_eq!(&got.scales, &expect.scales);
            prop_assert!(ImplicitConv::quantize(&pieces[1..], &shape, range, Steps::PerRow(&steps)).is_err() || pieces[0].is_empty());

            // Only the rows under some outputs' windows: those outputs are the same bits.
            let m = got.rows();
            let (r0, r1) = {
                let (a, b) = (lo.index(m + 1), hi.index(m + 1));
                (a.min(b), a.max(b))
            };
            let part = ImplicitConv::quantize_for(&pieces, &shape, range, Steps::PerRow(&steps), r0..r1).unwrap();
            let levels = asq_core::LevelSet::post_int(asq_core::BitWidth::new(4).unwrap(), 64).unwrap();
            let oc = 20;
            let wv: Vec<f32> = (0..oc * 9 * c).map(|i| pseudo(seed ^ 3, i)).collect();
            let w = PackedWeights::quantize_levels(&wv, oc, 9 * c, &levels, &vec![0.5; oc]).unwrap();
            let mut whole = vec![0.0f32; m * oc];
            expect.conv2d_with(Isa::Scalar, &w, &Epilogue::default(), &mut whole).unwrap();
            for isa in Isa::available_all() {
                let mut out = vec![f32::NAN; (r1 - r0) * oc];
                part.conv2d_rows_with(isa, &w, r0..r1, &Epilogue::default(), &mut out).unwrap();
                prop_assert_eq!(&out[..], &whole[r0 * oc..r1 * oc], "{}", isa.name());
            }
            if r0 > 0 {
                let mut out = vec![0.0f32; oc];
                prop_assert!(part.conv2d_rows_with(Isa::Scalar, &w, r0 - 1..r0, &Epilogue::default(), &mut out).is_err());
            }
        }
    }
}
