//! CIFAR-style ResNets (He et al. 2016): a 3x3 stem, three stages of basic blocks with 16, 32
//! and 64 channels (stride 2 at the start of stages 2 and 3, 1x1 projection shortcuts there),
//! global average pooling and a linear classifier. Depth `6n + 2`: ResNet-20 is `n = 3`.

use asq_train::nn::{BatchNorm2d, Module, QConv2d, QLinear};
use asq_train::ops::act::relu;
use asq_train::ops::basic::add;
use asq_train::ops::conv::ConvSpec;
use asq_train::ops::pool::global_avg_pool;
use asq_train::{Error, Graph, ParamStore, Result, Rng, Tensor, Var};

use crate::export::{IntConv, IntLinear};

use crate::policy::QuantPolicy;

struct Block {
    conv1: QConv2d,
    bn1: BatchNorm2d,
    conv2: QConv2d,
    bn2: BatchNorm2d,
    shortcut: Option<(QConv2d, BatchNorm2d)>,
}

impl Block {
    fn forward(&self, g: &mut Graph, ps: &mut ParamStore, x: Var) -> Result<Var> {
        let h = self.conv1.forward(g, ps, x)?;
        let h = self.bn1.forward(g, ps, h)?;
        let h = relu(g, h);
        let h = self.conv2.forward(g, ps, h)?;
        let h = self.bn2.forward(g, ps, h)?;
        let s = match &self.shortcut {
            Some((conv, bn)) => {
                let s = conv.forward(g, ps, x)?;
                bn.forward(g, ps, s)?
            }
            None => x,
        };
        let y = add(g, h, s)?;
        Ok(relu(g, y))
    }
}

/// A CIFAR-style ResNet.
pub struct ResNet {
    stem: QConv2d,
    stem_bn: BatchNorm2d,
    blocks: Vec<Block>,
    fc: QLinear,
}

impl ResNet {
    /// ResNet of depth `6n + 2` for `in_channels`-channel images and `classes` classes.
    pub fn cifar(
        ps: &mut ParamStore,
        depth: usize,
        in_channels: usize,
        classes: usize,
        policy: &QuantPolicy,
        seed: u64,
    ) -> Result<Self> {
        if depth < 8 || !(depth - 2).is_multiple_of(6) {
            return Err(Error::Config(format!(
                "CIFAR ResNet depth must be 6n + 2 (20, 32, 44, 56...), got {depth}"
            )));
        }
        let n = (depth - 2) / 6;
        let mut rng = Rng::new(seed);
        let same = ConvSpec {
            stride: 1,
            pad: 1,
            groups: 1,
        };
        let stem = QConv2d::new(
            ps,
            "stem.conv",
            in_channels,
            16,
            3,
            same,
            &policy.first,
            &mut rng,
        )?;
        let stem_bn = BatchNorm2d::new(ps, "stem.bn", 16)?;
        let mut blocks = Vec::new();
        let mut cin = 16;
        for (stage, cout) in [16, 32, 64].into_iter().enumerate() {
            for i in 0..n {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                let name = format!("layer{}.{i}", stage + 1);
                let b = &policy.body;
                let conv1 = QConv2d::new(
                    ps,
                    &format!("{name}.conv1"),
                    cin,
                    cout,
                    3,
                    ConvSpec {
                        stride,
                        pad: 1,
                        groups: 1,
                    },
                    b,
                    &mut rng,
                )?;
                let bn1 = BatchNorm2d::new(ps, &format!("{name}.bn1"), cout)?;
                let conv2 = QConv2d::new(
                    ps,
                    &format!("{name}.conv2"),
                    cout,
                    cout,
                    3,
                    same,
                    b,
                    &mut rng,
                )?;
                let bn2 = BatchNorm2d::new(ps, &format!("{name}.bn2"), cout)?;
                let shortcut = if stride != 1 || cin != cout {
                    let spec = ConvSpec {
                        stride,
                        pad: 0,
                        groups: 1,
                    };
                    let conv = QConv2d::new(
                        ps,
                        &format!("{name}.shortcut.conv"),
                        cin,
                        cout,
                        1,
                        spec,
                        b,
                        &mut rng,
                    )?;
                    Some((
                        conv,
                        BatchNorm2d::new(ps, &format!("{name}.shortcut.bn"), cout)?,
                    ))
                } else {
                    None
                };
                blocks.push(Block {
                    conv1,
                    bn1,
                    conv2,
                    bn2,
                    shortcut,
                });
                cin = cout;
            }
        }
        let fc = QLinear::new(ps, "fc", 64, classes, &policy.last, &mut rng)?;
        Ok(Self {
            stem,
            stem_bn,
            blocks,
            fc,
        })
    }
}

/// ResNet on the integer engine: every convolution with its batch norm folded in, residual
/// additions and ReLUs fused into the GEMM epilogue, NHWC activations quantized per sample.
pub struct IntResNet {
    stem: IntConv,
    blocks: Vec<(IntConv, IntConv, Option<IntConv>)>,
    fc: IntLinear,
}

