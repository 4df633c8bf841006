//! The model zoo: MLP, LeNet-5, ResNets (CIFAR `6n + 2`, 18, 34) and MobileNetV2, each
//! trainable with any [`QuantPolicy`] and exportable to the integer engine, behind one
//! [`Model`] chosen by name.

use asq_train::nn::{ActQuant, BatchNorm2d, Init, Module, QConv2d, QLinear, QuantConfig};
use asq_train::ops::act::{relu, relu6};
use asq_train::ops::basic::{add, flatten};
use asq_train::ops::conv::ConvSpec;
use asq_train::ops::pool::{global_avg_pool, max_pool2d};
use asq_train::{Error, Graph, ParamStore, Result, Var};

use crate::engine::{Act, InputSpec, IntModel, ModelSpec, Node, Op};
use crate::export::{conv_node, linear_node};
use crate::policy::QuantPolicy;
use crate::resnet::ResNet;

/// The architectures [`Model::build`] knows, for help texts.
pub const ARCH_NAMES: &str =
    "mlp, lenet5, resnet20 (resnet32, resnet44, ... 6n+2), resnet18, resnet34 (torchvision's), mobilenetv2, mobilenetv2-0.5 (torchvision's, any width), mobilenetv2-cifar, mobilenetv2-cifar-0.5 (small-image strides)";

/// The same configuration with signed activations: for layers whose input can be negative
/// (the output of a batch norm without ReLU, e.g. MobileNetV2's block outputs).
fn signed(cfg: &QuantConfig) -> QuantConfig {
    let acts = match cfg.acts {
        ActQuant::Lsq { bits, .. } => ActQuant::Lsq { bits, signed: true },
        ActQuant::Asq { bits, .. } => ActQuant::Asq { bits, signed: true },
        ActQuant::Float => ActQuant::Float,
    };
    QuantConfig {
        weights: cfg.weights.clone(),
        acts,
        step_grad: cfg.step_grad,
    }
}

fn spec(stride: usize, pad: usize, groups: usize) -> ConvSpec {
    ConvSpec {
        stride,
        pad,
        groups,
    }
}

/// Linear layers with ReLU between them (not after the last).
fn head_forward(g: &mut Graph, ps: &mut ParamStore, layers: &[QLinear], x: Var) -> Result<Var> {
    let mut h = x;
    for (i, l) in layers.iter().enumerate() {
        h = l.forward(g, ps, h)?;
        if i + 1 != layers.len() {
            h = relu(g, h);
        }
    }
    Ok(h)
}

/// Engine nodes of such a head reading value `input`, a flattened `(C, H, W)` feature map.
fn head_nodes(
    ps: &ParamStore,
    layers: &[QLinear],
    input: usize,
    chw: (usize, usize, usize),
) -> Result<Vec<Node>> {
    layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let act = if i + 1 == layers.len() {
                Act::None
            } else {
                Act::Relu
            };
            Ok(Node {
                input: input + i,
                op: linear_node(ps, l, (i == 0).then_some(chw), act)?,
            })
        })
        .collect()
}

/// Multilayer perceptron: flatten, two hidden layers of 256 with ReLU, classifier.
pub struct Mlp {
    layers: Vec<QLinear>,
    chw: (usize, usize, usize),
}

impl Mlp {
    /// For `(C, H, W)` images.
    pub fn new(
        ps: &mut ParamStore,
        chw: (usize, usize, usize),
        classes: usize,
        policy: &QuantPolicy,
        init: impl Into<Init>,
    ) -> Result<Self> {
        let mut init: Init = init.into();
        let features = chw.0 * chw.1 * chw.2;
        let layers = vec![
            QLinear::new(ps, "fc1", features, 256, &policy.first, &mut init)?,
            QLinear::new(ps, "fc2", 256, 256, &policy.body, &mut init)?,
            QLinear::new(ps, "fc3", 256, classes, &policy.last, &mut init)?,
        ];
        Ok(Self { layers, chw })
    }

