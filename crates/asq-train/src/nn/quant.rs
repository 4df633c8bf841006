//! Quantized layers: a float conv/linear plus a weight quantizer and an input quantizer.
//!
//! - Weights: float, LSQ (signed, per output channel) or a non-uniform [`LevelSet`] (POT, APoT,
//!   POST, integer-grid POST) with per-channel alpha.
//! - Inputs (activations): float, LSQ (one step per tensor) or ASQ (the step times a per-sample
//!   beta from an [`Adapter`]).
//!
//! Scales initialise themselves from the first batch a layer sees (LSQ: `2 mean|v| / sqrt(p)`;
//! alpha: the 0.99 quantile of `|w|` per channel), so a quantized model can start from a float
//! checkpoint exactly as in the paper's recipe. A buffer records that this happened, so a
//! resumed checkpoint does not re-initialise.

use asq_core::quant::lsq::{self, Lsq};
use asq_core::quant::weights::{self as wq, LevelQuantizer};
use asq_core::{LevelSet, QuantRange};
use ndarray::IxDyn;

use crate::error::{shape, Result};
use crate::graph::{Graph, Var};
use crate::nn::init::Init;
use crate::nn::layers::{BatchNorm2d, Conv2d, Linear};
use crate::nn::Module;
use crate::ops::act::{clamp_min, relu};
use crate::ops::basic::reshape;
use crate::ops::conv::{bn_relu_conv2d, bn_relu_conv_fits, conv2d, ConvSpec};
use crate::ops::matmul::linear;
use crate::ops::norm::BnAct;
use crate::ops::pool::global_avg_pool;
use crate::ops::quant::{asq, filled, level_weights, lsq as lsq_op};
use crate::params::{ParamId, ParamKind, ParamStore};
use crate::Tensor;

/// How weights are quantized.
#[derive(Debug, Clone, PartialEq)]
pub enum WeightQuant {
    /// Full precision.
    Float,
    /// LSQ, signed, one step per output channel.
    Lsq {
        /// Bit width.
        bits: u32,
    },
    /// A non-uniform level set with one learnable alpha per output channel.
    Levels(LevelSet),
}

/// How a layer's input is quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActQuant {
    /// Full precision.
    Float,
    /// LSQ with one learnt step per tensor.
    Lsq {
        /// Bit width.
        bits: u32,
        /// Signed codes (inputs that can be negative, e.g. normalised images).
        signed: bool,
    },
    /// ASQ: learnt step times a per-sample beta from an adapter.
    Asq {
        /// Bit width.
        bits: u32,
        /// Signed codes.
        signed: bool,
    },
}

impl ActQuant {
    fn range(&self) -> Result<Option<QuantRange>> {
        Ok(match *self {
            ActQuant::Float => None,
            ActQuant::Lsq { bits, signed } | ActQuant::Asq { bits, signed } => Some(if signed {
                QuantRange::signed(bits)?
            } else {
                QuantRange::unsigned(bits)?
            }),
        })
    }
}

/// Which element count `N` the LSQ gradient scale `1 / sqrt(N p)` of an activation step uses.
///
/// The LSQ paper (Esser et al. 2020) defines `N` as the number of elements the step quantizes.
/// For activations that is ambiguous: the usual implementations (the LSQ reference code, the
/// ASQ authors' code, the QAT recipes built on them) take every element of the batch tensor,
/// so the scale shrinks with the batch size; taking the features of one sample keeps it
/// independent of the batch. At batch 128 the two differ by `sqrt(128) = 11.3x` in the step's
/// gradient, enough to cost 3-4 points of 2-bit accuracy under the reference protocol
/// (docs/results.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StepGradScale {
    /// `N` = all elements of the batch tensor (the reference implementations).
    #[default]
    Tensor,
    /// `N` = the features of one sample.
    Sample,
}

impl StepGradScale {
    /// Names accepted by [`StepGradScale::parse`].
    pub const NAMES: &'static str = "tensor, sample";

    /// `tensor` or `sample`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "tensor" => Ok(Self::Tensor),
            "sample" => Ok(Self::Sample),
            _ => Err(crate::Error::Config(format!(
                "unknown step-gradient scale {name:?}; known: {}",
                Self::NAMES
            ))),
        }
    }

    /// The name [`StepGradScale::parse`] reads back.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tensor => "tensor",
            Self::Sample => "sample",
        }
    }

    /// `N` for an input of `elems` elements in `batch` samples.
    pub fn count(self, elems: usize, batch: usize) -> usize {
        match self {
            Self::Tensor => elems,
            Self::Sample => elems / batch.max(1),
        }
    }
}

