//! Exported models: a small graph of integer layers ([`IntModel`]) that runs on `asq-kernels`,
//! and its file format (`.asqm`).
//!
//! A model is a list of nodes run in order. Value 0 is the (normalised) input image, node `i`
//! produces value `i + 1`; values are NHWC f32 tensors per sample. Every convolution and linear
//! layer quantizes its input per sample (step `s · beta`, the ASQ adapter evaluated in float on
//! the pooled input), runs the integer kernel, and applies the fused epilogue (batch norm
//! folded into the per-channel scales and bias, residual addition, ReLU; ReLU6 clamps after).
//! Pooling works on the f32 values.
//!
//! File layout: magic `ASQMODL1` (8 bytes), format version (u32 LE), payload length (u64 LE),
//! FNV-1a 64 checksum of the payload (u64 LE), payload = bincode 2 (standard config, bounded by
//! [`MAX_MODEL_BYTES`]) of [`ModelSpec`]. Packed weights inside are the `ASQW` buffers of
//! `asq-kernels`. Loading validates everything before any kernel runs: header, checksum,
//! every weight buffer, every shape along the graph (so inference cannot fail on a shape),
//! finiteness of every float, node references. Writes are atomic (temporary file + rename).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use asq_core::quant::Steps;
use asq_core::QuantRange;
use asq_kernels::conv::{Conv2dShape, DepthwiseWeights, ImplicitConv};
use asq_kernels::{Epilogue, PackedWeights, QuantActivations};
use asq_train::checkpoint::atomic_write;
use asq_train::framed::Format;
use asq_train::{Error, Result};
use serde::{Deserialize, Serialize};

/// Largest model file accepted (256 MiB: ResNet-34 at 8 bits fits).
pub const MAX_MODEL_BYTES: usize = 1 << 28;
/// The `.asqm` container: magic, version, size limit.
pub const FORMAT: Format = Format {
    magic: b"ASQMODL1",
    version: 1,
    limit: MAX_MODEL_BYTES,
    what: "model",
};
impl Op {
    /// A short description for reports: `conv3x3/s1`, `dw3x3/s2`, `linear`, `maxpool2`, `gap`.
    pub fn kind(&self) -> String {
        match self {
            Op::Conv {
                kernel: (kh, kw),
                stride,
                depthwise,
                ..
            } => format!(
                "{}{kh}x{kw}/s{stride}",
                if *depthwise { "dw" } else { "conv" }
            ),
            Op::Linear { .. } => "linear".into(),
            Op::MaxPool { size, .. } | Op::MaxPoolPadded { size, .. } => format!("maxpool{size}"),
            Op::GlobalAvgPool => "gap".into(),
        }
    }
}

/// Seconds one node of [`IntModel::profile`] spent in each part.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeTime {
    /// The node's operation ([`Op::kind`]).
    pub op: String,
    /// Quantizing the float input to codes.
    pub quantize: f64,
    /// im2col on the codes, for convolutions whose window rows are not whole groups of 4 codes
    /// (implicit convolutions are quantized straight into their padded layout: `quantize`).
    pub im2col: f64,
    /// The integer kernel with its epilogue (GEMM, depthwise), or the pooling.
    pub kernel: f64,
}

/// Images per chunk of [`IntModel::forward`]: keeps a ResNet-20's im2col buffers and
/// activations in L2 (batch 64 on one Zen 3 thread: 608 images/s unchunked, 1,174 in chunks
/// of 4).
pub const CHUNK: usize = 4;
/// Largest input height, width or channel count accepted from a file.
pub const MAX_INPUT_DIM: usize = 1 << 12;

fn kernel_error(e: asq_kernels::Error) -> Error {
    Error::Config(format!("integer engine: {e}"))
}

/// The activation applied after a layer's epilogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Act {
    /// Identity.
    None,
    /// `max(x, 0)` (fused into the kernel epilogue).
    Relu,
    /// `min(max(x, 0), 6)` (MobileNetV2).
    Relu6,
}

/// The ASQ adapter evaluated in float: pooled channel means -> `beta` (linear, ReLU, ...,
/// clamp at 1e-8), as the training graph computes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FloatAdapter {
    /// Layers as (weights `[out, in]` row-major, bias `[out]`, out, in).
    pub layers: Vec<(Vec<f32>, Vec<f32>, usize, usize)>,
}

impl FloatAdapter {
    /// `beta` of one sample from its channel means.
    pub fn beta(&self, pooled: &[f32]) -> f32 {
        let mut h = pooled.to_vec();
        for (w, b, out, inp) in &self.layers {
            h = (0..*out)
                .map(|o| (dot(&h, &w[o * inp..(o + 1) * inp]) + b[o]).max(0.0))
                .collect();
        }
        h[0].max(1e-8)
    }

    fn validate(&self, channels: usize) -> std::result::Result<(), String> {
        let mut width = channels;
        if self.layers.is_empty() {
            return Err("adapter without layers".into());
        }
        for (i, (w, b, out, inp)) in self.layers.iter().enumerate() {
            if *inp != width || w.len() != out * inp || b.len() != *out || *out == 0 {
                return Err(format!(
                    "adapter layer {i}: [{out}, {inp}] with {} weights and {} biases after {width} features",
                    w.len(),
                    b.len()
                ));
            }
            if w.iter().chain(b).any(|v| !v.is_finite()) {
                return Err(format!("adapter layer {i} has a non-finite value"));
            }
            width = *out;
        }
        if width != 1 {
            return Err(format!("adapter ends with {width} outputs, not 1"));
        }
        Ok(())
    }
}

/// Dot product with 8 independent partial sums (vectorizes; the adapter is evaluated in float,
/// its summation order is not part of any exactness contract).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// How a layer quantizes its input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputQuant {
    /// Code width (2..=8).
    pub bits: u32,
    /// Signed codes (inputs that can be negative, like the normalised image).
    pub signed: bool,
    /// The learnt step `s`.
    pub step: f32,
    /// ASQ: the adapter giving each sample its `beta` (LSQ: none, `beta = 1`).
    pub adapter: Option<FloatAdapter>,
}