    fn export_nodes(&self, ps: &ParamStore) -> Result<Vec<Node>> {
        head_nodes(ps, &self.layers, 0, self.chw)
    }
}

impl Module for Mlp {
    fn forward(&self, g: &mut Graph, ps: &mut ParamStore, x: Var) -> Result<Var> {
        let h = flatten(g, x)?;
        head_forward(g, ps, &self.layers, h)
    }
}

/// LeNet-5 with batch norm: conv 5x5 (6, padding 2), max pool, conv 5x5 (16), max pool,
/// 120, 84, classifier (ReLU throughout).
pub struct LeNet5 {
    conv1: QConv2d,
    bn1: BatchNorm2d,
    conv2: QConv2d,
    bn2: BatchNorm2d,
    fcs: Vec<QLinear>,
    /// Feature map entering the classifier head.
    flat: (usize, usize, usize),
}

impl LeNet5 {
    /// For `(C, H, W)` images (H, W >= 12).
    pub fn new(
        ps: &mut ParamStore,
        (c, h, w): (usize, usize, usize),
        classes: usize,
        policy: &QuantPolicy,
        init: impl Into<Init>,
    ) -> Result<Self> {
        if h < 12 || w < 12 {
            return Err(Error::Config(format!(
                "LeNet-5 needs images of at least 12x12, got {h}x{w}"
            )));
        }
        let mut init: Init = init.into();
        let conv1 = QConv2d::new(
            ps,
            "conv1",
            c,
            6,
            5,
            spec(1, 2, 1),
            &policy.first,
            &mut init,
        )?;
        let bn1 = BatchNorm2d::new(ps, "bn1", 6)?;
        let conv2 = QConv2d::new(
            ps,
            "conv2",
            6,
            16,
            5,
            spec(1, 0, 1),
            &policy.body,
            &mut init,
        )?;
        let bn2 = BatchNorm2d::new(ps, "bn2", 16)?;
        let flat = (16, (h / 2 - 4) / 2, (w / 2 - 4) / 2);
        let features = flat.0 * flat.1 * flat.2;
        let fcs = vec![
            QLinear::new(ps, "fc1", features, 120, &policy.body, &mut init)?,
            QLinear::new(ps, "fc2", 120, 84, &policy.body, &mut init)?,
            QLinear::new(ps, "fc3", 84, classes, &policy.last, &mut init)?,
        ];
        Ok(Self {
            conv1,
            bn1,
            conv2,
            bn2,
            fcs,
            flat,
        })
    }

    fn export_nodes(&self, ps: &ParamStore) -> Result<Vec<Node>> {
        let pool = || Op::MaxPool { size: 2, stride: 2 };
        let mut nodes = vec![
            Node {
                input: 0,
                op: conv_node(ps, &self.conv1, Some(&self.bn1), None, Act::Relu)?,
            },
            Node {
                input: 1,
                op: pool(),
            },
            Node {
                input: 2,
                op: conv_node(ps, &self.conv2, Some(&self.bn2), None, Act::Relu)?,
            },
            Node {
                input: 3,
                op: pool(),
            },
        ];
        nodes.extend(head_nodes(ps, &self.fcs, nodes.len(), self.flat)?);
        Ok(nodes)
    }
}

impl Module for LeNet5 {
    fn forward(&self, g: &mut Graph, ps: &mut ParamStore, x: Var) -> Result<Var> {
        let h = self.conv1.forward(g, ps, x)?;
        let h = self.bn1.forward(g, ps, h)?;
        let h = relu(g, h);
        let h = max_pool2d(g, h, 2, 2)?;
        let h = self.conv2.forward(g, ps, h)?;
        let h = self.bn2.forward(g, ps, h)?;
        let h = relu(g, h);
        let h = max_pool2d(g, h, 2, 2)?;
        let h = flatten(g, h)?;
        head_forward(g, ps, &self.fcs, h)
    }
}

/// One inverted residual block of MobileNetV2.
struct Inverted {
    expand: Option<(QConv2d, BatchNorm2d)>,
    dw: QConv2d,
    dw_bn: BatchNorm2d,
    project: QConv2d,
    project_bn: BatchNorm2d,
    residual: bool,
}