/// The quantization of one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantConfig {
    /// Weights.
    pub weights: WeightQuant,
    /// Input activations.
    pub acts: ActQuant,
    /// The element count of the activation step's gradient scale.
    pub step_grad: StepGradScale,
}

impl QuantConfig {
    /// No quantization.
    pub fn float() -> Self {
        Self::new(WeightQuant::Float, ActQuant::Float)
    }

    /// `weights` and `acts` with the default step-gradient scale.
    pub fn new(weights: WeightQuant, acts: ActQuant) -> Self {
        Self {
            weights,
            acts,
            step_grad: StepGradScale::default(),
        }
    }
}

/// ASQ's adapter: global average pool (4-D inputs) -> Linear(C, C/4) -> ReLU -> Linear(C/4, 1)
/// -> ReLU -> clamp(min 1e-8); a single Linear(C, 1) -> ReLU when C < 8. The last linear starts
/// with weights N(0, 0.01) and bias 1, so beta starts near 1 and ASQ starts as LSQ.
#[derive(Debug, Clone)]
pub struct Adapter {
    first: Linear,
    second: Option<Linear>,
}

impl Adapter {
    /// Registers `{name}.fc1` (and `{name}.fc2`) for `channels` input features.
    pub fn new(ps: &mut ParamStore, name: &str, channels: usize, init: &mut Init) -> Result<Self> {
        let last_init = |ps: &mut ParamStore, l: &Linear, init: &mut Init| {
            let p = ps.get_mut(l.weight);
            p.kind = ParamKind::Adapter;
            p.value
                .iter_mut()
                .for_each(|v| *v = init.rng().normal() * 0.01);
            if let Some(b) = l.bias {
                let b = ps.get_mut(b);
                b.kind = ParamKind::Adapter;
                b.value.fill(1.0);
            }
        };
        if channels >= 8 {
            let hidden = channels / 4;
            let first = Linear::new(ps, &format!("{name}.fc1"), channels, hidden, true, init)?;
            ps.get_mut(first.weight).kind = ParamKind::Adapter;
            if let Some(b) = first.bias {
                ps.get_mut(b).kind = ParamKind::Adapter;
            }
            let second = Linear::new(ps, &format!("{name}.fc2"), hidden, 1, true, init)?;
            last_init(ps, &second, init);
            Ok(Self {
                first,
                second: Some(second),
            })
        } else {
            let first = Linear::new(ps, &format!("{name}.fc1"), channels, 1, true, init)?;
            last_init(ps, &first, init);
            Ok(Self {
                first,
                second: None,
            })
        }
    }

    /// The first linear layer and, when `C >= 8`, the second.
    pub fn layers(&self) -> (&Linear, Option<&Linear>) {
        (&self.first, self.second.as_ref())
    }

    /// `beta` `[N]` for input `x` (`[N, C, H, W]` or `[N, C]`).
    pub fn beta(&self, g: &mut Graph, ps: &mut ParamStore, x: Var) -> Result<Var> {
        let n = g.shape(x)[0];
        let pooled = if g.shape(x).len() == 4 {
            global_avg_pool(g, x)?
        } else {
            x
        };
        let mut h = self.first.forward(g, ps, pooled)?;
        if let Some(second) = &self.second {
            h = relu(g, h);
            h = second.forward(g, ps, h)?;
        }
        let h = relu(g, h);
        let h = clamp_min(g, h, 1e-8);
        reshape(g, h, &[n])
    }
}

/// The smallest step size or alpha a quantizer uses.
pub const MIN_SCALE: f32 = 1e-8;

/// Replaces every step size (or alpha) of `id` by `max(|v|, MIN_SCALE)` before it is used, as
/// the reference implementations do (`s.abs_().clamp_(min=1e-8)` under `no_grad`): an SGD step
/// can push a small scale through zero, and the quantizer of `|s|` is the same function (the
/// grids and level sets are symmetric). A NaN stays NaN and is reported by the quantizer.
fn keep_positive(ps: &mut ParamStore, id: ParamId) {
    ps.get_mut(id)
        .value
        .iter_mut()
        .for_each(|v| *v = effective_scale(*v));
}