impl InputQuant {
    fn range(&self) -> Result<QuantRange> {
        Ok(if self.signed {
            QuantRange::signed(self.bits)?
        } else {
            QuantRange::unsigned(self.bits)?
        })
    }
}

/// One operation of an exported model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// Convolution (or depthwise convolution) with folded batch norm.
    Conv {
        /// `ASQW` buffer: `[C_out, KH·KW·C_in]` in (ky, kx, c) order, or `[C, KH·KW]` depthwise.
        weights: Vec<u8>,
        /// Window (KH, KW).
        kernel: (usize, usize),
        /// Stride.
        stride: usize,
        /// Zero padding.
        pad: usize,
        /// One filter per channel.
        depthwise: bool,
        /// Per-channel bias (batch norm folded).
        bias: Vec<f32>,
        /// Input quantization.
        quant: InputQuant,
        /// Value added before the activation (a residual connection), same shape as the output.
        residual: Option<usize>,
        /// Activation.
        act: Act,
    },
    /// Fully connected layer on the flattened input (NHWC order).
    Linear {
        /// `ASQW` buffer `[out, in]`.
        weights: Vec<u8>,
        /// Bias `[out]`.
        bias: Vec<f32>,
        /// Input quantization (an ASQ adapter sees the flattened features).
        quant: InputQuant,
        /// Activation.
        act: Act,
    },
    /// Max pooling without padding.
    MaxPool {
        /// Window size (square).
        size: usize,
        /// Stride.
        stride: usize,
    },
    /// Mean over the spatial positions.
    GlobalAvgPool,
    /// Max pooling over the input padded by `pad` on every side; padding never wins a window
    /// (PyTorch's `MaxPool2d(size, stride, pad)`, as after torchvision's ResNet stem). A
    /// separate variant, appended, so that files written before it still read.
    MaxPoolPadded {
        /// Window size (square).
        size: usize,
        /// Stride.
        stride: usize,
        /// Padding on every side (at most `size / 2`).
        pad: usize,
    },
}

impl Op {
    /// `(size, stride, pad)` of a max pooling node.
    fn max_pool(&self) -> Option<(usize, usize, usize)> {
        match *self {
            Op::MaxPool { size, stride } => Some((size, stride, 0)),
            Op::MaxPoolPadded { size, stride, pad } => Some((size, stride, pad)),
            _ => None,
        }
    }
}

/// A node: an operation on one earlier value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// The value it reads (0 = model input, `i + 1` = output of node `i`).
    pub input: usize,
    /// What it computes.
    pub op: Op,
}

/// The model input: image size and the normalisation used in training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputSpec {
    /// Channels.
    pub channels: usize,
    /// Height.
    pub height: usize,
    /// Width.
    pub width: usize,
    /// Per-channel mean of pixels scaled to [0, 1].
    pub mean: Vec<f32>,
    /// Per-channel standard deviation.
    pub std: Vec<f32>,
}

/// Everything stored in a model file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Architecture name (for reports).
    pub name: String,
    /// Input description.
    pub input: InputSpec,
    /// Number of output classes (the last node's width).
    pub classes: usize,
    /// Nodes in execution order.
    pub nodes: Vec<Node>,
    /// Free-form metadata (quantization, training data, accuracy...).
    pub meta: BTreeMap<String, String>,
}

/// Decoded weights of a node.
enum Kernel {
    Gemm(PackedWeights),
    Depthwise(DepthwiseWeights, PackedWeights),
    None,
}

/// Error text of a team thread that stopped because another one failed.
const STOPPED: &str = "stopped: another thread of the pass failed";

/// A value of [`IntModel::forward_team`]: its rows in parts, each claimed by one thread and
/// published once.
struct Slot {
    parts: Vec<OnceLock<Vec<f32>>>,
    claimed: Vec<AtomicBool>,
}

impl Slot {
    fn new(parts: usize) -> Self {
        Self {
            parts: (0..parts).map(|_| OnceLock::new()).collect(),
            claimed: (0..parts).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// A slot holding `v` already.
    fn with(v: Vec<f32>) -> Self {
        let slot = Self::new(1);
        slot.claimed[0].store(true, Ordering::Relaxed);
        slot.parts[0].set(v).expect("a new slot");
        slot
    }

    /// The parts, once every one is published (spinning: parts take microseconds); an error if
    /// another thread failed meanwhile.
    fn pieces(&self, failed: &AtomicBool) -> Result<Vec<&[f32]>> {
        let mut got: Vec<&[f32]> = Vec::with_capacity(self.parts.len());
        for part in &self.parts {
            let mut spins = 0u32;
            let v = loop {
                if let Some(v) = part.get() {
                    break v;
                }
                if failed.load(Ordering::Acquire) {
                    return Err(Error::Config(STOPPED.into()));
                }
                spins += 1;
                if spins < 1 << 14 {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            };
            got.push(v);
        }
        Ok(got)
    }

    /// The whole value (see [`Slot::pieces`]).
    fn gather(&self, failed: &AtomicBool) -> Result<std::borrow::Cow<'_, [f32]>> {
        Ok(match self.pieces(failed)?.as_slice() {
            [one] => std::borrow::Cow::Borrowed(*one),
            many => std::borrow::Cow::Owned(many.concat()),
        })
    }

    /// Values `range` of the whole value: borrowed when one part holds them (a residual read
    /// by a layer split the same way), else copied.
    fn range(
        &self,
        range: std::ops::Range<usize>,
        failed: &AtomicBool,
    ) -> Result<std::borrow::Cow<'_, [f32]>> {
        let pieces = self.pieces(failed)?;
        let mut start = 0;
        for p in &pieces {
            if range.start >= start && range.end <= start + p.len() {
                return Ok(std::borrow::Cow::Borrowed(
                    &p[range.start - start..range.end - start],
                ));
            }
            start += p.len();
        }
        Ok(std::borrow::Cow::Owned(pieces.concat()[range].to_vec()))
    }
}

/// A validated model ready to run.
pub struct IntModel {
    spec: ModelSpec,
    kernels: Vec<Kernel>,
    /// `[h, w, c]` of every value.
    shapes: Vec<[usize; 3]>,
    /// The last node reading each value (values are freed after it).
    last_use: Vec<usize>,
}

impl std::fmt::Debug for IntModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntModel")
            .field("name", &self.spec.name)
            .field("nodes", &self.spec.nodes.len())
            .field("classes", &self.spec.classes)
            .finish()
    }
}