/// MobileNetV2 (Sandler et al. 2018) as torchvision builds it (`mobilenetv2`): 3x3 stride-2
/// stem, the paper's inverted-residual table with strides 1, 2, 2, 2, 1, 2, 1, a 1x1 conv to
/// 1280, global pooling and a classifier; ReLU6 throughout, channels scaled by a width multiplier
/// (rounded to multiples of 8 as torchvision's `_make_divisible`). The small-image variant
/// (`mobilenetv2-cifar`, [`MobileNetV2::small`]) has a stride-1 stem and strides 1, 1, 2, 2,
/// 1, 2, 1, as CIFAR variants use. Block outputs (batch norm, no ReLU) are signed, so the layers
/// reading them quantize signed activations. torchvision's classifier dropout (p = 0.2, training
/// only) is not applied: eval-mode outputs are torchvision's, fine-tuning runs without it.
pub struct MobileNetV2 {
    stem: QConv2d,
    stem_bn: BatchNorm2d,
    blocks: Vec<Inverted>,
    head: QConv2d,
    head_bn: BatchNorm2d,
    fc: QLinear,
}

fn divisible(v: f32) -> usize {
    let r = ((v + 4.0) as usize / 8 * 8).max(8);
    if (r as f32) < 0.9 * v {
        r + 8
    } else {
        r
    }
}

impl MobileNetV2 {
    /// torchvision's MobileNetV2 with width multiplier `width` (1.0 is the paper's network).
    pub fn new(
        ps: &mut ParamStore,
        in_channels: usize,
        classes: usize,
        width: f32,
        policy: &QuantPolicy,
        init: impl Into<Init>,
    ) -> Result<Self> {
        Self::build(ps, in_channels, classes, width, policy, init.into(), false)
    }

    /// The small-image variant: stride-1 stem, no downsampling in the second stage.
    pub fn small(
        ps: &mut ParamStore,
        in_channels: usize,
        classes: usize,
        width: f32,
        policy: &QuantPolicy,
        init: impl Into<Init>,
    ) -> Result<Self> {
        Self::build(ps, in_channels, classes, width, policy, init.into(), true)
    }

    fn build(
        ps: &mut ParamStore,
        in_channels: usize,
        classes: usize,
        width: f32,
        policy: &QuantPolicy,
        mut init: Init,
        small: bool,
    ) -> Result<Self> {
        if !(0.1..=4.0).contains(&width) {
            return Err(Error::Config(format!(
                "MobileNetV2 width multiplier {width} outside 0.1..=4"
            )));
        }
        let stem_c = divisible(32.0 * width);
        let stem = QConv2d::new(
            ps,
            "stem.conv",
            in_channels,
            stem_c,
            3,
            spec(if small { 1 } else { 2 }, 1, 1),
            &policy.first,
            &mut init,
        )?;
        let stem_bn = BatchNorm2d::new(ps, "stem.bn", stem_c)?;
        let table = [
            (1, 16, 1, 1),
            (6, 24, 2, if small { 1 } else { 2 }),
            (6, 32, 3, 2),
            (6, 64, 4, 2),
            (6, 96, 3, 1),
            (6, 160, 3, 2),
            (6, 320, 1, 1),
        ];
        let body = &policy.body;
        let mut blocks = Vec::new();
        let mut cin = stem_c;
        for (t, c, n, s) in table {
            let cout = divisible(c as f32 * width);
            for i in 0..n {
                let stride = if i == 0 { s } else { 1 };
                let name = format!("blocks.{}", blocks.len());
                let hidden = cin * t;
                let expand = if t != 1 {
                    let conv = QConv2d::new(
                        ps,
                        &format!("{name}.expand"),
                        cin,
                        hidden,
                        1,
                        spec(1, 0, 1),
                        &signed(body),
                        &mut init,
                    )?;
                    Some((
                        conv,
                        BatchNorm2d::new(ps, &format!("{name}.expand_bn"), hidden)?,
                    ))
                } else {
                    None
                };
                let dw = QConv2d::new(
                    ps,
                    &format!("{name}.dw"),
                    hidden,
                    hidden,
                    3,
                    spec(stride, 1, hidden),
                    body,
                    &mut init,
                )?;
                let dw_bn = BatchNorm2d::new(ps, &format!("{name}.dw_bn"), hidden)?;
                let project = QConv2d::new(
                    ps,
                    &format!("{name}.project"),
                    hidden,
                    cout,
                    1,
                    spec(1, 0, 1),
                    body,
                    &mut init,
                )?;
                let project_bn = BatchNorm2d::new(ps, &format!("{name}.project_bn"), cout)?;
                blocks.push(Inverted {
                    expand,
                    dw,
                    dw_bn,
                    project,
                    project_bn,
                    residual: stride == 1 && cin == cout,
                });
                cin = cout;
            }
        }
        let head_c = if width > 1.0 {
            divisible(1280.0 * width)
        } else {
            1280
        };
        let head = QConv2d::new(
            ps,
            "head.conv",
            cin,
            head_c,
            1,
            spec(1, 0, 1),
            &signed(body),
            &mut init,
        )?;
        let head_bn = BatchNorm2d::new(ps, "head.bn", head_c)?;
        let fc = QLinear::new(ps, "fc", head_c, classes, &policy.last, &mut init)?;
        Ok(Self {
            stem,
            stem_bn,
            blocks,
            head,
            head_bn,
            fc,
        })
    }

