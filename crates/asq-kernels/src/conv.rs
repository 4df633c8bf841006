//! Convolutions and pooling on quantized NHWC activations, on top of the GEMM.
//!
//! Activations enter as a [`QuantActivations`] with one row per sample holding `H·W·C` codes in
//! NHWC order and the sample's scale (ASQ: `s · beta_m`). Zero padding is code 0, which is the
//! value 0 for every activation range (no zero point), so padding is exact.
//!
//! - [`conv2d`] (groups = 1): im2col into `[batch·OH·OW, KH·KW·C]` rows that keep their sample's
//!   scale, then [`crate::gemm`]; weights are `[C_out, KH·KW·C_in]` in (ky, kx, c) order.
//! - [`depthwise_conv2d`] (groups = C, MobileNetV2): a direct integer kernel, weights
//!   `[C, KH·KW]`; the same epilogue, so results are exact in the same sense.
//! - [`max_pool2d`]: on codes (max commutes with a positive per-sample scale: exact).
//! - [`global_avg_pool`]: integer sums, one rescale per output.
//!
//! Residual additions are fused into the epilogue ([`Epilogue::residual`]).

use crate::activations::QuantActivations;
use crate::error::{Error, Result};
use crate::frame::{finish, post_acc, Epilogue};
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

    fn validate(&self, x: &QuantActivations) -> Result<()> {
        if self.batch == 0 || self.in_c == 0 || self.kh == 0 || self.kw == 0 || self.stride == 0 {
            return Err(Error::Shape(format!("degenerate convolution {self:?}")));
        }
        if self.in_h + 2 * self.pad < self.kh || self.in_w + 2 * self.pad < self.kw {
            return Err(Error::Shape(format!(
                "window {}x{} larger than the padded input",
                self.kh, self.kw
            )));
        }
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
    shape.validate(x)?;
    let (oh, ow, c) = (shape.out_h(), shape.out_w(), shape.in_c);
    let mut out =
        QuantActivations::zeroed(shape.batch * oh * ow, shape.kh * shape.kw * c, x.range())?;
    for n in 0..shape.batch {
        let src_row = x.row(n);
        for oy in 0..oh {
            for ox in 0..ow {
                let r = (n * oh + oy) * ow + ox;
                out.set_scale(r, x.scales()[n]);
                let row = out.row_mut(r);
                for ky in 0..shape.kh {
                    for kx in 0..shape.kw {
                        if let Some((iy, ix)) = shape.input_at(oy, ox, ky, kx) {
                            let src = (iy * shape.in_w + ix) * c;
                            let dst = (ky * shape.kw + kx) * c;
                            // NHWC: a pixel's channels are contiguous on both sides.
                            // An element loop, not copy_from_slice: short runs would call memmove.
                            for (d, v) in row[dst..dst + c].iter_mut().zip(&src_row[src..src + c]) {
                                *d = *v;
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Convolution (groups = 1): `out` is `[batch, OH, OW, C_out]` f32.
pub fn conv2d(
    x: &QuantActivations,
    w: &PackedWeights,
    shape: &Conv2dShape,
    epi: &Epilogue<'_>,
    out: &mut [f32],
) -> Result<()> {
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
    let cols = im2col(x, shape)?;
    crate::gemm(&cols, w, epi, out)
}

/// Depthwise convolution (one filter per channel): weights `[C, KH·KW]`, `out` is
/// `[batch, OH, OW, C]` f32. Integer sums per output, then the shared epilogue.
pub fn depthwise_conv2d(
    x: &QuantActivations,
    w: &PackedWeights,
    shape: &Conv2dShape,
    epi: &Epilogue<'_>,
    out: &mut [f32],
) -> Result<()> {
    shape.validate(x)?;
    let c = shape.in_c;
    let taps = shape.kh * shape.kw;
    if w.rows() != c || w.cols() != taps {
        return Err(Error::Shape(format!(
            "depthwise weights are [{}, {}], expected [{c}, {taps}]",
            w.rows(),
            w.cols()
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
    // Integer weight values per (channel, tap): one table, or the even/odd pair of exact POST.
    let (t1, t2) = match w.form() {
        WeightForm::Int8 { table } => (table.as_slice(), None),
        WeightForm::PostExact { even, odd } => (even.as_slice(), Some(odd.as_slice())),
    };
    let mut v1 = vec![0i32; c * taps];
    let mut v2 = vec![0i32; c * taps];
    for ch in 0..c {
        for t in 0..taps {
            let code = w.code(ch, t) as usize;
            v1[ch * taps + t] = t1[code] as i32;
            v2[ch * taps + t] = t2.map_or(0, |t2| t2[code] as i32);
        }
    }
    let signed = x.is_signed();
    let value = |n: usize, i: usize| {
        let b = x.byte(n, i);
        if signed {
            b as i8 as i32
        } else {
            b as i32
        }
    };
    let mut s1 = vec![0i32; c];
    let mut s2 = vec![0i32; c];
    for n in 0..shape.batch {
        for oy in 0..oh {
            for ox in 0..ow {
                s1.iter_mut().for_each(|s| *s = 0);
                s2.iter_mut().for_each(|s| *s = 0);
                for ky in 0..shape.kh {
                    for kx in 0..shape.kw {
                        let Some((iy, ix)) = shape.input_at(oy, ox, ky, kx) else {
                            continue;
                        };
                        let t = ky * shape.kw + kx;
                        let base = (iy * shape.in_w + ix) * c;
                        for ch in 0..c {
                            let a = value(n, base + ch);
                            s1[ch] += a * v1[ch * taps + t];
                            s2[ch] += a * v2[ch * taps + t];
                        }
                    }
                }
                let o = ((n * oh + oy) * ow + ox) * c;
                for ch in 0..c {
                    let acc = if t2.is_some() {
                        post_acc(s1[ch], s2[ch])
                    } else {
                        s1[ch] as f32
                    };
                    out[o + ch] = epilogue_at(epi, acc, x.scales()[n], w.scales()[ch], ch, o + ch);
                }
            }
        }
    }
    Ok(())
}

#[inline]
fn epilogue_at(epi: &Epilogue<'_>, acc: f32, sa: f32, sw: f32, ch: usize, i: usize) -> f32 {
    let bias = epi.bias.map_or(0.0, |b| b[ch]);
    let residual = epi.residual.map_or(0.0, |r| r[i]);
    finish(acc, sa, sw, bias, residual, epi.relu)
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