fn finite(what: &str, v: &[f32]) -> std::result::Result<(), String> {
    match v.iter().position(|x| !x.is_finite()) {
        Some(i) => Err(format!("{what}[{i}] = {} is not finite", v[i])),
        None => Ok(()),
    }
}

impl IntModel {
    /// Validates `spec` (weights, shapes along the graph, references, finiteness) and decodes
    /// its weights.
    pub fn new(spec: ModelSpec) -> Result<Self> {
        Self::build(spec).map_err(|e| Error::Config(format!("model: {e}")))
    }

    fn build(spec: ModelSpec) -> std::result::Result<Self, String> {
        let inp = &spec.input;
        for (what, v) in [
            ("channels", inp.channels),
            ("height", inp.height),
            ("width", inp.width),
        ] {
            if v == 0 || v > MAX_INPUT_DIM {
                return Err(format!("input {what} {v} outside 1..={MAX_INPUT_DIM}"));
            }
        }
        if inp.mean.len() != inp.channels || inp.std.len() != inp.channels {
            return Err(format!(
                "normalisation has {} means and {} deviations for {} channels",
                inp.mean.len(),
                inp.std.len(),
                inp.channels
            ));
        }
        finite("input mean", &inp.mean)?;
        finite("input std", &inp.std)?;
        if inp.std.iter().any(|s| *s <= 0.0) {
            return Err("input std must be positive".into());
        }
        if spec.nodes.is_empty() || spec.classes == 0 {
            return Err("a model needs nodes and at least one class".into());
        }
        let mut shapes = vec![[inp.height, inp.width, inp.channels]];
        let mut kernels = Vec::with_capacity(spec.nodes.len());
        let mut last_use = vec![0usize; spec.nodes.len() + 1];
        for (i, node) in spec.nodes.iter().enumerate() {
            let at = |what: &str| format!("node {i} ({what})");
            if node.input > i {
                return Err(format!(
                    "{}: reads value {} not computed yet",
                    at("input"),
                    node.input
                ));
            }
            last_use[node.input] = i;
            let [h, w, c] = shapes[node.input];
            let (kernel, shape) = match &node.op {
                Op::Conv {
                    weights,
                    kernel: (kh, kw),
                    stride,
                    pad,
                    depthwise,
                    bias,
                    quant,
                    residual,
                    ..
                } => {
                    let pw = PackedWeights::from_bytes(weights)
                        .map_err(|e| format!("{}: {e}", at("conv weights")))?;
                    check_quant(quant, c).map_err(|e| format!("{}: {e}", at("conv input")))?;
                    if *kh == 0 || *kw == 0 || *stride == 0 || *pad > 64 || *stride > 64 {
                        return Err(format!(
                            "{}: window {kh}x{kw}, stride {stride}, pad {pad}",
                            at("conv")
                        ));
                    }
                    if h + 2 * pad < *kh || w + 2 * pad < *kw {
                        return Err(format!(
                            "{}: {kh}x{kw} window over a {h}x{w} input padded by {pad}",
                            at("conv")
                        ));
                    }
                    let out_c = pw.rows();
                    let kernel = if *depthwise {
                        if pw.rows() != c || pw.cols() != kh * kw {
                            return Err(format!(
                                "{}: weights [{}, {}] for {c} channels of {kh}x{kw}",
                                at("depthwise"),
                                pw.rows(),
                                pw.cols()
                            ));
                        }
                        let dw = DepthwiseWeights::new(&pw, *kh, *kw)
                            .map_err(|e| format!("{}: {e}", at("depthwise")))?;
                        Kernel::Depthwise(dw, pw)
                    } else {
                        if pw.cols() != kh * kw * c {
                            return Err(format!(
                                "{}: weights have K = {}, a {kh}x{kw} window over {c} channels needs {}",
                                at("conv"),
                                pw.cols(),
                                kh * kw * c
                            ));
                        }
                        Kernel::Gemm(pw)
                    };
                    if bias.len() != out_c {
                        return Err(format!(
                            "{}: {} biases for {out_c} channels",
                            at("conv"),
                            bias.len()
                        ));
                    }
                    finite("bias", bias).map_err(|e| format!("{}: {e}", at("conv")))?;
                    let shape = [
                        (h + 2 * pad - kh) / stride + 1,
                        (w + 2 * pad - kw) / stride + 1,
                        out_c,
                    ];
                    if let Some(r) = residual {
                        if *r > i || shapes[*r] != shape {
                            return Err(format!(
                                "{}: residual value {r} {:?} does not match the output {shape:?}",
                                at("conv"),
                                shapes.get(*r)
                            ));
                        }
                        last_use[*r] = i;
                    }
                    (kernel, shape)
                }
                Op::Linear {
                    weights,
                    bias,
                    quant,
                    ..
                } => {
                    let pw = PackedWeights::from_bytes(weights)
                        .map_err(|e| format!("{}: {e}", at("linear weights")))?;
                    check_quant(quant, h * w * c)
                        .map_err(|e| format!("{}: {e}", at("linear input")))?;
                    if pw.cols() != h * w * c {
                        return Err(format!(
                            "{}: weights take {} features, the input has {}",
                            at("linear"),
                            pw.cols(),
                            h * w * c
                        ));
                    }
                    if bias.len() != pw.rows() {
                        return Err(format!(
                            "{}: {} biases for {} outputs",
                            at("linear"),
                            bias.len(),
                            pw.rows()
                        ));
                    }
                    finite("bias", bias).map_err(|e| format!("{}: {e}", at("linear")))?;
                    let shape = [1, 1, pw.rows()];
                    (Kernel::Gemm(pw), shape)
                }
                Op::MaxPool { .. } | Op::MaxPoolPadded { .. } => {
                    let (size, stride, pad) = node.op.max_pool().expect("a max pool");
                    let (hp, wp) = (h + 2 * pad, w + 2 * pad);
                    if size == 0 || stride == 0 || hp < size || wp < size || 2 * pad > size {
                        return Err(format!(
                            "{}: window {size}, stride {stride}, padding {pad} over {h}x{w}",
                            at("max pool")
                        ));
                    }
                    (
                        Kernel::None,
                        [(hp - size) / stride + 1, (wp - size) / stride + 1, c],
                    )
                }
                Op::GlobalAvgPool => (Kernel::None, [1, 1, c]),
            };
            kernels.push(kernel);
            shapes.push(shape);
        }
        let out = shapes[spec.nodes.len()];
        if out != [1, 1, spec.classes] {
            return Err(format!(
                "the last node gives {out:?}, not {} classes",
                spec.classes
            ));
        }
        last_use[spec.nodes.len()] = usize::MAX;
        Ok(Self {
            spec,
            kernels,
            shapes,
            last_use,
        })
    }

