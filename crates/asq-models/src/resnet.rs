//! ResNets of basic blocks (He et al. 2016).
//!
//! - CIFAR-style ([`ResNet::cifar`]): a 3x3 stem, three stages with 16, 32 and 64 channels
//!   (stride 2 at the start of stages 2 and 3, 1x1 projection shortcuts there), global average
//!   pooling and a linear classifier. Depth `6n + 2`: ResNet-20 is `n = 3`.
//! - torchvision's ResNet-18/34 ([`ResNet::basic`]): a 7x7 stride-2 stem, batch norm, ReLU and
//!   a 3x3 stride-2 max pool (padding 1), then four stages of 64/128/256/512 channels; the same
//!   modules in the same order as `torchvision.models.resnet18/34`, for any input size and class
//!   count, so that its state dicts import (`crate::torch`).

use asq_train::nn::{BatchNorm2d, Init, Module, QConv2d, QLinear};
use asq_train::ops::conv::ConvSpec;
use asq_train::ops::norm::BnAct;
use asq_train::ops::pool::{global_avg_pool, max_pool2d_padded};
use asq_train::{Error, Graph, ParamStore, Result, Var};

use crate::engine::{Act, InputSpec, IntModel, ModelSpec, Node, Op};
use crate::export::{conv_node, linear_node};

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
        // conv2(relu(bn1(h))), one op in float training (the normalised h never written).
        let h = self.conv2.forward_after_bn_relu(g, ps, &self.bn1, h)?;
        let s = match &self.shortcut {
            Some((conv, bn)) => {
                let s = conv.forward(g, ps, x)?;
                bn.forward(g, ps, s)?
            }
            None => x,
        };
        // relu(bn2(h) + s) as one op in training.
        self.bn2.forward_act(g, ps, h, Some(s), BnAct::Relu)
    }
}

/// torchvision's stem pooling: `MaxPool2d(3, stride 2, padding 1)`.
const STEM_POOL: (usize, usize, usize) = (3, 2, 1);

/// A ResNet of basic blocks (CIFAR-style or torchvision's ResNet-18/34).
pub struct ResNet {
    stem: QConv2d,
    stem_bn: BatchNorm2d,
    /// torchvision's 7x7 stride-2 stem followed by a max pool (`false`: the 3x3 small stem).
    imagenet_stem: bool,
    blocks: Vec<Block>,
    fc: QLinear,
    classes: usize,
}

impl ResNet {
    /// CIFAR ResNet of depth `6n + 2` (16, 32, 64 channels; ResNet-20 is `n = 3`) for
    /// `in_channels`-channel images and `classes` classes.
    pub fn cifar(
        ps: &mut ParamStore,
        depth: usize,
        in_channels: usize,
        classes: usize,
        policy: &QuantPolicy,
        init: impl Into<Init>,
    ) -> Result<Self> {
        if depth < 8 || !(depth - 2).is_multiple_of(6) {
            return Err(Error::Config(format!(
                "CIFAR ResNet depth must be 6n + 2 (20, 32, 44, 56...), got {depth}"
            )));
        }
        let n = (depth - 2) / 6;
        Self::new(
            ps,
            &[(16, n), (32, n), (64, n)],
            in_channels,
            classes,
            policy,
            init,
        )
    }

    /// torchvision's ResNet-18 or -34: the 7x7 stride-2 stem (padding 3), batch norm, ReLU and
    /// a 3x3 stride-2 max pool (padding 1), then basic blocks of 64, 128, 256, 512 channels
    /// (2-2-2-2 or 3-4-6-3). Inputs of any size from 32x32 up (a 28x28 image ends stage 4 at 1x1).
    pub fn basic(
        ps: &mut ParamStore,
        depth: usize,
        in_channels: usize,
        classes: usize,
        policy: &QuantPolicy,
        init: impl Into<Init>,
    ) -> Result<Self> {
        let blocks = match depth {
            18 => [2, 2, 2, 2],
            34 => [3, 4, 6, 3],
            _ => {
                return Err(Error::Config(format!(
                    "basic-block ResNets are 18 or 34 deep, got {depth}"
                )))
            }
        };
        let stages: Vec<(usize, usize)> = [64, 128, 256, 512].into_iter().zip(blocks).collect();
        Self::build(ps, &stages, in_channels, classes, policy, init.into(), true)
    }