    fn export_nodes(&self, ps: &ParamStore) -> Result<Vec<Node>> {
        let mut nodes = Vec::new();
        let mut push = |op: Op, input: usize| {
            nodes.push(Node { input, op });
            nodes.len()
        };
        let mut cur = push(
            conv_node(ps, &self.stem, Some(&self.stem_bn), None, Act::Relu6)?,
            0,
        );
        for b in &self.blocks {
            let x = cur;
            let mut h = cur;
            if let Some((conv, bn)) = &b.expand {
                h = push(conv_node(ps, conv, Some(bn), None, Act::Relu6)?, h);
            }
            h = push(conv_node(ps, &b.dw, Some(&b.dw_bn), None, Act::Relu6)?, h);
            let residual = b.residual.then_some(x);
            cur = push(
                conv_node(ps, &b.project, Some(&b.project_bn), residual, Act::None)?,
                h,
            );
        }
        let h = push(
            conv_node(ps, &self.head, Some(&self.head_bn), None, Act::Relu6)?,
            cur,
        );
        let pooled = push(Op::GlobalAvgPool, h);
        push(linear_node(ps, &self.fc, None, Act::None)?, pooled);
        Ok(nodes)
    }
}

impl Module for MobileNetV2 {
    fn forward(&self, g: &mut Graph, ps: &mut ParamStore, x: Var) -> Result<Var> {
        let h = self.stem.forward(g, ps, x)?;
        let h = self.stem_bn.forward(g, ps, h)?;
        let mut h = relu6(g, h);
        for b in &self.blocks {
            let x = h;
            if let Some((conv, bn)) = &b.expand {
                h = conv.forward(g, ps, h)?;
                h = bn.forward(g, ps, h)?;
                h = relu6(g, h);
            }
            h = b.dw.forward(g, ps, h)?;
            h = b.dw_bn.forward(g, ps, h)?;
            h = relu6(g, h);
            h = b.project.forward(g, ps, h)?;
            h = b.project_bn.forward(g, ps, h)?;
            if b.residual {
                h = add(g, h, x)?;
            }
        }
        let h = self.head.forward(g, ps, h)?;
        let h = self.head_bn.forward(g, ps, h)?;
        let h = relu6(g, h);
        let h = global_avg_pool(g, h)?;
        self.fc.forward(g, ps, h)
    }
}