    /// The stored description.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// `[height, width, channels]` of value `v` per sample (0 = input, `i + 1` = node `i`).
    pub fn shape(&self, v: usize) -> Option<[usize; 3]> {
        self.shapes.get(v).copied()
    }

    /// The decoded weights of node `i` (convolutions, depthwise ones too, and linear layers).
    pub fn weights(&self, i: usize) -> Option<&PackedWeights> {
        match self.kernels.get(i)? {
            Kernel::Gemm(w) | Kernel::Depthwise(_, w) => Some(w),
            Kernel::None => None,
        }
    }

    /// Bytes of packed weight codes (what inference streams).
    pub fn weight_bytes(&self) -> usize {
        self.kernels
            .iter()
            .map(|k| match k {
                Kernel::Gemm(w) | Kernel::Depthwise(_, w) => w.code_bytes(),
                Kernel::None => 0,
            })
            .sum()
    }

    /// Logits `[n, classes]` for raw 8-bit images `[n, C, H, W]` (normalised as in training).
    pub fn forward_u8(&self, images: &[u8], n: usize) -> Result<Vec<f32>> {
        let inp = &self.spec.input;
        let per = inp.channels * inp.height * inp.width;
        if images.len() != n * per || n == 0 {
            return Err(Error::Config(format!(
                "{} pixels for {n} images of {}x{}x{}",
                images.len(),
                inp.channels,
                inp.height,
                inp.width
            )));
        }
        let hw = inp.height * inp.width;
        let mut x = vec![0.0f32; images.len()];
        for (i, (src, dst)) in images
            .chunks_exact(hw)
            .zip(x.chunks_exact_mut(hw))
            .enumerate()
        {
            let ch = i % inp.channels;
            let (m, sd) = (inp.mean[ch], inp.std[ch]);
            for (d, &p) in dst.iter_mut().zip(src) {
                *d = (p as f32 / 255.0 - m) / sd;
            }
        }
        self.forward(&x, n)
    }

