//! Optimizers (SGD with momentum/Nesterov, AdamW), parameter groups and learning-rate schedules.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::params::{ParamKind, ParamStore};
use crate::Tensor;

/// Learning-rate multiplier and weight decay of one parameter kind.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GroupConfig {
    /// Multiplies the scheduled learning rate.
    pub lr_scale: f32,
    /// Decoupled (AdamW) or L2 (SGD) weight decay.
    pub weight_decay: f32,
}

/// Parameter groups by kind. Default: weight decay only on weights; step sizes, alphas,
/// adapters, biases and norms get none (the usual QAT recipe).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamGroups {
    groups: Vec<(ParamKind, GroupConfig)>,
}

impl ParamGroups {
    /// `weight_decay` on weights, none elsewhere, every learning-rate scale 1.
    pub fn new(weight_decay: f32) -> Self {
        let kinds = [
            ParamKind::Weight,
            ParamKind::Bias,
            ParamKind::Norm,
            ParamKind::QuantScale,
            ParamKind::Adapter,
        ];
        Self {
            groups: kinds
                .into_iter()
                .map(|k| {
                    (
                        k,
                        GroupConfig {
                            lr_scale: 1.0,
                            weight_decay: if k == ParamKind::Weight {
                                weight_decay
                            } else {
                                0.0
                            },
                        },
                    )
                })
                .collect(),
        }
    }

    /// `weight_decay` on every parameter, every learning-rate scale 1: what PyTorch's
    /// optimizers do when given `model.parameters()` (the reference protocol).
    pub fn all(weight_decay: f32) -> Self {
        let mut groups = Self::new(weight_decay);
        for g in &mut groups.groups {
            g.1.weight_decay = weight_decay;
        }
        groups
    }

    /// Overrides one kind.
    pub fn set(mut self, kind: ParamKind, config: GroupConfig) -> Self {
        for g in &mut self.groups {
            if g.0 == kind {
                g.1 = config;
            }
        }
        self
    }

    /// The configuration of `kind`.
    pub fn get(&self, kind: ParamKind) -> GroupConfig {
        self.groups
            .iter()
            .find(|g| g.0 == kind)
            .map(|g| g.1)
            .unwrap_or(GroupConfig {
                lr_scale: 1.0,
                weight_decay: 0.0,
            })
    }
}

/// Which optimizer, with its hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OptimizerConfig {
    /// SGD: `v = mu v + g (+ wd w)`, step `lr v` (or `lr (g + mu v)` with Nesterov).
    Sgd {
        /// Momentum `mu`.
        momentum: f32,
        /// Nesterov momentum.
        nesterov: bool,
    },
    /// AdamW (decoupled weight decay).
    AdamW {
        /// First-moment decay.
        beta1: f32,
        /// Second-moment decay.
        beta2: f32,
        /// Denominator epsilon.
        eps: f32,
    },
}

/// Optimizer state, serializable for checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Optimizer {
    config: OptimizerConfig,
    groups: ParamGroups,
    /// Per parameter name: momentum (SGD) or first moment (AdamW).
    first: BTreeMap<String, Vec<f32>>,
    /// Per parameter name: second moment (AdamW).
    second: BTreeMap<String, Vec<f32>>,
    steps: u64,
}

impl Optimizer {
    /// A fresh optimizer.
    pub fn new(config: OptimizerConfig, groups: ParamGroups) -> Result<Self> {
        match config {
            OptimizerConfig::Sgd { momentum, .. } if !(0.0..1.0).contains(&momentum) => {
                return Err(Error::Config(format!(
                    "momentum {momentum} must be in [0, 1)"
                )))
            }
            OptimizerConfig::AdamW { beta1, beta2, eps }
                if !((0.0..1.0).contains(&beta1) && (0.0..1.0).contains(&beta2) && eps > 0.0) =>
            {
                return Err(Error::Config(format!(
                    "AdamW betas ({beta1}, {beta2}) must be in [0, 1) and eps {eps} > 0"
                )))
            }
            _ => {}
        }
        Ok(Self {
            config,
            groups,
            first: BTreeMap::new(),
            second: BTreeMap::new(),
            steps: 0,
        })
    }

