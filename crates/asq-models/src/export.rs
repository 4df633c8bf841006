//! Building blocks of export to the integer engine (`asq-kernels`): a trained [`QConv2d`]
//! becomes packed integer weights plus the rule that turns its float input into per-sample
//! quantized activations. BN folding and whole-model export build on these.

use asq_core::quant::Steps;
use asq_core::QuantRange;
use asq_kernels::{PackedWeights, QuantActivations};
use asq_train::nn::{ActQuant, QConv2d, WeightQuant};
use asq_train::ops::basic::reshape;
use asq_train::{Error, Graph, ParamStore, Result, Tensor};

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
}

fn to_kernel_error(e: asq_kernels::Error) -> Error {
    Error::Config(format!("export: {e}"))
}

/// Packs the weights of `layer` (level-set weights; LSQ weights use the uniform form).
pub fn export_conv(ps: &ParamStore, layer: &QConv2d) -> Result<ExportedConv> {
    let w = &ps.get(layer.conv.weight).value;
    let s = w.shape();
    if layer.conv.spec.groups != 1 {
        return Err(Error::Config(
            "export: grouped convolutions go through the depthwise path (not yet)".into(),
        ));
    }
    let (co, ci, kh, kw) = (s[0], s[1], s[2], s[3]);
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
    let scale = layer
        .weights
        .scale()
        .ok_or_else(|| Error::Config("export: float weights have no integer form".into()))?;
    let scales: Vec<f32> = ps.get(scale).value.iter().copied().collect();
    let weights = match layer.weights.kind() {
        WeightQuant::Levels(levels) => {
            PackedWeights::quantize_levels(&perm, co, kh * kw * ci, levels, &scales)
        }
        WeightQuant::Lsq { bits } => {
            let range = QuantRange::signed(*bits)?;
            let mut codes = vec![0u8; perm.len()];
            asq_core::quant::encode(
                &asq_core::quant::IntGrid::new(range),
                &perm,
                Steps::PerRow(&scales),
                &mut codes,
            )?;
            PackedWeights::from_uniform_codes(&codes, co, kh * kw * ci, range, &scales)
        }
        WeightQuant::Float => unreachable!("float weights have no scale"),
    }
    .map_err(to_kernel_error)?;
    let (range, step) = match layer.input.kind() {
        ActQuant::Lsq { bits, signed } | ActQuant::Asq { bits, signed } => {
            let range = if signed {
                QuantRange::signed(bits)?
            } else {
                QuantRange::unsigned(bits)?
            };
            let step = ps
                .get(layer.input.step().expect("quantized input has a step"))
                .value[0];
            (range, step)
        }
        ActQuant::Float => {
            return Err(Error::Config(
                "export: float inputs have no integer form".into(),
            ))
        }
    };
    Ok(ExportedConv {
        weights,
        range,
        step,
        kernel: (kh, kw),
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