    /// Logits `[n, classes]` for normalised images `[n, C, H, W]` (NCHW, as in training).
    ///
    /// Large batches run in chunks of [`CHUNK`] images so that activations stay in cache, and
    /// with several rayon threads the chunks run in parallel (each thread whole layers on its
    /// images); every sample is computed independently (per-sample scales), so the logits do not
    /// depend on the batch, the chunking or the thread count.
    pub fn forward(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        let [h, w, c] = self.shapes[0];
        if x.len() != n * c * h * w || n == 0 {
            return Err(Error::Config(format!(
                "input of {} values for {n} images of {c}x{h}x{w}",
                x.len()
            )));
        }
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite(format!("model input at {i} ({})", x[i])));
        }
        let per = c * h * w;
        let chunks: Vec<&[f32]> = x.chunks(CHUNK * per).collect();
        let parts: Vec<Vec<f32>> = if chunks.len() > 1 && rayon::current_num_threads() > 1 {
            // Threads take whole chunks of images (each runs every layer on its images, with
            // the kernels on its own thread): no synchronisation inside a layer.
            use rayon::prelude::*;
            chunks
                .par_iter()
                .map(|chunk| asq_kernels::serial(|| self.forward_chunk(chunk, chunk.len() / per)))
                .collect::<Result<_>>()?
        } else if rayon::current_num_threads() > 1 {
            // One chunk (small batches, batch 1): a team of threads splits every layer by
            // output rows (see `forward_team`).
            vec![self.forward_team(x, n, rayon::current_num_threads())?]
        } else {
            chunks
                .iter()
                .map(|chunk| self.forward_chunk(chunk, chunk.len() / per))
                .collect::<Result<_>>()?
        };
        Ok(parts.concat())
    }

    /// The forward pass of one chunk by a team of `threads` rayon threads that split every
    /// implicit-GEMM convolution by output rows (one part per thread), node after node, without
    /// a rayon hand-off per layer: a batch-1 ResNet-20 layer is 20-50 µs, about what waking a
    /// sleeping thread costs. Each thread claims parts (an atomic flag per part), quantizes the
    /// layer's input itself (the same codes on every thread) and publishes its rows; a thread
    /// needing rows another thread claimed spins until they are published. A thread that
    /// starts late finds the parts claimed, so one thread alone still finishes the pass (no
    /// deadlock when the pool is busy). Every output has the same bits as in
    /// [`IntModel::forward_chunk`]: the integer sums are exact and the epilogue is per output.
    fn forward_team(&self, x: &[f32], n: usize, threads: usize) -> Result<Vec<f32>> {
        let nhwc = self.to_nhwc(x);
        let slots: Vec<Slot> = std::iter::once(Slot::with(nhwc))
            .chain((0..self.spec.nodes.len()).map(|i| {
                let parts = if self.splits(i) { threads } else { 1 };
                Slot::new(parts)
            }))
            .collect();
        let failed = AtomicBool::new(false);
        let work = |t: usize| -> Result<()> {
            let r = asq_kernels::serial(|| self.team_worker(t, n, &slots, &failed));
            if r.is_err() {
                failed.store(true, Ordering::Release);
            }
            r
        };
        let results: Vec<Result<()>> = {
            use rayon::prelude::*;
            (0..threads).into_par_iter().map(work).collect()
        };
        // Report the error that stopped the pass, not a "stopped" of another thread.
        if let Some(e) = results
            .into_iter()
            .filter_map(|r| r.err())
            .find(|e| !matches!(e, Error::Config(m) if m == STOPPED))
        {
            return Err(e);
        }
        let last = slots.last().expect("the output slot");
        Ok(last.gather(&failed)?.into_owned())
    }

    /// The NCHW input as NHWC (the layout of every value of the graph).
    fn to_nhwc(&self, x: &[f32]) -> Vec<f32> {
        let [h, w, c] = self.shapes[0];
        let mut nhwc = vec![0.0f32; x.len()];
        for (src, dst) in x
            .chunks_exact(c * h * w)
            .zip(nhwc.chunks_exact_mut(c * h * w))
        {
            for (ch, plane) in src.chunks_exact(h * w).enumerate() {
                for (p, v) in plane.iter().enumerate() {
                    dst[p * c + ch] = *v;
                }
            }
        }
        nhwc
    }

    /// Whether node `i` is split by output rows in [`IntModel::forward_team`]: convolutions
    /// through the GEMM (implicit or on im2col rows).
    fn splits(&self, i: usize) -> bool {
        matches!(
            (&self.spec.nodes[i].op, &self.kernels[i]),
            (Op::Conv { .. }, Kernel::Gemm(_))
        )
    }

    /// The geometry of convolution node `i` on `n` samples.
    fn conv_shape(&self, i: usize, n: usize) -> Option<Conv2dShape> {
        let node = &self.spec.nodes[i];
        let Op::Conv {
            kernel: (kh, kw),
            stride,
            pad,
            ..
        } = &node.op
        else {
            return None;
        };
        let [h, w, c] = self.shapes[node.input];
        Some(Conv2dShape {
            batch: n,
            in_h: h,
            in_w: w,
            in_c: c,
            kh: *kh,
            kw: *kw,
            stride: *stride,
            pad: *pad,
        })
    }

    /// One thread of [`IntModel::forward_team`].
    fn team_worker(&self, t: usize, n: usize, slots: &[Slot], failed: &AtomicBool) -> Result<()> {
        for (i, node) in self.spec.nodes.iter().enumerate() {
            let slot = &slots[i + 1];
            let parts = slot.parts.len();
            // Threads start with different parts, then take what is left.
            for k in 0..parts {
                let p = (t + k) % parts;
                if slot.claimed[p].swap(true, Ordering::AcqRel) {
                    continue;
                }
                let out = if self.splits(i) {
                    self.conv_part(i, node, n, p, parts, slots, failed)?
                } else {
                    // Unsplit nodes run as in the serial pass, on gathered copies of the values
                    // they read.
                    let mut values: Vec<Option<Vec<f32>>> = vec![None; slots.len()];
                    values[node.input] = Some(slots[node.input].gather(failed)?.into_owned());
                    if let Op::Conv {
                        residual: Some(r), ..
                    } = &node.op
                    {
                        values[*r] = Some(slots[*r].gather(failed)?.into_owned());
                    }
                    let x = values[node.input].as_deref().expect("gathered");
                    self.run_node(i, node, x, &values, n, None)?
                };
                slot.parts[p].set(out).expect("a claimed part is set once");
            }
        }
        Ok(())
    }

    /// Part `p` of `parts` (output rows `M·p/parts..M·(p+1)/parts`) of convolution node `i`,
    /// quantizing only the input rows under those outputs' windows.
    #[allow(clippy::too_many_arguments)]
    fn conv_part(
        &self,
        i: usize,
        node: &Node,
        n: usize,
        p: usize,
        parts: usize,
        slots: &[Slot],
        failed: &AtomicBool,
    ) -> Result<Vec<f32>> {
        let (
            Op::Conv {
                bias,
                quant,
                residual,
                act,
                ..
            },
            Kernel::Gemm(pw),
        ) = (&node.op, &self.kernels[i])
        else {
            unreachable!("split nodes are GEMM convolutions");
        };
        let shape = self.conv_shape(i, n).expect("a convolution");
        let oc = self.shapes[i + 1][2];
        let m = n * shape.out_h() * shape.out_w();
        let rows = m * p / parts..m * (p + 1) / parts;
        let pieces = slots[node.input].pieces(failed)?;
        let implicit = if ImplicitConv::applies(&shape) {
            Some(quantize_conv(&pieces, &shape, quant, rows.clone())?)
        } else {
            None
        };
        let res = match residual {
            Some(r) => Some(slots[*r].range(rows.start * oc..rows.end * oc, failed)?),
            None => None,
        };
        let epi = Epilogue {
            bias: Some(bias),
            residual: res.as_deref(),
            relu: *act != Act::None,
        };
        let mut out = vec![0.0f32; rows.len() * oc];
        if rows.is_empty() {
            return Ok(out);
        }
        match implicit {
            Some(input) => {
                input.conv2d_rows_with(asq_kernels::Isa::best(), pw, rows, &epi, &mut out)
            }
            None => {
                let x = pieces.concat();
                let [h, w, c] = self.shapes[node.input];
                let qa = quantize(&x, n, h * w, c, quant)?;
                let cols =
                    asq_kernels::conv::im2col_rows(&qa, &shape, rows).map_err(kernel_error)?;
                asq_kernels::gemm(&cols, pw, &epi, &mut out)
            }
        }
        .map_err(kernel_error)?;
        if *act == Act::Relu6 {
            out.iter_mut().for_each(|v| *v = v.min(6.0));
        }
        Ok(out)
    }

    fn forward_chunk(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        self.forward_chunk_timed(x, n, None)
    }

    /// Where the time of a forward pass goes, node by node: the logits of `x` (`[n, C, H, W]`,
    /// run as one chunk on the calling thread's pool) and, per node, seconds spent quantizing
    /// its input, in im2col, and in the integer GEMM with its epilogue (or the depthwise kernel,
    /// or the pooling). The NCHW -> NHWC copy of the input is not counted.
    pub fn profile(&self, x: &[f32], n: usize) -> Result<(Vec<f32>, Vec<NodeTime>)> {
        let [h, w, c] = self.shapes[0];
        if x.len() != n * c * h * w || n == 0 || x.iter().any(|v| !v.is_finite()) {
            return Err(Error::Config(format!(
                "profile input: {} finite values for {n} images of {c}x{h}x{w}",
                x.len()
            )));
        }
        let mut times = vec![NodeTime::default(); self.spec.nodes.len()];
        let out = self.forward_chunk_timed(x, n, Some(&mut times))?;
        for (t, node) in times.iter_mut().zip(&self.spec.nodes) {
            t.op = node.op.kind().to_string();
        }
        Ok((out, times))
    }

    fn forward_chunk_timed(
        &self,
        x: &[f32],
        n: usize,
        mut times: Option<&mut [NodeTime]>,
    ) -> Result<Vec<f32>> {
        let nhwc = self.to_nhwc(x);
        let mut values: Vec<Option<Vec<f32>>> = vec![None; self.shapes.len()];
        values[0] = Some(nhwc);
        for (i, node) in self.spec.nodes.iter().enumerate() {
            let input = values[node.input].as_deref().expect("validated order");
            let out = self.run_node(
                i,
                node,
                input,
                &values,
                n,
                times.as_deref_mut().map(|t| &mut t[i]),
            )?;
            values[i + 1] = Some(out);
            for (v, &last) in values.iter_mut().zip(&self.last_use) {
                if last == i {
                    *v = None;
                }
            }
        }
        Ok(values.pop().flatten().expect("the last value is kept"))
    }

    #[allow(clippy::too_many_arguments)]
    fn run_node(
        &self,
        i: usize,
        node: &Node,
        x: &[f32],
        values: &[Option<Vec<f32>>],
        n: usize,
        mut time: Option<&mut NodeTime>,
    ) -> Result<Vec<f32>> {
        let t0 = std::time::Instant::now();
        let mut lap = |slot: fn(&mut NodeTime) -> &mut f64, since: &mut std::time::Instant| {
            if let Some(t) = time.as_deref_mut() {
                *slot(t) += since.elapsed().as_secs_f64();
            }
            *since = std::time::Instant::now();
        };
        let mut since = t0;
        let [h, w, c] = self.shapes[node.input];
        let [oh, ow, oc] = self.shapes[i + 1];
        let mut out = vec![0.0f32; n * oh * ow * oc];
        match (&node.op, &self.kernels[i]) {
            (
                Op::Conv {
                    bias,
                    quant,
                    residual,
                    act,
                    ..
                },
                kernel,
            ) => {
                let shape = self.conv_shape(i, n).expect("a convolution");
                let epi = Epilogue {
                    bias: Some(bias),
                    residual: residual.map(|r| values[r].as_deref().expect("validated order")),
                    relu: *act != Act::None,
                };
                // Implicit GEMM on the padded input (quantized straight into it) where the
                // window rows are whole groups of 4 codes (every body conv of the zoo), else
                // im2col + GEMM: the same bits either way.
                if let Kernel::Gemm(pw) = kernel {
                    if ImplicitConv::applies(&shape) {
                        let all = n * shape.out_h() * shape.out_w();
                        let input = quantize_conv(&[x], &shape, quant, 0..all)?;
                        lap(|t| &mut t.quantize, &mut since);
                        input
                            .conv2d_with(asq_kernels::Isa::best(), pw, &epi, &mut out)
                            .map_err(kernel_error)?;
                        if *act == Act::Relu6 {
                            out.iter_mut().for_each(|v| *v = v.min(6.0));
                        }
                        lap(|t| &mut t.kernel, &mut since);
                        return Ok(out);
                    }
                }
                let qa = quantize(x, n, h * w, c, quant)?;
                lap(|t| &mut t.quantize, &mut since);
                match kernel {
                    Kernel::Gemm(pw) => {
                        let cols = asq_kernels::conv::im2col(&qa, &shape).map_err(kernel_error)?;
                        lap(|t| &mut t.im2col, &mut since);
                        asq_kernels::gemm(&cols, pw, &epi, &mut out)
                    }
                    Kernel::Depthwise(dw, _) => asq_kernels::conv::depthwise_conv2d_with(
                        asq_kernels::Isa::best(),
                        &qa,
                        dw,
                        &shape,
                        &epi,
                        &mut out,
                    ),
                    Kernel::None => unreachable!("convolutions have weights"),
                }
                .map_err(kernel_error)?;
                if *act == Act::Relu6 {
                    out.iter_mut().for_each(|v| *v = v.min(6.0));
                }
            }
            (
                Op::Linear {
                    bias, quant, act, ..
                },
                Kernel::Gemm(pw),
            ) => {
                let qa = quantize(x, n, 1, h * w * c, quant)?;
                lap(|t| &mut t.quantize, &mut since);
                let epi = Epilogue {
                    bias: Some(bias),
                    residual: None,
                    relu: *act != Act::None,
                };
                asq_kernels::gemm(&qa, pw, &epi, &mut out).map_err(kernel_error)?;
                if *act == Act::Relu6 {
                    out.iter_mut().for_each(|v| *v = v.min(6.0));
                }
            }
            (Op::MaxPool { .. } | Op::MaxPoolPadded { .. }, _) => {
                let (size, stride, pad) = node.op.max_pool().expect("a max pool");
                for b in 0..n {
                    for y in 0..oh {
                        for xx in 0..ow {
                            let o = &mut out[((b * oh + y) * ow + xx) * c..][..c];
                            o.fill(f32::NEG_INFINITY);
                            for ky in 0..size {
                                // Padding never wins: skip taps outside the input.
                                let Some(iy) =
                                    (y * stride + ky).checked_sub(pad).filter(|&v| v < h)
                                else {
                                    continue;
                                };
                                for kx in 0..size {
                                    let Some(ix) =
                                        (xx * stride + kx).checked_sub(pad).filter(|&v| v < w)
                                    else {
                                        continue;
                                    };
                                    let src = &x[((b * h + iy) * w + ix) * c..][..c];
                                    o.iter_mut().zip(src).for_each(|(m, v)| *m = m.max(*v));
                                }
                            }
                        }
                    }
                }
            }
            (Op::GlobalAvgPool, _) => {
                for b in 0..n {
                    let o = &mut out[b * c..(b + 1) * c];
                    for p in 0..h * w {
                        let src = &x[(b * h * w + p) * c..][..c];
                        o.iter_mut().zip(src).for_each(|(s, v)| *s += v);
                    }
                    o.iter_mut().for_each(|v| *v /= (h * w) as f32);
                }
            }
            (Op::Linear { .. }, _) => unreachable!("linear layers have GEMM weights"),
        }
        lap(|t| &mut t.kernel, &mut since);
        Ok(out)
    }

    /// Serializes (header + bincode payload).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        FORMAT.encode::<_, MAX_MODEL_BYTES>(&self.spec)
    }

    /// Parses and validates [`IntModel::to_bytes`] output; `path` names the source in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let spec: ModelSpec = FORMAT.decode::<_, MAX_MODEL_BYTES>(bytes, path)?;
        Self::build(spec).map_err(|detail| Error::Format {
            path: path.to_path_buf(),
            detail,
        })
    }

    /// Saves atomically (temporary file in the same directory, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        atomic_write(path, &self.to_bytes()?)
    }

    /// Loads and validates a model file, refusing files over [`MAX_MODEL_BYTES`] before reading.
    pub fn load(path: &Path) -> Result<Self> {
        Self::from_bytes(&FORMAT.read(path)?, path)
    }
}

