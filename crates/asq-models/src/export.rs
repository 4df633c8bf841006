//! Export of trained layers to the integer engine: a [`QConv2d`] (with its batch norm folded
//! into the per-channel scales and bias) or a [`QLinear`] becomes a node of an
//! [`crate::engine::IntModel`]; [`export_conv`] and [`quantize_input`] are the building blocks.

use asq_core::quant::Steps;
use asq_core::QuantRange;
use asq_kernels::{PackedWeights, QuantActivations};
use asq_train::nn::quant::effective_scale;
use asq_train::nn::{ActQuant, BatchNorm2d, QConv2d, QLinear, WeightQuant};
use asq_train::ops::basic::reshape;
use asq_train::{Error, Graph, ParamStore, Result, Tensor};

use crate::engine::{Act, FloatAdapter, InputQuant, Op};

/// A convolution ready for the integer engine.
pub struct ExportedConv {
    /// `[C_out, KH·KW·C_in]` codes in (ky, kx, c) order, the layout of `asq_kernels::conv`.
    pub weights: PackedWeights,
    /// Activation code range of the layer input.
    pub range: QuantRange,
    /// The learnt activation step `s`.
    pub step: f32,
    /// Kernel height and width.
    pub kernel: (usize, usize),
    /// One filter per channel (weights `[C, KH·KW]`).
    pub depthwise: bool,
}

fn to_kernel_error(e: asq_kernels::Error) -> Error {
    Error::Config(format!("export: {e}"))
}

/// Packs `[out, inp]` float weights with the layer's weight quantizer and its learnt scales.
fn pack_weights(
    ps: &ParamStore,
    wq: &asq_train::nn::quant::WeightQuantizer,
    flat: &[f32],
    out: usize,
    inp: usize,
) -> Result<PackedWeights> {
    let scale = wq
        .scale()
        .ok_or_else(|| Error::Config("export: float weights have no integer form".into()))?;
    // As the fake-quant forward pass uses them (a scale an SGD step pushed through zero).
    let scales: Vec<f32> = ps
        .get(scale)
        .value
        .iter()
        .map(|&v| effective_scale(v))
        .collect();
    match wq.kind() {
        WeightQuant::Levels(levels) => {
            PackedWeights::quantize_levels(flat, out, inp, levels, &scales)
        }
        WeightQuant::Lsq { bits } => {
            let range = QuantRange::signed(*bits)?;
            let mut codes = vec![0u8; flat.len()];
            asq_core::quant::encode(
                &asq_core::quant::IntGrid::new(range),
                flat,
                Steps::PerRow(&scales),
                &mut codes,
            )?;
            PackedWeights::from_uniform_codes(&codes, out, inp, range, &scales)
        }
        WeightQuant::Float => unreachable!("float weights have no scale"),
    }
    .map_err(to_kernel_error)
}

/// The code range and learnt step of a layer's input quantizer.
fn input_grid(
    ps: &ParamStore,
    iq: &asq_train::nn::quant::InputQuantizer,
) -> Result<(QuantRange, f32)> {
    match iq.kind() {
        ActQuant::Lsq { bits, signed } | ActQuant::Asq { bits, signed } => {
            let range = if signed {
                QuantRange::signed(bits)?
            } else {
                QuantRange::unsigned(bits)?
            };
            Ok((
                range,
                effective_scale(ps.get(iq.step().expect("quantized input has a step")).value[0]),
            ))
        }
        ActQuant::Float => Err(Error::Config(
            "export: float inputs have no integer form".into(),
        )),
    }
}

/// Packs the weights of `layer` (level-set weights; LSQ weights use the uniform form).
/// Convolutions with `groups = 1` give `[C_out, KH·KW·C_in]` in (ky, kx, c) order; depthwise
/// ones (`groups = C_in = C_out`) give `[C, KH·KW]`. Other groupings are not supported.
pub fn export_conv(ps: &ParamStore, layer: &QConv2d) -> Result<ExportedConv> {
    let w = &ps.get(layer.conv.weight).value;
    let s = w.shape();
    let (co, ci, kh, kw) = (s[0], s[1], s[2], s[3]);
    let groups = layer.conv.spec.groups;
    let depthwise = groups > 1 && ci == 1 && groups == co;
    if groups != 1 && !depthwise {
        return Err(Error::Config(format!(
            "export: grouped convolution ({groups} groups of {ci} channels) has no integer kernel"
        )));
    }
    // OIHW -> O, (ky, kx, c).
    let mut perm = vec![0.0f32; w.len()];
    for o in 0..co {
        for c in 0..ci {
            for y in 0..kh {
                for x in 0..kw {
                    perm[o * kh * kw * ci + (y * kw + x) * ci + c] = w[[o, c, y, x]];
                }
            }
        }
    }
    let weights = pack_weights(ps, &layer.weights, &perm, co, kh * kw * ci)?;
    let (range, step) = input_grid(ps, &layer.input)?;
    Ok(ExportedConv {
        weights,
        range,
        step,
        kernel: (kh, kw),
        depthwise,
    })
}

