//! Float layers: linear, convolution, batch norm.

use ndarray::IxDyn;

use crate::error::Result;
use crate::graph::{Graph, Var};
use crate::nn::init::Init;
use crate::nn::Module;
use crate::ops::act::relu;
use crate::ops::basic::add;
use crate::ops::conv::{conv2d, ConvSpec};
use crate::ops::matmul::linear;
use crate::ops::norm::{batch_norm2d_eval, batch_norm2d_train_act, BnAct};
use crate::params::{ParamId, ParamKind, ParamStore};
use crate::Tensor;

/// Registers `{name}.bias` (`[n]`, drawn by `init` for `fan_in` inputs) when `wanted`.
fn bias(
    ps: &mut ParamStore,
    name: &str,
    n: usize,
    fan_in: usize,
    wanted: bool,
    init: &mut Init,
) -> Result<Option<ParamId>> {
    wanted
        .then(|| {
            ps.add(
                format!("{name}.bias"),
                init.bias(n, fan_in),
                ParamKind::Bias,
            )
        })
        .transpose()
}

/// Fully connected layer `y = x wᵀ + b`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: ParamId,
    /// `[out]`.
    pub bias: Option<ParamId>,
}

impl Linear {
    /// Registers `{name}.weight` and `{name}.bias`, drawn by `init`.
    pub fn new(
        ps: &mut ParamStore,
        name: &str,
        input: usize,
        output: usize,
        wanted_bias: bool,
        init: &mut Init,
    ) -> Result<Self> {
        let weight = ps.add(
            format!("{name}.weight"),
            init.weight(&[output, input], input),
            ParamKind::Weight,
        )?;
        let bias = bias(ps, name, output, input, wanted_bias, init)?;
        Ok(Self { weight, bias })
    }
}

impl Module for Linear {
    fn forward(&self, g: &mut Graph, ps: &mut ParamStore, x: Var) -> Result<Var> {
        let w = g.param(ps, self.weight);
        let b = self.bias.map(|b| g.param(ps, b));
        linear(g, x, w, b)
    }
}

/// 2-D convolution layer (NCHW).
#[derive(Debug, Clone)]
pub struct Conv2d {
    /// `[out, in / groups, k, k]`.
    pub weight: ParamId,
    /// `[out]`.
    pub bias: Option<ParamId>,
    /// Stride, padding, groups.
    pub spec: ConvSpec,
}

impl Conv2d {
    /// Registers `{name}.weight` and optionally `{name}.bias`, drawn by `init`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ps: &mut ParamStore,
        name: &str,
        input: usize,
        output: usize,
        kernel: usize,
        spec: ConvSpec,
        wanted_bias: bool,
        init: &mut Init,
    ) -> Result<Self> {
        let per_group = input / spec.groups.max(1);
        let fan_in = per_group * kernel * kernel;
        let weight = ps.add(
            format!("{name}.weight"),
            init.weight(&[output, per_group, kernel, kernel], fan_in),
            ParamKind::Weight,
        )?;
        let bias = bias(ps, name, output, fan_in, wanted_bias, init)?;
        Ok(Self { weight, bias, spec })
    }
}

impl Module for Conv2d {
    fn forward(&self, g: &mut Graph, ps: &mut ParamStore, x: Var) -> Result<Var> {
        let w = g.param(ps, self.weight);
        let b = self.bias.map(|b| g.param(ps, b));
        conv2d(g, x, w, b, self.spec)
    }
}

/// Batch normalisation with running statistics (PyTorch semantics: momentum 0.1, unbiased
/// running variance, biased variance for normalisation).
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    /// Scale `[C]`, init 1.
    pub gamma: ParamId,
    /// Shift `[C]`, init 0.
    pub beta: ParamId,
    running_mean: usize,
    running_var: usize,
    /// Running-statistics momentum.
    pub momentum: f32,
    /// Added to the variance.
    pub eps: f32,
}

impl BatchNorm2d {
    /// Registers `{name}.weight`, `{name}.bias` and buffers `{name}.running_mean`, `.running_var`.
    pub fn new(ps: &mut ParamStore, name: &str, channels: usize) -> Result<Self> {
        let gamma = ps.add(
            format!("{name}.weight"),
            Tensor::ones(IxDyn(&[channels])),
            ParamKind::Norm,
        )?;
        let beta = ps.add(
            format!("{name}.bias"),
            Tensor::zeros(IxDyn(&[channels])),
            ParamKind::Norm,
        )?;
        let running_mean = ps.add_buffer(
            format!("{name}.running_mean"),
            Tensor::zeros(IxDyn(&[channels])),
        )?;
        let running_var = ps.add_buffer(
            format!("{name}.running_var"),
            Tensor::ones(IxDyn(&[channels])),
        )?;
        Ok(Self {
            gamma,
            beta,
            running_mean,
            running_var,
            momentum: 0.1,
            eps: 1e-5,
        })
    }

    /// Running mean and variance.
    pub fn running(&self, ps: &ParamStore) -> (Vec<f32>, Vec<f32>) {
        (
            ps.buffer(self.running_mean).iter().copied().collect(),
            ps.buffer(self.running_var).iter().copied().collect(),
        )
    }
}

impl BatchNorm2d {
    /// `act(bn(x) + residual)`: in training one fused op ([`batch_norm2d_train_act`]), in
    /// evaluation the separate ops; the same values either way as [`Module::forward`] followed
    /// by the add and the activation.
    pub fn forward_act(
        &self,
        g: &mut Graph,
        ps: &mut ParamStore,
        x: Var,
        residual: Option<Var>,
        act: BnAct,
    ) -> Result<Var> {
        if !g.is_training() {
            let mut y = self.forward(g, ps, x)?;
            if let Some(r) = residual {
                y = add(g, y, r)?;
            }
            return Ok(match act {
                BnAct::Identity => y,
                BnAct::Relu => relu(g, y),
            });
        }
        let (gm, bt) = (g.param(ps, self.gamma), g.param(ps, self.beta));
        let s = g.shape(x);
        let count = (s[0] * s[2] * s[3]) as f32;
        let (y, mean, var) = batch_norm2d_train_act(g, x, gm, bt, self.eps, residual, act)?;
        self.update_running(ps, &mean, &var, count);
        Ok(y)
    }

    /// Running statistics update from one batch's `mean` and biased `var` over `count` values.
    pub(crate) fn update_running(
        &self,
        ps: &mut ParamStore,
        mean: &[f32],
        var: &[f32],
        count: f32,
    ) {
        let m = self.momentum;
        ps.buffer_mut(self.running_mean)
            .iter_mut()
            .zip(mean)
            .for_each(|(r, v)| *r = (1.0 - m) * *r + m * v);
        let unbias = if count > 1.0 {
            count / (count - 1.0)
        } else {
            1.0
        };
        ps.buffer_mut(self.running_var)
            .iter_mut()
            .zip(var)
            .for_each(|(r, v)| *r = (1.0 - m) * *r + m * v * unbias);
    }
}

impl Module for BatchNorm2d {
    fn forward(&self, g: &mut Graph, ps: &mut ParamStore, x: Var) -> Result<Var> {
        if g.is_training() {
            self.forward_act(g, ps, x, None, BnAct::Identity)
        } else {
            let (gm, bt) = (g.param(ps, self.gamma), g.param(ps, self.beta));
            let (mean, var) = self.running(ps);
            batch_norm2d_eval(g, x, gm, bt, &mean, &var, self.eps)
        }
    }
}