fn check_quant(q: &InputQuant, channels: usize) -> std::result::Result<(), String> {
    q.range().map_err(|e| e.to_string())?;
    if !q.step.is_finite() || q.step <= 0.0 {
        return Err(format!("step {} must be finite and positive", q.step));
    }
    if let Some(a) = &q.adapter {
        a.validate(channels)?;
    }
    Ok(())
}

/// ASQ's per-sample multipliers for `[n, positions, channels]` NHWC values given as
/// consecutive pieces cut at pixel boundaries: the adapter on each sample's channel means
/// (summed pixel by pixel in order, so any cut gives the same bits); 1 without an adapter.
fn betas(
    pieces: &[&[f32]],
    n: usize,
    positions: usize,
    channels: usize,
    q: &InputQuant,
) -> Vec<f32> {
    let Some(a) = &q.adapter else {
        return vec![1.0; n];
    };
    let mut pixels = pieces.iter().flat_map(|p| p.chunks_exact(channels));
    (0..n)
        .map(|_| {
            let mut pooled = vec![0.0f32; channels];
            for px in pixels.by_ref().take(positions) {
                pooled.iter_mut().zip(px).for_each(|(p, v)| *p += v);
            }
            pooled.iter_mut().for_each(|v| *v /= positions as f32);
            a.beta(&pooled)
        })
        .collect()
}