/// The scale a quantizer uses for a stored step size or alpha `v`: `max(|v|, MIN_SCALE)` when
/// `v` is below [`MIN_SCALE`], else `v` (NaN stays NaN). A model saved right after an SGD step
/// may hold a scale pushed through zero; its next forward pass, and an export, use this value.
pub fn effective_scale(v: f32) -> f32 {
    if v < MIN_SCALE {
        v.abs().max(MIN_SCALE)
    } else {
        v
    }
}

/// Quantizer of a layer's input.
#[derive(Debug, Clone)]
pub struct InputQuantizer {
    name: String,
    kind: ActQuant,
    step_grad: StepGradScale,
    step: Option<ParamId>,
    adapter: Option<Adapter>,
    ready: Option<usize>,
}

impl InputQuantizer {
    /// Registers `{name}.act_step` (and the adapter under `{name}.adapter`) for `channels`.
    pub fn new(
        ps: &mut ParamStore,
        name: &str,
        kind: ActQuant,
        step_grad: StepGradScale,
        channels: usize,
        init: &mut Init,
    ) -> Result<Self> {
        if kind == ActQuant::Float {
            return Ok(Self {
                name: name.to_string(),
                kind,
                step_grad,
                step: None,
                adapter: None,
                ready: None,
            });
        }
        kind.range()?;
        let step = Some(ps.add(
            format!("{name}.act_step"),
            filled(1, 1.0),
            ParamKind::QuantScale,
        )?);
        let ready = Some(ps.add_buffer(format!("{name}.act_ready"), filled(1, 0.0))?);
        let adapter = match kind {
            ActQuant::Asq { .. } => Some(Adapter::new(
                ps,
                &format!("{name}.adapter"),
                channels,
                init,
            )?),
            _ => None,
        };
        Ok(Self {
            name: name.to_string(),
            kind,
            step_grad,
            step,
            adapter,
            ready,
        })
    }

    /// Whether the input stays float (the quantizer is the identity).
    pub fn is_float(&self) -> bool {
        self.kind == ActQuant::Float
    }

    /// Quantizes `x` (identity for float).
    pub fn forward(&self, g: &mut Graph, ps: &mut ParamStore, x: Var) -> Result<Var> {
        let (Some(range), Some(step), Some(ready)) = (self.kind.range()?, self.step, self.ready)
        else {
            return Ok(x);
        };
        if ps.buffer(ready)[0] == 0.0 {
            let v: Vec<f32> = g.value(x).iter().copied().collect();
            let s = Lsq::new(range).init_step(&v)?;
            ps.get_mut(step).value.fill(s);
            ps.buffer_mut(ready).fill(1.0);
        }
        let count = self.step_grad.count(g.value(x).len(), g.shape(x)[0]);
        let gs = lsq::grad_scale(count, range);
        keep_positive(ps, step);
        let s = g.param(ps, step);
        match &self.adapter {
            None => lsq_op(g, x, s, range, gs),
            Some(adapter) => {
                let beta = adapter.beta(g, ps, x)?;
                if g.is_observing() {
                    let b = g.value(beta).iter().copied().collect();
                    g.record_observation(format!("{}.beta", self.name), b);
                }
                asq(g, x, s, beta, range, gs)
            }
        }
    }

    /// The learnt step, if quantized.
    pub fn step(&self) -> Option<ParamId> {
        self.step
    }

    /// The ASQ adapter, if any.
    pub fn adapter(&self) -> Option<&Adapter> {
        self.adapter.as_ref()
    }

    /// The configuration.
    pub fn kind(&self) -> ActQuant {
        self.kind
    }
}

/// Quantizer of a layer's weight.
#[derive(Debug, Clone)]
pub struct WeightQuantizer {
    kind: WeightQuant,
    scale: Option<ParamId>,
    ready: Option<usize>,
}

impl WeightQuantizer {
    /// Registers `{name}.weight_scale` (`[C_out]`).
    pub fn new(
        ps: &mut ParamStore,
        name: &str,
        kind: WeightQuant,
        out_channels: usize,
    ) -> Result<Self> {
        if let WeightQuant::Lsq { bits } = kind {
            QuantRange::signed(bits)?;
        }
        if kind == WeightQuant::Float {
            return Ok(Self {
                kind,
                scale: None,
                ready: None,
            });
        }
        let scale = Some(ps.add(
            format!("{name}.weight_scale"),
            filled(out_channels, 1.0),
            ParamKind::QuantScale,
        )?);
        let ready = Some(ps.add_buffer(format!("{name}.weight_ready"), filled(1, 0.0))?);
        Ok(Self { kind, scale, ready })
    }

