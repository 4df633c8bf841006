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
    let scales: Vec<f32> = ps.get(scale).value.iter().copied().collect();
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
                ps.get(iq.step().expect("quantized input has a step")).value[0],
            ))
        }
        ActQuant::Float => Err(Error::Config(
            "export: float inputs have no integer form".into(),
        )),
    }
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
    let weights = pack_weights(ps, &layer.weights, &perm, co, kh * kw * ci)?;
    let (range, step) = input_grid(ps, &layer.input)?;
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

/// The ASQ adapter evaluated in float on the integer engine's side: pooled features -> beta.
#[derive(Debug, Clone)]
pub struct FloatAdapter {
    layers: Vec<(Vec<f32>, Vec<f32>, usize, usize)>,
}

impl FloatAdapter {
    fn from_layer(ps: &ParamStore, layer: &QConv2d) -> Option<Self> {
        let adapter = layer.input.adapter()?;
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
        Some(Self {
            layers: std::iter::once(first).chain(second).map(grab).collect(),
        })
    }

    /// `beta` of one sample from its channel means, as the training graph computes it
    /// (linear, ReLU, linear, ReLU, clamp at 1e-8).
    pub fn beta(&self, pooled: &[f32]) -> f32 {
        let mut h = pooled.to_vec();
        for (w, b, out, inp) in &self.layers {
            h = (0..*out)
                .map(|o| {
                    let dot: f32 = (0..*inp).map(|i| h[i] * w[o * inp + i]).sum();
                    (dot + b[o]).max(0.0)
                })
                .collect();
        }
        h[0].max(1e-8)
    }
}

/// One convolution (+ folded batch norm) of an exported model, NHWC in and out.
pub struct IntConv {
    conv: ExportedConv,
    bias: Vec<f32>,
    adapter: Option<FloatAdapter>,
    stride: usize,
    pad: usize,
    in_c: usize,
    out_c: usize,
}

impl IntConv {
    /// Exports `layer` and folds the batch norm `bn` (running statistics) into the scales and
    /// bias of the GEMM epilogue: the weight codes do not change.
    pub fn new(ps: &ParamStore, layer: &QConv2d, bn: &asq_train::nn::BatchNorm2d) -> Result<Self> {
        let conv = export_conv(ps, layer)?;
        let (mean, var) = bn.running(ps);
        let gamma = &ps.get(bn.gamma).value;
        let beta = &ps.get(bn.beta).value;
        let k: Vec<f32> = (0..mean.len())
            .map(|c| gamma[c] / (var[c] + bn.eps).sqrt())
            .collect();
        let scales: Vec<f32> = conv
            .weights
            .scales()
            .iter()
            .zip(&k)
            .map(|(s, k)| s * k)
            .collect();
        let bias: Vec<f32> = (0..mean.len()).map(|c| beta[c] - mean[c] * k[c]).collect();
        let out_c = scales.len();
        let in_c = conv.weights.cols() / (conv.kernel.0 * conv.kernel.1);
        let weights = conv.weights.with_scales(scales).map_err(to_kernel_error)?;
        Ok(Self {
            conv: ExportedConv { weights, ..conv },
            bias,
            adapter: FloatAdapter::from_layer(ps, layer),
            stride: layer.conv.spec.stride,
            pad: layer.conv.spec.pad,
            in_c,
            out_c,
        })
    }

    /// Output height and width for an `h x w` input.
    pub fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        let (kh, kw) = self.conv.kernel;
        (
            (h + 2 * self.pad - kh) / self.stride + 1,
            (w + 2 * self.pad - kw) / self.stride + 1,
        )
    }

    /// Quantizes `x` (`[n, h, w, C_in]` float) with per-sample steps and runs the integer
    /// convolution with the folded epilogue; `residual` (output-shaped) is added before ReLU.
    pub fn forward(
        &self,
        x: &[f32],
        n: usize,
        h: usize,
        w: usize,
        residual: Option<&[f32]>,
        relu: bool,
    ) -> Result<Vec<f32>> {
        let per = h * w * self.in_c;
        if x.len() != n * per {
            return Err(Error::Config(format!(
                "export: input of {} values for [{n}, {h}, {w}, {}]",
                x.len(),
                self.in_c
            )));
        }
        let betas: Vec<f32> = match &self.adapter {
            Some(a) => (0..n)
                .map(|s| {
                    let mut pooled = vec![0.0f32; self.in_c];
                    for px in x[s * per..(s + 1) * per].chunks_exact(self.in_c) {
                        pooled.iter_mut().zip(px).for_each(|(p, v)| *p += v);
                    }
                    pooled.iter_mut().for_each(|v| *v /= (h * w) as f32);
                    a.beta(&pooled)
                })
                .collect(),
            None => vec![1.0; n],
        };
        let qa = QuantActivations::quantize(
            x,
            n,
            per,
            self.conv.range,
            Steps::Scaled {
                step: self.conv.step,
                betas: &betas,
            },
        )
        .map_err(to_kernel_error)?;
        let (kh, kw) = self.conv.kernel;
        let shape = asq_kernels::conv::Conv2dShape {
            batch: n,
            in_h: h,
            in_w: w,
            in_c: self.in_c,
            kh,
            kw,
            stride: self.stride,
            pad: self.pad,
        };
        let (oh, ow) = self.out_hw(h, w);
        let mut out = vec![0.0f32; n * oh * ow * self.out_c];
        let epi = asq_kernels::Epilogue {
            bias: Some(&self.bias),
            residual,
            relu,
        };
        asq_kernels::conv::conv2d(&qa, &self.conv.weights, &shape, &epi, &mut out)
            .map_err(to_kernel_error)?;
        Ok(out)
    }
}

/// A fully connected layer of an exported model.
pub struct IntLinear {
    weights: PackedWeights,
    bias: Vec<f32>,
    range: QuantRange,
    step: f32,
}

impl IntLinear {
    /// Exports a quantized linear layer (LSQ input; level-set or LSQ weights).
    pub fn new(ps: &ParamStore, layer: &asq_train::nn::QLinear) -> Result<Self> {
        let w = &ps.get(layer.linear.weight).value;
        let (out, inp) = (w.shape()[0], w.shape()[1]);
        let flat: Vec<f32> = w.iter().copied().collect();
        if !matches!(layer.input.kind(), ActQuant::Lsq { .. }) {
            return Err(Error::Config(format!(
                "export: linear input {:?} not supported",
                layer.input.kind()
            )));
        }
        let weights = pack_weights(ps, &layer.weights, &flat, out, inp)?;
        let (range, step) = input_grid(ps, &layer.input)?;
        let bias = layer
            .linear
            .bias
            .map(|b| ps.get(b).value.iter().copied().collect())
            .unwrap_or_else(|| vec![0.0; out]);
        Ok(Self {
            weights,
            bias,
            range,
            step,
        })
    }

    /// `[n, in]` float features to `[n, out]` outputs.
    pub fn forward(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        let inp = self.weights.cols();
        let qa = QuantActivations::quantize(
            x,
            n,
            inp,
            self.range,
            Steps::Scaled {
                step: self.step,
                betas: &vec![1.0; n],
            },
        )
        .map_err(to_kernel_error)?;
        let mut out = vec![0.0f32; n * self.weights.rows()];
        let epi = asq_kernels::Epilogue {
            bias: Some(&self.bias),
            ..Default::default()
        };
        asq_kernels::gemm(&qa, &self.weights, &epi, &mut out).map_err(to_kernel_error)?;
        Ok(out)
    }
}