/// A zoo model of any architecture.
// One value per run, never moved in a loop: boxing the larger variants would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Model {
    /// [`Mlp`].
    Mlp(Mlp),
    /// [`LeNet5`].
    LeNet5(LeNet5),
    /// [`ResNet`].
    ResNet(ResNet),
    /// [`MobileNetV2`].
    MobileNetV2(MobileNetV2),
}

impl Model {
    /// Builds architecture `arch` (see [`ARCH_NAMES`]) for `(C, H, W)` images and `classes`
    /// classes with `policy`, registering its parameters in `ps`.
    pub fn build(
        arch: &str,
        ps: &mut ParamStore,
        chw: (usize, usize, usize),
        classes: usize,
        policy: &QuantPolicy,
        init: impl Into<Init>,
    ) -> Result<Self> {
        let unknown = || Error::Config(format!("unknown model {arch:?}; known: {ARCH_NAMES}"));
        if classes == 0 || chw.0 == 0 || chw.1 == 0 || chw.2 == 0 {
            return Err(Error::Config(format!(
                "a model needs classes and non-empty images, got {classes} classes of {chw:?}"
            )));
        }
        Ok(match arch {
            "mlp" => Model::Mlp(Mlp::new(ps, chw, classes, policy, init)?),
            "lenet5" => Model::LeNet5(LeNet5::new(ps, chw, classes, policy, init)?),
            "mobilenetv2" => {
                Model::MobileNetV2(MobileNetV2::new(ps, chw.0, classes, 1.0, policy, init)?)
            }
            "mobilenetv2-cifar" => {
                Model::MobileNetV2(MobileNetV2::small(ps, chw.0, classes, 1.0, policy, init)?)
            }
            _ => {
                if let Some(w) = arch.strip_prefix("mobilenetv2-cifar-") {
                    let width: f32 = w.parse().map_err(|_| unknown())?;
                    Model::MobileNetV2(MobileNetV2::small(ps, chw.0, classes, width, policy, init)?)
                } else if let Some(w) = arch.strip_prefix("mobilenetv2-") {
                    let width: f32 = w.parse().map_err(|_| unknown())?;
                    Model::MobileNetV2(MobileNetV2::new(ps, chw.0, classes, width, policy, init)?)
                } else if let Some(d) = arch.strip_prefix("resnet") {
                    let depth: usize = d.parse().map_err(|_| unknown())?;
                    Model::ResNet(match depth {
                        18 | 34 => ResNet::basic(ps, depth, chw.0, classes, policy, init)?,
                        _ => ResNet::cifar(ps, depth, chw.0, classes, policy, init)?,
                    })
                } else {
                    return Err(unknown());
                }
            }
        })
    }

    /// Exports the trained, fully quantized model to the integer engine (batch norms folded,
    /// residuals and activations fused). `input` gives the image size and normalisation.
    pub fn export(&self, ps: &ParamStore, name: &str, input: InputSpec) -> Result<IntModel> {
        let nodes = match self {
            Model::Mlp(m) => m.export_nodes(ps)?,
            Model::LeNet5(m) => m.export_nodes(ps)?,
            Model::MobileNetV2(m) => m.export_nodes(ps)?,
            Model::ResNet(m) => m.export_nodes(ps)?,
        };
        // Every zoo model ends with its linear classifier: its width is the class count.
        let classes = match &nodes.last().expect("models have layers").op {
            Op::Linear { bias, .. } => bias.len(),
            _ => unreachable!("every zoo model ends with a linear classifier"),
        };
        IntModel::new(ModelSpec {
            name: name.to_string(),
            input,
            classes,
            nodes,
            meta: Default::default(),
        })
    }
}

impl Module for Model {
    fn forward(&self, g: &mut Graph, ps: &mut ParamStore, x: Var) -> Result<Var> {
        match self {
            Model::Mlp(m) => m.forward(g, ps, x),
            Model::LeNet5(m) => m.forward(g, ps, x),
            Model::ResNet(m) => m.forward(g, ps, x),
            Model::MobileNetV2(m) => m.forward(g, ps, x),
        }
    }
}