    /// A ResNet of basic blocks: a 3x3 stem with the first stage's width, then `(width,
    /// blocks)` per stage (stride 2 at the start of every stage but the first, 1x1 projection
    /// shortcuts where the shape changes), global average pooling and a linear classifier.
    pub fn new(
        ps: &mut ParamStore,
        stages: &[(usize, usize)],
        in_channels: usize,
        classes: usize,
        policy: &QuantPolicy,
        init: impl Into<Init>,
    ) -> Result<Self> {
        Self::build(ps, stages, in_channels, classes, policy, init.into(), false)
    }

    fn build(
        ps: &mut ParamStore,
        stages: &[(usize, usize)],
        in_channels: usize,
        classes: usize,
        policy: &QuantPolicy,
        mut init: Init,
        imagenet_stem: bool,
    ) -> Result<Self> {
        let Some(&(stem_width, _)) = stages.first() else {
            return Err(Error::Config("a ResNet needs at least one stage".into()));
        };
        let same = ConvSpec {
            stride: 1,
            pad: 1,
            groups: 1,
        };
        let (stem_kernel, stem_spec) = if imagenet_stem {
            (
                7,
                ConvSpec {
                    stride: 2,
                    pad: 3,
                    groups: 1,
                },
            )
        } else {
            (3, same)
        };
        let stem = QConv2d::new(
            ps,
            "stem.conv",
            in_channels,
            stem_width,
            stem_kernel,
            stem_spec,
            &policy.first,
            &mut init,
        )?;
        let stem_bn = BatchNorm2d::new(ps, "stem.bn", stem_width)?;
        let mut blocks = Vec::new();
        let mut cin = stem_width;
        for (stage, &(cout, n)) in stages.iter().enumerate() {
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
                    &mut init,
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
                    &mut init,
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
                        &mut init,
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
        let fc = QLinear::new(ps, "fc", cin, classes, &policy.last, &mut init)?;
        Ok(Self {
            stem,
            stem_bn,
            imagenet_stem,
            blocks,
            fc,
            classes,
        })
    }
}

impl ResNet {
    /// Exports a trained, fully quantized model (every conv and the classifier quantized) to
    /// the integer engine: batch norms folded into the epilogues, residual additions and ReLUs
    /// fused. `input` gives the image size and the training normalisation.
    pub fn export(&self, ps: &ParamStore, input: InputSpec) -> Result<IntModel> {
        IntModel::new(ModelSpec {
            name: format!("resnet{}", self.blocks.len() * 2 + 2),
            input,
            classes: self.classes,
            nodes: self.export_nodes(ps)?,
            meta: Default::default(),
        })
    }

    pub(crate) fn export_nodes(&self, ps: &ParamStore) -> Result<Vec<Node>> {
        let mut nodes = Vec::new();
        let mut push = |op: Op, input: usize| {
            nodes.push(Node { input, op });
            nodes.len()
        };
        let mut cur = push(
            conv_node(ps, &self.stem, Some(&self.stem_bn), None, Act::Relu)?,
            0,
        );
        if self.imagenet_stem {
            let (size, stride, pad) = STEM_POOL;
            cur = push(Op::MaxPoolPadded { size, stride, pad }, cur);
        }
        for b in &self.blocks {
            let mid = push(conv_node(ps, &b.conv1, Some(&b.bn1), None, Act::Relu)?, cur);
            let skip = match &b.shortcut {
                Some((c, bn)) => push(conv_node(ps, c, Some(bn), None, Act::None)?, cur),
                None => cur,
            };
            cur = push(
                conv_node(ps, &b.conv2, Some(&b.bn2), Some(skip), Act::Relu)?,
                mid,
            );
        }
        let pooled = push(Op::GlobalAvgPool, cur);
        push(linear_node(ps, &self.fc, None, Act::None)?, pooled);
        Ok(nodes)
    }
}

impl Module for ResNet {
    fn forward(&self, g: &mut Graph, ps: &mut ParamStore, x: Var) -> Result<Var> {
        let h = self.stem.forward(g, ps, x)?;
        let mut h = self.stem_bn.forward_act(g, ps, h, None, BnAct::Relu)?;
        if self.imagenet_stem {
            let (size, stride, pad) = STEM_POOL;
            h = max_pool2d_padded(g, h, size, stride, pad)?;
        }
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
    use asq_train::Tensor;

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