    /// Whether the weights stay float (the quantizer is the identity).
    pub fn is_float(&self) -> bool {
        self.kind == WeightQuant::Float
    }

    /// Fake-quantizes the weight parameter `weight` (already on the tape as `w`).
    pub fn forward(&self, g: &mut Graph, ps: &mut ParamStore, w: Var) -> Result<Var> {
        let (Some(scale), Some(ready)) = (self.scale, self.ready) else {
            return Ok(w);
        };
        let channels = g.shape(w)[0];
        let per_channel = g.value(w).len() / channels.max(1);
        if ps.buffer(ready)[0] == 0.0 {
            let v: Vec<f32> = g.value(w).iter().copied().collect();
            let init = match &self.kind {
                WeightQuant::Lsq { bits } => {
                    Lsq::new(QuantRange::signed(*bits)?).init_steps_per_channel(&v, channels)?
                }
                WeightQuant::Levels(l) => {
                    LevelQuantizer::new(l.clone()).init_alphas(&v, channels)?
                }
                WeightQuant::Float => unreachable!("float has no scale"),
            };
            ps.get_mut(scale).value = Tensor::from_shape_vec(IxDyn(&[channels]), init)
                .map_err(|e| shape("weight quantizer", e.to_string()))?;
            ps.buffer_mut(ready).fill(1.0);
        }
        keep_positive(ps, scale);
        let sv = g.param(ps, scale);
        match &self.kind {
            WeightQuant::Lsq { bits } => {
                let range = QuantRange::signed(*bits)?;
                lsq_op(g, w, sv, range, lsq::grad_scale(per_channel, range))
            }
            WeightQuant::Levels(l) => level_weights(g, w, sv, l, wq::grad_scale(per_channel)),
            WeightQuant::Float => Ok(w),
        }
    }

    /// The per-channel scale parameter (LSQ steps or alphas), if quantized.
    pub fn scale(&self) -> Option<ParamId> {
        self.scale
    }

    /// The configuration.
    pub fn kind(&self) -> &WeightQuant {
        &self.kind
    }
}

/// A convolution with quantized weights and input.
#[derive(Debug, Clone)]
pub struct QConv2d {
    /// The float convolution (its weight is the latent full-precision weight).
    pub conv: Conv2d,
    /// Weight quantizer.
    pub weights: WeightQuantizer,
    /// Input quantizer.
    pub input: InputQuantizer,
}

impl QConv2d {
    /// Registers the convolution and its quantizers under `name`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ps: &mut ParamStore,
        name: &str,
        input: usize,
        output: usize,
        kernel: usize,
        spec: ConvSpec,
        config: &QuantConfig,
        init: &mut Init,
    ) -> Result<Self> {
        let conv = Conv2d::new(ps, name, input, output, kernel, spec, false, init)?;
        let weights = WeightQuantizer::new(ps, name, config.weights.clone(), output)?;
        let input = InputQuantizer::new(ps, name, config.acts, config.step_grad, input, init)?;
        Ok(Self {
            conv,
            weights,
            input,
        })
    }
}

impl Module for QConv2d {
    fn forward(&self, g: &mut Graph, ps: &mut ParamStore, x: Var) -> Result<Var> {
        let xq = self.input.forward(g, ps, x)?;
        let w = g.param(ps, self.conv.weight);
        let wq = self.weights.forward(g, ps, w)?;
        let b = self.conv.bias.map(|b| g.param(ps, b));
        conv2d(g, xq, wq, b, self.conv.spec)
    }
}

impl QConv2d {
    /// `self(relu(bn(x)))`, a ResNet block's `conv2(relu(bn1(h)))`: in training, with float
    /// input and weights, no bias and the direct stride-1 path, one op ([`bn_relu_conv2d`]: the
    /// normalised activation is never written); otherwise [`BatchNorm2d::forward_act`] and then
    /// [`Module::forward`]. The same values and gradients either way, and the same running
    /// statistics.
    pub fn forward_after_bn_relu(
        &self,
        g: &mut Graph,
        ps: &mut ParamStore,
        bn: &BatchNorm2d,
        x: Var,
    ) -> Result<Var> {
        let w_shape = ps.get(self.conv.weight).value.shape().to_vec();
        if self.input.is_float()
            && self.weights.is_float()
            && self.conv.bias.is_none()
            && bn_relu_conv_fits(g, x, &w_shape, self.conv.spec)
        {
            let (gm, bt) = (g.param(ps, bn.gamma), g.param(ps, bn.beta));
            let w = g.param(ps, self.conv.weight);
            if let Some((y, mean, var)) = bn_relu_conv2d(g, x, (gm, bt, bn.eps), w, self.conv.spec)?
            {
                let s = g.shape(x);
                bn.update_running(ps, &mean, &var, (s[0] * s[2] * s[3]) as f32);
                return Ok(y);
            }
        }
        let h = bn.forward_act(g, ps, x, None, BnAct::Relu)?;
        self.forward(g, ps, h)
    }
}