impl ResNet {
    /// Exports a trained, fully quantized model (every conv and the classifier quantized).
    pub fn export(&self, ps: &ParamStore) -> Result<IntResNet> {
        let stem = IntConv::new(ps, &self.stem, &self.stem_bn)?;
        let blocks = self
            .blocks
            .iter()
            .map(|b| {
                let shortcut = b
                    .shortcut
                    .as_ref()
                    .map(|(c, bn)| IntConv::new(ps, c, bn))
                    .transpose()?;
                Ok((
                    IntConv::new(ps, &b.conv1, &b.bn1)?,
                    IntConv::new(ps, &b.conv2, &b.bn2)?,
                    shortcut,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(IntResNet {
            stem,
            blocks,
            fc: IntLinear::new(ps, &self.fc)?,
        })
    }
}

impl IntResNet {
    /// Logits `[n, classes]` for normalised images `[n, c, h, w]` (NCHW, as for training).
    pub fn forward(&self, x: &Tensor) -> Result<Vec<f32>> {
        let s = x.shape();
        if s.len() != 4 {
            return Err(Error::Config(format!(
                "IntResNet: input must be NCHW, got {s:?}"
            )));
        }
        let (n, c, mut h, mut w) = (s[0], s[1], s[2], s[3]);
        let mut nhwc = vec![0.0f32; x.len()];
        for (i, v) in x.iter().enumerate() {
            let (b, ch, y, xx) = (i / (c * h * w), (i / (h * w)) % c, (i / w) % h, i % w);
            nhwc[((b * h + y) * w + xx) * c + ch] = *v;
        }
        let mut act = self.stem.forward(&nhwc, n, h, w, None, true)?;
        for (conv1, conv2, shortcut) in &self.blocks {
            let (oh, ow) = conv1.out_hw(h, w);
            let mid = conv1.forward(&act, n, h, w, None, true)?;
            let skip = match shortcut {
                Some(sc) => sc.forward(&act, n, h, w, None, false)?,
                None => act,
            };
            act = conv2.forward(&mid, n, oh, ow, Some(&skip), true)?;
            (h, w) = (oh, ow);
        }
        let channels = act.len() / (n * h * w);
        let mut pooled = vec![0.0f32; n * channels];
        for b in 0..n {
            for p in 0..h * w {
                for ch in 0..channels {
                    pooled[b * channels + ch] += act[(b * h * w + p) * channels + ch];
                }
            }
        }
        pooled.iter_mut().for_each(|v| *v /= (h * w) as f32);
        self.fc.forward(&pooled, n)
    }
}

impl Module for ResNet {
    fn forward(&self, g: &mut Graph, ps: &mut ParamStore, x: Var) -> Result<Var> {
        let h = self.stem.forward(g, ps, x)?;
        let h = self.stem_bn.forward(g, ps, h)?;
        let mut h = relu(g, h);
        for b in &self.blocks {
            h = b.forward(g, ps, h)?;
        }
        let h = global_avg_pool(g, h)?;
        self.fc.forward(g, ps, h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use asq_train::ops::loss::softmax_cross_entropy;

    #[test]
    fn resnet20_shapes_parameters_and_a_training_step() {
        for policy in [
            QuantPolicy::float(),
            QuantPolicy::lsq(4),
            QuantPolicy::asq_post(4).unwrap(),
        ] {
            let mut ps = ParamStore::new();
            let net = ResNet::cifar(&mut ps, 20, 1, 10, &policy, 1).unwrap();
            // ResNet-20 with projection shortcuts: about 0.27M weights.
            let weights: usize = ps
                .params()
                .iter()
                .filter(|p| {
                    p.name.ends_with("conv.weight")
                        || p.name.ends_with("conv1.weight")
                        || p.name.ends_with("conv2.weight")
                        || p.name == "fc.weight"
                })
                .map(|p| p.value.len())
                .sum();
            assert!((260_000..290_000).contains(&weights), "{weights}");
            let mut g = Graph::new(true);
            let x = g.input(Tensor::from_shape_fn(
                ndarray::IxDyn(&[2, 1, 28, 28]),
                |d| ((d[2] * 28 + d[3]) % 7) as f32 / 7.0,
            ));
            let y = net.forward(&mut g, &mut ps, x).unwrap();
            assert_eq!(g.shape(y), &[2, 10]);
            let l = softmax_cross_entropy(&mut g, y, &[1, 2], 0.0).unwrap();
            g.backward(l, &mut ps).unwrap();
            assert!(ps
                .params()
                .iter()
                .all(|p| p.grad.iter().all(|v| v.is_finite())));
        }
        assert!(
            ResNet::cifar(&mut ParamStore::new(), 21, 1, 10, &QuantPolicy::float(), 1).is_err()
        );
    }
}