/// Quantizes `[n, positions, channels]` NHWC values with per-sample steps `s · beta`.
fn quantize(
    x: &[f32],
    n: usize,
    positions: usize,
    channels: usize,
    q: &InputQuant,
) -> Result<QuantActivations> {
    let betas = betas(&[x], n, positions, channels, q);
    QuantActivations::quantize(
        x,
        n,
        positions * channels,
        q.range()?,
        Steps::Scaled {
            step: q.step,
            betas: &betas,
        },
    )
    .map_err(kernel_error)
}

/// [`quantize`] straight into the padded layout of an implicit convolution, for output rows
/// `rows`; `x` is the input in consecutive pieces cut at pixel boundaries.
fn quantize_conv(
    x: &[&[f32]],
    shape: &Conv2dShape,
    q: &InputQuant,
    rows: std::ops::Range<usize>,
) -> Result<ImplicitConv> {
    let betas = betas(x, shape.batch, shape.in_h * shape.in_w, shape.in_c, q);
    ImplicitConv::quantize_for(
        x,
        shape,
        q.range()?,
        Steps::Scaled {
            step: q.step,
            betas: &betas,
        },
        rows,
    )
    .map_err(kernel_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packed(n: usize, k: usize, seed: usize) -> Vec<u8> {
        let r = QuantRange::signed(4).unwrap();
        let codes: Vec<u8> = (0..n * k).map(|i| ((i * 7 + seed) % 16) as u8).collect();
        PackedWeights::from_uniform_codes(&codes, n, k, r, &vec![0.05; n])
            .unwrap()
            .to_bytes()
    }

    fn quant(signed: bool) -> InputQuant {
        InputQuant {
            bits: 8,
            signed,
            step: 0.02,
            adapter: None,
        }
    }

    /// conv 3x3 (1 -> 4) + ReLU, 2x2 max pool, depthwise 3x3 + residual + ReLU6, linear -> 3.
    fn tiny() -> ModelSpec {
        let conv = Op::Conv {
            weights: packed(4, 9, 1),
            kernel: (3, 3),
            stride: 1,
            pad: 1,
            depthwise: false,
            bias: vec![0.1, -0.1, 0.0, 0.2],
            quant: quant(true),
            residual: None,
            act: Act::Relu,
        };
        let dw = Op::Conv {
            weights: packed(4, 9, 3),
            kernel: (3, 3),
            stride: 1,
            pad: 1,
            depthwise: true,
            bias: vec![0.0; 4],
            quant: InputQuant {
                adapter: Some(FloatAdapter {
                    layers: vec![(vec![0.5; 4], vec![1.0], 1, 4)],
                }),
                ..quant(false)
            },
            residual: Some(2),
            act: Act::Relu6,
        };
        let fc = Op::Linear {
            weights: packed(3, 3 * 3 * 4, 5),
            bias: vec![0.0; 3],
            quant: quant(false),
            act: Act::None,
        };
        ModelSpec {
            name: "tiny".into(),
            input: InputSpec {
                channels: 1,
                height: 6,
                width: 6,
                mean: vec![0.5],
                std: vec![0.25],
            },
            classes: 3,
            nodes: vec![
                Node { input: 0, op: conv },
                Node {
                    input: 1,
                    op: Op::MaxPool { size: 2, stride: 2 },
                },
                Node { input: 2, op: dw },
                Node { input: 3, op: fc },
            ],
            meta: BTreeMap::new(),
        }
    }

    #[test]
    fn a_small_graph_runs_and_round_trips() {
        let model = IntModel::new(tiny()).unwrap();
        let images: Vec<u8> = (0..2 * 36).map(|i| (i * 37 % 256) as u8).collect();
        let out = model.forward_u8(&images, 2).unwrap();
        assert_eq!(out.len(), 6);
        assert!(out.iter().all(|v| v.is_finite()));
        assert_ne!(
            out[..3],
            out[3..],
            "two different images, two different outputs"
        );
        let back = IntModel::from_bytes(&model.to_bytes().unwrap(), Path::new("m")).unwrap();
        assert_eq!(back.spec(), model.spec());
        assert_eq!(back.forward_u8(&images, 2).unwrap(), out);
        // One image alone gives the same logits as in the batch (per-sample scales).
        assert_eq!(model.forward_u8(&images[36..], 1).unwrap(), out[3..]);
        // The seed of the `model_file` fuzz target (fuzz/README.md).
        if let Ok(path) = std::env::var("ASQ_FUZZ_SEED") {
            std::fs::write(path, model.to_bytes().unwrap()).unwrap();
        }
    }

    #[test]
    fn inconsistent_graphs_are_rejected_with_a_reason() {
        type Corrupt = Box<dyn Fn(&mut ModelSpec)>;
        let cases: Vec<(&str, Corrupt)> = vec![
            (
                "bias",
                Box::new(|s| {
                    if let Op::Conv { bias, .. } = &mut s.nodes[0].op {
                        bias.pop();
                    }
                }),
            ),
            (
                "not finite",
                Box::new(|s| {
                    if let Op::Conv { bias, .. } = &mut s.nodes[0].op {
                        bias[0] = f32::NAN;
                    }
                }),
            ),
            (
                "residual",
                Box::new(|s| {
                    if let Op::Conv { residual, .. } = &mut s.nodes[2].op {
                        *residual = Some(1);
                    }
                }),
            ),
            ("not computed", Box::new(|s| s.nodes[1].input = 3)),
            ("features", Box::new(|s| s.nodes[3].input = 1)),
            ("classes", Box::new(|s| s.classes = 4)),
            (
                "bit width",
                Box::new(|s| {
                    if let Op::Conv { quant, .. } = &mut s.nodes[0].op {
                        quant.bits = 9;
                    }
                }),
            ),
            (
                "step",
                Box::new(|s| {
                    if let Op::Conv { quant, .. } = &mut s.nodes[0].op {
                        quant.step = 0.0;
                    }
                }),
            ),
            (
                "adapter",
                Box::new(|s| {
                    if let Op::Conv { quant, .. } = &mut s.nodes[2].op {
                        quant.adapter.as_mut().unwrap().layers[0].3 = 5;
                    }
                }),
            ),
            (
                "window",
                Box::new(|s| {
                    s.nodes[1].op = Op::MaxPool { size: 7, stride: 1 };
                }),
            ),
            (
                "K =",
                Box::new(|s| {
                    if let Op::Conv { kernel, .. } = &mut s.nodes[0].op {
                        *kernel = (1, 1);
                    }
                }),
            ),
            ("input height", Box::new(|s| s.input.height = 0)),
            (
                "magic",
                Box::new(|s| {
                    if let Op::Linear { weights, .. } = &mut s.nodes[3].op {
                        weights[0] = b'X';
                    }
                }),
            ),
        ];
        for (want, corrupt) in cases {
            let mut spec = tiny();
            corrupt(&mut spec);
            let err = IntModel::new(spec.clone()).unwrap_err().to_string();
            assert!(
                err.to_lowercase().contains(&want.to_lowercase()),
                "{want}: {err}"
            );
            // The same through a file.
            let bytes = FORMAT.encode::<_, MAX_MODEL_BYTES>(&spec).unwrap();
            assert!(
                IntModel::from_bytes(&bytes, Path::new("x")).is_err(),
                "{want}"
            );
        }
    }

    #[test]
    fn hostile_lengths_are_refused_without_allocating() {
        // A payload whose first field (the name) claims 2^60 bytes, with a valid header.
        let mut payload = vec![253u8];
        payload.extend_from_slice(&(1u64 << 60).to_le_bytes());
        let bytes = FORMAT.seal(&payload);
        let err = IntModel::from_bytes(&bytes, Path::new("h")).unwrap_err();
        assert!(err.to_string().contains("undecodable"), "{err}");
        let mut v2 = bytes.clone();
        v2[8] = 2;
        assert!(IntModel::from_bytes(&v2, Path::new("h"))
            .unwrap_err()
            .to_string()
            .contains("version"));
    }
}