/// A fully connected layer with quantized weights and input.
#[derive(Debug, Clone)]
pub struct QLinear {
    /// The float layer.
    pub linear: Linear,
    /// Weight quantizer.
    pub weights: WeightQuantizer,
    /// Input quantizer.
    pub input: InputQuantizer,
}

impl QLinear {
    /// Registers the layer and its quantizers under `name`.
    pub fn new(
        ps: &mut ParamStore,
        name: &str,
        input: usize,
        output: usize,
        config: &QuantConfig,
        init: &mut Init,
    ) -> Result<Self> {
        let linear = Linear::new(ps, name, input, output, true, init)?;
        let weights = WeightQuantizer::new(ps, name, config.weights.clone(), output)?;
        let input = InputQuantizer::new(ps, name, config.acts, config.step_grad, input, init)?;
        Ok(Self {
            linear,
            weights,
            input,
        })
    }
}

impl Module for QLinear {
    fn forward(&self, g: &mut Graph, ps: &mut ParamStore, x: Var) -> Result<Var> {
        let xq = self.input.forward(g, ps, x)?;
        let w = g.param(ps, self.linear.weight);
        let wq = self.weights.forward(g, ps, w)?;
        let b = self.linear.bias.map(|b| g.param(ps, b));
        linear(g, xq, wq, b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_scales_are_positive_and_keep_nan() {
        assert_eq!(effective_scale(0.5), 0.5);
        assert_eq!(effective_scale(-0.03), 0.03);
        assert_eq!(effective_scale(0.0), MIN_SCALE);
        assert_eq!(effective_scale(-1e-12), MIN_SCALE);
        assert!(effective_scale(f32::NAN).is_nan());
    }
    use crate::ops::gradcheck::random;
    use asq_core::BitWidth;

    fn run(config: &QuantConfig) -> (ParamStore, Vec<f32>) {
        run_with(config, |_| {})
    }

    /// The test layer `c`: 3x3 conv, 8 -> 4 channels, registered in `ps`.
    fn layer_c(ps: &mut ParamStore, config: &QuantConfig) -> QConv2d {
        let spec = ConvSpec {
            stride: 1,
            pad: 1,
            groups: 1,
        };
        QConv2d::new(ps, "c", 8, 4, 3, spec, config, &mut Init::from(1)).unwrap()
    }

    fn run_with(config: &QuantConfig, tweak: impl Fn(&mut ParamStore)) -> (ParamStore, Vec<f32>) {
        let mut ps = ParamStore::new();
        let layer = layer_c(&mut ps, config);
        tweak(&mut ps);
        let mut g = Graph::new(true);
        let x = g.input(random(&[2, 8, 5, 5], 2).mapv(|v| v.abs()));
        let y = layer.forward(&mut g, &mut ps, x).unwrap();
        let l = crate::ops::basic::sum(&mut g, y);
        g.backward(l, &mut ps).unwrap();
        let out = g.value(y).iter().copied().collect();
        (ps, out)
    }

    #[test]
    fn an_observing_pass_reports_every_samples_beta() {
        let config = QuantConfig::new(
            WeightQuant::Lsq { bits: 4 },
            ActQuant::Asq {
                bits: 4,
                signed: false,
            },
        );
        let (mut ps, _) = run(&config);
        let layer = layer_c(&mut ParamStore::new(), &config);
        let x = random(&[2, 8, 5, 5], 2).mapv(|v| v.abs());
        let mut g = Graph::new(false).observe();
        let xv = g.input(x.clone());
        layer.forward(&mut g, &mut ps, xv).unwrap();
        let obs = g.observations();
        assert_eq!(obs.len(), 1);
        assert_eq!(obs[0].0, "c.beta");
        let adapter = layer.input.adapter().unwrap();
        let mut g2 = Graph::new(false);
        let xv = g2.input(x);
        let beta = adapter.beta(&mut g2, &mut ps, xv).unwrap();
        assert_eq!(obs[0].1, g2.value(beta).iter().copied().collect::<Vec<_>>());
        // Not observing: nothing recorded.
        let mut g3 = Graph::new(false);
        let xv = g3.input(random(&[2, 8, 5, 5], 2).mapv(|v| v.abs()));
        layer.forward(&mut g3, &mut ps, xv).unwrap();
        assert!(g3.observations().is_empty());
    }

    #[test]
    fn scales_pushed_through_zero_come_back_positive_but_nan_is_an_error() {
        let config = QuantConfig::new(
            WeightQuant::Lsq { bits: 4 },
            ActQuant::Lsq {
                bits: 4,
                signed: false,
            },
        );
        let (mut ps, before) = run(&config);
        // An update that overshoots zero: the layer quantizes with |s|, as the reference does.
        let step = ps.find("c.act_step").unwrap();
        let s = ps.get(step).value[0];
        ps.get_mut(step).value.fill(-s);
        let scale = ps.find("c.weight_scale").unwrap();
        ps.get_mut(scale).value.mapv_inplace(|v| -v);
        ps.get_mut(scale).value[0] = 0.0;
        let (ps2, after) = run_with(&config, |p| {
            *p = ps.clone();
        });
        assert_eq!(ps2.get(step).value[0], s);
        assert_eq!(ps2.get(scale).value[0], MIN_SCALE);
        assert_eq!(before.len(), after.len());
        // NaN is not silently replaced.
        let mut g = Graph::new(true);
        let mut bad = ps2.clone();
        bad.get_mut(step).value.fill(f32::NAN);
        let layer = layer_c(&mut ParamStore::new(), &config);
        let x = g.input(random(&[2, 8, 5, 5], 2).mapv(|v| v.abs()));
        assert!(layer.forward(&mut g, &mut bad, x).is_err());
    }

    #[test]
    fn asq_post_layer_registers_named_params_and_gets_gradients() {
        let config = QuantConfig {
            weights: WeightQuant::Levels(LevelSet::post(BitWidth::new(4).unwrap()).unwrap()),
            acts: ActQuant::Asq {
                bits: 4,
                signed: false,
            },
            step_grad: Default::default(),
        };
        // Positive hidden biases keep the adapter's ReLU alive for every sample (with a random
        // draw both hidden units can be dead, and then no gradient reaches fc1, correctly).
        let (ps, _) = run_with(&config, |ps| {
            let b = ps.find("c.adapter.fc1.bias").unwrap();
            ps.get_mut(b).value.fill(0.5);
        });
        let names: Vec<&str> = ps.params().iter().map(|p| p.name.as_str()).collect();
        for n in [
            "c.weight",
            "c.weight_scale",
            "c.act_step",
            "c.adapter.fc1.weight",
            "c.adapter.fc2.bias",
        ] {
            assert!(names.contains(&n), "{n} missing from {names:?}");
        }
        for p in ps.params() {
            assert!(p.grad.iter().all(|v| v.is_finite()), "{}", p.name);
            assert!(
                p.grad.iter().any(|&v| v != 0.0),
                "no gradient reached {}",
                p.name
            );
        }
        // alpha initialised from the weights, step from the batch.
        let alpha = &ps.get(ps.find("c.weight_scale").unwrap()).value;
        assert!(alpha.iter().all(|&a| a > 0.0 && a != 1.0));
    }

    #[test]
    fn asq_layer_with_unit_beta_equals_lsq_layer() {
        // The adapter's last layer with zero weights and bias 1 gives beta = 1 exactly.
        let unit = |ps: &mut ParamStore| {
            let id = ps.find("c.adapter.fc2.weight").unwrap();
            ps.get_mut(id).value.fill(0.0);
        };
        let asq_cfg = QuantConfig {
            weights: WeightQuant::Lsq { bits: 4 },
            acts: ActQuant::Asq {
                bits: 4,
                signed: false,
            },
            step_grad: Default::default(),
        };
        let lsq_cfg = QuantConfig {
            weights: WeightQuant::Lsq { bits: 4 },
            acts: ActQuant::Lsq {
                bits: 4,
                signed: false,
            },
            step_grad: Default::default(),
        };
        let (pa, a) = run_with(&asq_cfg, unit);
        let (pb, b) = run(&lsq_cfg);
        assert_eq!(a, b);
        for name in ["c.weight", "c.weight_scale", "c.act_step"] {
            let (ga, gb) = (
                &pa.get(pa.find(name).unwrap()).grad,
                &pb.get(pb.find(name).unwrap()).grad,
            );
            assert_eq!(ga, gb, "{name}");
        }
    }
}