    /// Number of steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One update of every parameter from its accumulated gradient at learning rate `lr`.
    /// A non-finite gradient is an error and nothing is updated.
    pub fn step(&mut self, ps: &mut ParamStore, lr: f32) -> Result<()> {
        if let Some(p) = ps
            .params()
            .iter()
            .find(|p| p.grad.iter().any(|v| !v.is_finite()))
        {
            return Err(Error::NonFinite(format!("gradient of {}", p.name)));
        }
        self.steps += 1;
        let t = self.steps as i32;
        for p in ps.params_mut() {
            let gc = self.groups.get(p.kind);
            let lr = lr * gc.lr_scale;
            let n = p.value.len();
            let w = p.value.as_slice_mut().expect("parameters are contiguous");
            let g = p.grad.as_slice().expect("gradients are contiguous");
            match self.config {
                OptimizerConfig::Sgd { momentum, nesterov } => {
                    let v = self
                        .first
                        .entry(p.name.clone())
                        .or_insert_with(|| vec![0.0; n]);
                    for i in 0..n {
                        let d = g[i] + gc.weight_decay * w[i];
                        v[i] = momentum * v[i] + d;
                        let upd = if nesterov { d + momentum * v[i] } else { v[i] };
                        w[i] -= lr * upd;
                    }
                }
                OptimizerConfig::AdamW { beta1, beta2, eps } => {
                    let m = self
                        .first
                        .entry(p.name.clone())
                        .or_insert_with(|| vec![0.0; n]);
                    let v = self
                        .second
                        .entry(p.name.clone())
                        .or_insert_with(|| vec![0.0; n]);
                    let (c1, c2) = (1.0 - beta1.powi(t), 1.0 - beta2.powi(t));
                    for i in 0..n {
                        w[i] -= lr * gc.weight_decay * w[i];
                        m[i] = beta1 * m[i] + (1.0 - beta1) * g[i];
                        v[i] = beta2 * v[i] + (1.0 - beta2) * g[i] * g[i];
                        w[i] -= lr * (m[i] / c1) / ((v[i] / c2).sqrt() + eps);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Learning-rate schedule over optimizer steps, with optional linear warm-up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// Base learning rate.
    pub base: f32,
    /// Steps of linear warm-up from `base / warmup` to `base`.
    pub warmup: u64,
    /// Shape after warm-up.
    pub shape: LrShape,
}

/// Shape of a schedule after warm-up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LrShape {
    /// Constant.
    Constant,
    /// Cosine from `base` to `min` over `total` steps (counted from the end of warm-up).
    Cosine {
        /// Steps of the decay.
        total: u64,
        /// Final learning rate.
        min: f32,
    },
    /// Multiply by `gamma` every `every` steps.
    Step {
        /// Period.
        every: u64,
        /// Factor.
        gamma: f32,
    },
    /// Cosine from `base` to `min` over `epochs`, constant within an epoch of `per_epoch` steps
    /// (PyTorch's `CosineAnnealingLR(T_max = epochs)` stepped once per epoch).
    CosineEpochs {
        /// Optimizer steps per epoch.
        per_epoch: u64,
        /// Epochs of the decay.
        epochs: u64,
        /// The rate the decay heads for (reached after `epochs`).
        min: f32,
    },
}

impl LrSchedule {
    /// The learning rate at optimizer step `step` (0-based).
    pub fn at(&self, step: u64) -> f32 {
        if step < self.warmup {
            return self.base * (step + 1) as f32 / self.warmup as f32;
        }
        let s = step - self.warmup;
        match self.shape {
            LrShape::Constant => self.base,
            LrShape::Cosine { total, min } => {
                let p = (s as f64 / total.max(1) as f64).min(1.0);
                (min as f64
                    + 0.5 * (self.base - min) as f64 * (1.0 + (std::f64::consts::PI * p).cos()))
                    as f32
            }
            LrShape::Step { every, gamma } => self.base * gamma.powi((s / every.max(1)) as i32),
            LrShape::CosineEpochs {
                per_epoch,
                epochs,
                min,
            } => {
                let p = ((s / per_epoch.max(1)) as f64 / epochs.max(1) as f64).min(1.0);
                (min as f64
                    + 0.5 * (self.base - min) as f64 * (1.0 + (std::f64::consts::PI * p).cos()))
                    as f32
            }
        }
    }
}

/// Copies of every parameter value (for tests and comparisons).
pub fn snapshot(ps: &ParamStore) -> Vec<Tensor> {
    ps.params().iter().map(|p| p.value.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    fn store(w: f32, g: f32, kind: ParamKind) -> ParamStore {
        let mut ps = ParamStore::new();
        let id = ps
            .add("p", Tensor::from_elem(IxDyn(&[1]), w), kind)
            .unwrap();
        ps.get_mut(id).grad.fill(g);
        ps
    }

    #[test]
    fn sgd_momentum_nesterov_and_decay_by_hand() {
        let mut ps = store(1.0, 0.5, ParamKind::Weight);
        let mut opt = Optimizer::new(
            OptimizerConfig::Sgd {
                momentum: 0.9,
                nesterov: false,
            },
            ParamGroups::new(0.1),
        )
        .unwrap();
        opt.step(&mut ps, 0.1).unwrap(); // d = 0.5 + 0.1 = 0.6; v = 0.6; w = 1 - 0.06
        assert!((ps.params()[0].value[0] - 0.94).abs() < 1e-6);
        opt.step(&mut ps, 0.1).unwrap(); // d = 0.5 + 0.094 = 0.594; v = 0.54 + 0.594 = 1.134
        assert!((ps.params()[0].value[0] - (0.94 - 0.1134)).abs() < 1e-6);
        let mut ps = store(1.0, 0.5, ParamKind::QuantScale); // no decay on quantizer scales
        let mut opt = Optimizer::new(
            OptimizerConfig::Sgd {
                momentum: 0.9,
                nesterov: true,
            },
            ParamGroups::new(0.1),
        )
        .unwrap();
        opt.step(&mut ps, 0.1).unwrap(); // v = 0.5; upd = 0.5 + 0.45 = 0.95
        assert!((ps.params()[0].value[0] - 0.905).abs() < 1e-6);
    }

    #[test]
    fn adamw_first_step_moves_by_lr() {
        let mut ps = store(1.0, 0.3, ParamKind::Weight);
        let mut opt = Optimizer::new(
            OptimizerConfig::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            ParamGroups::new(0.0),
        )
        .unwrap();
        opt.step(&mut ps, 0.01).unwrap();
        assert!((ps.params()[0].value[0] - 0.99).abs() < 1e-5);
    }

    #[test]
    fn bad_gradients_and_configs_are_errors() {
        let mut ps = store(1.0, f32::NAN, ParamKind::Weight);
        let mut opt = Optimizer::new(
            OptimizerConfig::Sgd {
                momentum: 0.0,
                nesterov: false,
            },
            ParamGroups::new(0.0),
        )
        .unwrap();
        assert!(opt.step(&mut ps, 0.1).is_err());
        assert_eq!(ps.params()[0].value[0], 1.0);
        assert!(Optimizer::new(
            OptimizerConfig::Sgd {
                momentum: 1.5,
                nesterov: false
            },
            ParamGroups::new(0.0)
        )
        .is_err());
    }

    #[test]
    fn schedules() {
        let s = LrSchedule {
            base: 0.1,
            warmup: 10,
            shape: LrShape::Cosine {
                total: 100,
                min: 0.0,
            },
        };
        assert!((s.at(0) - 0.01).abs() < 1e-7 && (s.at(9) - 0.1).abs() < 1e-7);
        assert!((s.at(60) - 0.05).abs() < 1e-6 && s.at(110).abs() < 1e-7 && s.at(500).abs() < 1e-7);
        let st = LrSchedule {
            base: 1.0,
            warmup: 0,
            shape: LrShape::Step {
                every: 5,
                gamma: 0.5,
            },
        };
        assert_eq!((st.at(4), st.at(5), st.at(12)), (1.0, 0.5, 0.25));
        let ep = LrSchedule {
            base: 0.01,
            warmup: 0,
            shape: LrShape::CosineEpochs {
                per_epoch: 10,
                epochs: 3,
                min: 0.0,
            },
        };
        // 0.01, 0.0075, 0.0025: constant within each epoch.
        for (step, want) in [
            (0, 0.01),
            (9, 0.01),
            (10, 0.0075),
            (19, 0.0075),
            (25, 0.0025),
        ] {
            assert!(
                (ep.at(step) - want).abs() < 1e-7,
                "step {step}: {}",
                ep.at(step)
            );
        }
    }
}