/// Quantizes a float NCHW input of `layer` as the integer engine wants it: NHWC codes with one
/// scale per sample, `s · beta_m` for ASQ (the adapter runs in float) and `s` for LSQ.
pub fn quantize_input(
    ps: &mut ParamStore,
    layer: &QConv2d,
    exported: &ExportedConv,
    x: &Tensor,
) -> Result<QuantActivations> {
    let s = x.shape().to_vec();
    if s.len() != 4 {
        return Err(Error::Config(format!(
            "export: input must be NCHW, got {s:?}"
        )));
    }
    let (n, c, h, w) = (s[0], s[1], s[2], s[3]);
    let betas: Vec<f32> = match layer.input.adapter() {
        Some(adapter) => {
            let mut g = Graph::new(false);
            let xv = g.input(x.clone());
            let b = adapter.beta(&mut g, ps, xv)?;
            let b = reshape(&mut g, b, &[n])?;
            g.value(b).iter().copied().collect()
        }
        None => vec![1.0; n],
    };
    let mut nhwc = vec![0.0f32; x.len()];
    for b in 0..n {
        for ch in 0..c {
            for y in 0..h {
                for xx in 0..w {
                    nhwc[((b * h + y) * w + xx) * c + ch] = x[[b, ch, y, xx]];
                }
            }
        }
    }
    let steps = Steps::Scaled {
        step: exported.step,
        betas: &betas,
    };
    QuantActivations::quantize(&nhwc, n, h * w * c, exported.range, steps).map_err(to_kernel_error)
}

/// The ASQ adapter of a layer input, for evaluation in float by the engine.
fn float_adapter(
    ps: &ParamStore,
    iq: &asq_train::nn::quant::InputQuantizer,
) -> Option<FloatAdapter> {
    let adapter = iq.adapter()?;
    let (first, second) = adapter.layers();
    let grab = |l: &asq_train::nn::Linear| {
        let w = &ps.get(l.weight).value;
        let (out, inp) = (w.shape()[0], w.shape()[1]);
        let b = l
            .bias
            .map(|b| ps.get(b).value.iter().copied().collect())
            .unwrap_or_else(|| vec![0.0; out]);
        (w.iter().copied().collect::<Vec<f32>>(), b, out, inp)
    };
    Some(FloatAdapter {
        layers: std::iter::once(first).chain(second).map(grab).collect(),
    })
}

/// The engine's description of a layer's input quantizer.
fn input_quant(ps: &ParamStore, iq: &asq_train::nn::quant::InputQuantizer) -> Result<InputQuant> {
    let (range, step) = input_grid(ps, iq)?;
    Ok(InputQuant {
        bits: range.bits().get(),
        signed: range.signedness() == asq_core::Signedness::Signed,
        step,
        adapter: float_adapter(ps, iq),
    })
}

/// A convolution node: `layer` exported, the batch norm `bn` (running statistics) folded into
/// the epilogue's per-channel scales and bias (the weight codes do not change), then `residual`
/// (a value id of the engine graph) added and `act` applied.
pub fn conv_node(
    ps: &ParamStore,
    layer: &QConv2d,
    bn: Option<&BatchNorm2d>,
    residual: Option<usize>,
    act: Act,
) -> Result<Op> {
    let conv = export_conv(ps, layer)?;
    let out_c = conv.weights.rows();
    let (k, shift): (Vec<f32>, Vec<f32>) = match bn {
        Some(bn) => {
            let (mean, var) = bn.running(ps);
            let gamma = &ps.get(bn.gamma).value;
            let beta = &ps.get(bn.beta).value;
            (0..out_c)
                .map(|c| {
                    let k = gamma[c] / (var[c] + bn.eps).sqrt();
                    (k, beta[c] - mean[c] * k)
                })
                .unzip()
        }
        None => (vec![1.0; out_c], vec![0.0; out_c]),
    };
    let mut bias = shift;
    if let Some(b) = layer.conv.bias {
        let b = &ps.get(b).value;
        bias.iter_mut()
            .zip(&k)
            .enumerate()
            .for_each(|(c, (o, k))| *o += b[c] * k);
    }
    let scales: Vec<f32> = conv
        .weights
        .scales()
        .iter()
        .zip(&k)
        .map(|(s, k)| s * k)
        .collect();
    let weights = conv.weights.with_scales(scales).map_err(to_kernel_error)?;
    Ok(Op::Conv {
        weights: weights.to_bytes(),
        kernel: conv.kernel,
        stride: layer.conv.spec.stride,
        pad: layer.conv.spec.pad,
        depthwise: conv.depthwise,
        bias,
        quant: input_quant(ps, &layer.input)?,
        residual,
        act,
    })
}

/// A linear node. `chw`: the `(C, H, W)` of a flattened feature map feeding it (training
/// flattens NCHW, the engine NHWC: the weight columns are permuted to match).
pub fn linear_node(
    ps: &ParamStore,
    layer: &QLinear,
    chw: Option<(usize, usize, usize)>,
    act: Act,
) -> Result<Op> {
    let w = &ps.get(layer.linear.weight).value;
    let (out, inp) = (w.shape()[0], w.shape()[1]);
    let mut flat: Vec<f32> = w.iter().copied().collect();
    let mut quant = input_quant(ps, &layer.input)?;
    if let Some((c, h, wd)) = chw {
        if c * h * wd != inp {
            return Err(Error::Config(format!(
                "export: {inp} features are not {c}x{h}x{wd}"
            )));
        }
        // Columns in CHW order (training's flatten) -> HWC (the engine's).
        let to_hwc = |m: &mut Vec<f32>, rows: usize| {
            let src = m.clone();
            for o in 0..rows {
                for ch in 0..c {
                    for p in 0..h * wd {
                        m[o * inp + p * c + ch] = src[o * inp + ch * h * wd + p];
                    }
                }
            }
        };
        to_hwc(&mut flat, out);
        if let Some(first) = quant.adapter.as_mut().and_then(|a| a.layers.first_mut()) {
            let rows = first.2;
            to_hwc(&mut first.0, rows);
        }
    }
    let weights = pack_weights(ps, &layer.weights, &flat, out, inp)?;
    let bias = layer
        .linear
        .bias
        .map(|b| ps.get(b).value.iter().copied().collect())
        .unwrap_or_else(|| vec![0.0; out]);
    Ok(Op::Linear {
        weights: weights.to_bytes(),
        bias,
        quant,
        act,
    })
}
