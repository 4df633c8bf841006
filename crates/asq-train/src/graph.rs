//! The tape: a graph of values recorded on the forward pass and differentiated in reverse.
//!
//! Nodes are appended in execution order, so reverse index order is a topological order. Each
//! non-leaf node owns a [`Backward`] object supplied by its op; the tape calls it without knowing
//! which op it is. Leaves are inputs (no gradient) or parameters (gradient accumulated into the
//! [`ParamStore`] on [`Graph::backward`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::buffers;
use crate::error::{shape, Result};
use crate::params::{ParamId, ParamStore};
use crate::Tensor;

/// A value on the tape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Var(pub(crate) usize);

impl Var {
    /// The node's position on the tape: its index into [`Graph::gradients`].
    pub fn index(self) -> usize {
        self.0
    }
}

/// The backward rule of one recorded op.
pub trait Backward: Send + Sync {
    /// Gradients w.r.t. each input (same order as recorded), given the inputs' values, the
    /// output value and the gradient of the loss w.r.t. the output. `None`: no gradient.
    fn backward(&self, inputs: &[&Tensor], output: &Tensor, grad: &Tensor) -> Vec<Option<Tensor>>;

    /// [`Backward::backward`] told which inputs need a gradient (`needed[i]`); an op may skip
    /// the others' work and return `None` for them (a convolution on the input images does not
    /// compute the images' gradient). Default: every gradient.
    fn backward_needed(
        &self,
        inputs: &[&Tensor],
        output: &Tensor,
        grad: &Tensor,
        needed: &[bool],
    ) -> Vec<Option<Tensor>> {
        let _ = needed;
        self.backward(inputs, output, grad)
    }

    /// [`Backward::backward_needed`], but with the gradient w.r.t. input `input` added into
    /// `acc`, the gradient that input already has from the ops recorded after this one, instead
    /// of returned (its slot `None`): one pass over `acc` where a returned gradient costs a
    /// written tensor and a sum over both (global average pooling's plane-constant gradient; a
    /// convolution's input gradient in a residual block). Must add exactly what
    /// [`Backward::backward_needed`] returns for that input, in the same rounding. `None` (the
    /// default): not done; the graph then asks [`Backward::backward_needed`] and adds.
    fn backward_adding(
        &self,
        inputs: &[&Tensor],
        output: &Tensor,
        grad: &Tensor,
        needed: &[bool],
        input: usize,
        acc: &mut Tensor,
    ) -> Option<Vec<Option<Tensor>>> {
        let _ = (inputs, output, grad, needed, input, acc);
        None
    }

    /// The op's name in profiles ([`set_profiling`]): by default the backward rule's type name
    /// without its module path.
    fn name(&self) -> &'static str {
        let full = std::any::type_name::<Self>();
        let base = full.split('<').next().unwrap_or(full);
        base.rsplit("::").next().unwrap_or(base)
    }
}

/// Wall time of one op kind over the passes profiled since the last [`take_profile`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OpTime {
    /// The op's [`Backward::name`] (`"gradient sum"` for adding up the gradients of a value
    /// used by several ops).
    pub op: &'static str,
    /// Recorded ops of this kind.
    pub calls: u64,
    /// Forward time: from the previous node's recording to this op's (so it includes whatever
    /// ran between two ops, e.g. a layer's own bookkeeping).
    pub forward: Duration,
    /// Time in the op's backward rule.
    pub backward: Duration,
}

static PROFILING: AtomicBool = AtomicBool::new(false);
static PROFILE: Mutex<Vec<OpTime>> = Mutex::new(Vec::new());

/// Turns the per-op profile of training graphs on or off (off by default: no cost). Graphs
/// created while it is on time every op's forward and backward pass and add them up, read
/// with [`take_profile`]. A profiled graph adds two clock reads per node; the direct
/// convolution kernels then also time every call ([`take_kernel_profile`]).
pub fn set_profiling(on: bool) {
    PROFILING.store(on, Ordering::Relaxed);
}

/// The op times gathered since the last call (graphs add theirs when dropped), largest total
/// first; clears them.
pub fn take_profile() -> Vec<OpTime> {
    let mut all = std::mem::take(&mut *PROFILE.lock().unwrap_or_else(|e| e.into_inner()));
    all.sort_by_key(|t| std::cmp::Reverse(t.forward + t.backward));
    all
}

/// Thread time of one convolution kernel on one shape over the passes profiled since the last
/// [`take_kernel_profile`] (the direct convolutions' inner products only, without the copies
/// around them), so its rate in the model can be set against its rate in cache.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelTime {
    /// `"grid"` (forward or input gradient along the padded grid), `"rows"` (along the output
    /// channels, row segments), `"winograd"` (forward or input gradient in Winograd's
    /// domain), `"dw channels"` (weight gradient along the output channels), `"dw grid"`
    /// (weight gradient along the grid) or `"dw winograd"` (weight gradient in Winograd's
    /// domain).
    pub kernel: &'static str,
    /// Input channels of the product (for an input gradient: the output gradient's).
    pub ci: usize,
    /// Output channels as computed (padded to the register block).
    pub co: usize,
    /// Positions computed per call: grid positions (thrown-away columns included) or pixels.
    pub positions: usize,
    /// Kernel taps.
    pub taps: usize,
    /// Calls (one per sample, or per sample and phase on the stride-2 path; a call over
    /// several samples counts each).
    pub calls: u64,
    /// Thread time summed over the calls (with two threads, up to twice the wall time).
    pub time: Duration,
}

impl KernelTime {
    /// Multiply-adds computed per call, times two.
    pub fn flops_per_call(&self) -> f64 {
        2.0 * (self.ci * self.co * self.positions * self.taps) as f64
    }
}

static KERNELS: Mutex<Vec<KernelTime>> = Mutex::new(Vec::new());

/// Whether [`set_profiling`] is on (the kernels time themselves then).
pub(crate) fn profiling() -> bool {
    PROFILING.load(Ordering::Relaxed)
}

/// Adds one timed kernel call to the kernel profile, `samples` calls of `shape` (a batched
/// call's samples each count as one).
pub(crate) fn record_kernel(kernel: &'static str, shape: [usize; 4], samples: u64, time: Duration) {
    let [ci, co, positions, taps] = shape;
    let mut all = KERNELS.lock().unwrap_or_else(|e| e.into_inner());
    let same = |k: &&mut KernelTime| {
        (k.kernel, k.ci, k.co, k.positions, k.taps) == (kernel, ci, co, positions, taps)
    };
    match all.iter_mut().find(same) {
        Some(k) => {
            k.calls += samples;
            k.time += time;
        }
        None => all.push(KernelTime {
            kernel,
            ci,
            co,
            positions,
            taps,
            calls: samples,
            time,
        }),
    }
}

/// The kernel times gathered while [`set_profiling`] was on since the last call, largest first;
/// clears them.
pub fn take_kernel_profile() -> Vec<KernelTime> {
    let mut all = std::mem::take(&mut *KERNELS.lock().unwrap_or_else(|e| e.into_inner()));
    all.sort_by_key(|k| std::cmp::Reverse(k.time));
    all
}

/// One graph's timings, merged into [`PROFILE`] on drop.
#[derive(Default)]
struct Profile {
    mark: Option<Instant>,
    ops: Vec<OpTime>,
}

impl Profile {
    fn entry(&mut self, op: &'static str) -> &mut OpTime {
        let at = match self.ops.iter().position(|t| t.op == op) {
            Some(at) => at,
            None => {
                self.ops.push(OpTime {
                    op,
                    ..OpTime::default()
                });
                self.ops.len() - 1
            }
        };
        &mut self.ops[at]
    }

    /// Forward time of `op` up to now; a leaf (`None`) only moves the mark.
    fn lap(&mut self, op: Option<&'static str>) {
        let now = Instant::now();
        let since = self.mark.map_or(Duration::ZERO, |m| now - m);
        self.mark = Some(now);
        if let Some(op) = op {
            let e = self.entry(op);
            e.calls += 1;
            e.forward += since;
        }
    }

    fn merge_into_global(&mut self) {
        let mut all = PROFILE.lock().unwrap_or_else(|e| e.into_inner());
        for t in self.ops.drain(..) {
            match all.iter_mut().find(|a| a.op == t.op) {
                Some(a) => {
                    a.calls += t.calls;
                    a.forward += t.forward;
                    a.backward += t.backward;
                }
                None => all.push(t),
            }
        }
    }
}

struct Node {
    value: Tensor,
    inputs: Vec<Var>,
    op: Option<Box<dyn Backward>>,
    needs_grad: bool,
    param: Option<ParamId>,
    /// See [`Graph::set_plane_sums`].
    plane_sums: Option<Vec<(f64, f64)>>,
}

/// A forward pass being recorded.
pub struct Graph {
    nodes: Vec<Node>,
    training: bool,
    observations: Option<Vec<(String, Vec<f32>)>>,
    profile: Option<Profile>,
}

impl Drop for Graph {
    /// Hands the recorded values back to [`crate::buffers`] for the next pass.
    fn drop(&mut self) {
        if let Some(p) = &mut self.profile {
            p.merge_into_global();
        }
        for node in self.nodes.drain(..) {
            buffers::recycle(node.value);
        }
    }
}

impl Graph {
    /// A new tape; `training` selects batch statistics, dropout and quantizer updates.
    pub fn new(training: bool) -> Self {
        Self {
            nodes: Vec::new(),
            training,
            observations: None,
            profile: PROFILING.load(Ordering::Relaxed).then(|| Profile {
                mark: Some(Instant::now()),
                ops: Vec::new(),
            }),
        }
    }

    /// Asks layers to report internal values of this pass (ASQ's per-sample `beta`, under
    /// `{layer}.beta`), read back with [`Graph::observations`]. Off by default: no cost.
    pub fn observe(mut self) -> Self {
        self.observations = Some(Vec::new());
        self
    }

    /// Whether [`Graph::observe`] was asked for.
    pub fn is_observing(&self) -> bool {
        self.observations.is_some()
    }

    /// Records `values` under `key` when observing (see [`Graph::observe`]).
    pub fn record_observation(&mut self, key: impl Into<String>, values: Vec<f32>) {
        if let Some(o) = &mut self.observations {
            o.push((key.into(), values));
        }
    }

    /// What layers reported, in the order of the forward pass.
    pub fn observations(&self) -> &[(String, Vec<f32>)] {
        self.observations.as_deref().unwrap_or(&[])
    }

    /// Whether this pass trains.
    pub fn is_training(&self) -> bool {
        self.training
    }

    /// A constant input (no gradient).
    pub fn input(&mut self, value: Tensor) -> Var {
        self.lap(None);
        self.nodes.push(Node {
            value,
            inputs: Vec::new(),
            op: None,
            needs_grad: false,
            param: None,
            plane_sums: None,
        });
        Var(self.nodes.len() - 1)
    }

    /// An input that receives a gradient (for gradient checks and input attributions).
    pub fn input_with_grad(&mut self, value: Tensor) -> Var {
        self.lap(None);
        self.nodes.push(Node {
            value,
            inputs: Vec::new(),
            op: None,
            needs_grad: true,
            param: None,
            plane_sums: None,
        });
        Var(self.nodes.len() - 1)
    }

    /// A parameter leaf: its gradient goes to `store` on [`Graph::backward`] (in training).
    pub fn param(&mut self, store: &ParamStore, id: ParamId) -> Var {
        self.lap(None);
        let value = store.get(id).value.clone();
        self.lap(Some("parameter copy"));
        let needs_grad = self.training;
        self.nodes.push(Node {
            value,
            inputs: Vec::new(),
            op: None,
            needs_grad,
            param: Some(id),
            plane_sums: None,
        });
        Var(self.nodes.len() - 1)
    }

    /// Records an op's output. The backward rule is kept only if an input needs a gradient.
    pub fn record(&mut self, value: Tensor, inputs: &[Var], op: impl Backward + 'static) -> Var {
        self.lap(Some(op.name()));
        let needs_grad = inputs.iter().any(|v| self.nodes[v.0].needs_grad);
        let op: Option<Box<dyn Backward>> = if needs_grad { Some(Box::new(op)) } else { None };
        self.nodes.push(Node {
            value,
            inputs: inputs.to_vec(),
            op,
            needs_grad,
            param: None,
            plane_sums: None,
        });
        Var(self.nodes.len() - 1)
    }

    /// Attaches the per-plane sums `(Σ v, Σ v²)` of `v`'s value (`[N, C, H, W]`: one pair per
    /// sample and channel, in order, each as `ops::norm::plane_value_sums` computes it) to
    /// `v`, for a consumer that would otherwise read the whole value again to get them
    /// (training-mode batch norm after a convolution, which sums its output planes while they
    /// are in cache).
    pub(crate) fn set_plane_sums(&mut self, v: Var, sums: Vec<(f64, f64)>) {
        self.nodes[v.0].plane_sums = Some(sums);
    }

    /// The sums [`Graph::set_plane_sums`] attached to `v`, if any.
    pub(crate) fn plane_sums(&self, v: Var) -> Option<&[(f64, f64)]> {
        self.nodes[v.0].plane_sums.as_deref()
    }

    /// Profiling only: the forward time since the previous node goes to `op`.
    fn lap(&mut self, op: Option<&'static str>) {
        if let Some(p) = &mut self.profile {
            p.lap(op);
        }
    }

    /// The value of `v`.
    pub fn value(&self, v: Var) -> &Tensor {
        &self.nodes[v.0].value
    }

    /// Shape of `v`.
    pub fn shape(&self, v: Var) -> &[usize] {
        self.nodes[v.0].value.shape()
    }

    /// Number of recorded nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Reverse pass from a scalar `loss`: accumulates parameter gradients into `store`.
    pub fn backward(&mut self, loss: Var, store: &mut ParamStore) -> Result<()> {
        if self.nodes[loss.0].value.len() != 1 {
            return Err(shape(
                "backward",
                format!("loss must be a scalar, got shape {:?}", self.shape(loss)),
            ));
        }
        let grads = self.gradients(loss)?;
        for (i, g) in grads.into_iter().enumerate() {
            if let (Some(g), Some(id)) = (g, self.nodes[i].param) {
                let p = store.get_mut(id);
                p.grad.zip_mut_with(&g, |a, b| *a += b);
                buffers::recycle(g);
            }
        }
        Ok(())
    }

    /// Gradients of the scalar `loss` w.r.t. every leaf (`None` where none flows and for
    /// intermediate nodes).
    pub fn gradients(&self, loss: Var) -> Result<Vec<Option<Tensor>>> {
        let mut grads: Vec<Option<Tensor>> = (0..self.nodes.len()).map(|_| None).collect();
        grads[loss.0] = Some(Tensor::ones(self.nodes[loss.0].value.raw_dim()));
        let mut profile = self.profile.is_some().then(Profile::default);
        for i in (0..=loss.0).rev() {
            let Some(g) = grads[i].take() else { continue };
            let node = &self.nodes[i];
            if let Some(op) = &node.op {
                let start = profile.as_ref().map(|_| Instant::now());
                let inputs: Vec<&Tensor> =
                    node.inputs.iter().map(|v| &self.nodes[v.0].value).collect();
                let needed: Vec<bool> = node
                    .inputs
                    .iter()
                    .map(|v| self.nodes[v.0].needs_grad)
                    .collect();
                // The first input (used once by this op) that already has a gradient: the op
                // may add its part in place.
                let mut added = vec![false; node.inputs.len()];
                let mut gin = None;
                let first = node.inputs.iter().enumerate().position(|(j, v)| {
                    let once = node.inputs.iter().filter(|u| u.0 == v.0).count() == 1;
                    needed[j] && once && grads[v.0].is_some()
                });
                if let Some(j) = first {
                    let acc = grads[node.inputs[j].0].as_mut().expect("checked");
                    gin = op.backward_adding(&inputs, &node.value, &g, &needed, j, acc);
                    added[j] = gin.is_some();
                }
                let gin =
                    gin.unwrap_or_else(|| op.backward_needed(&inputs, &node.value, &g, &needed));
                if let (Some(p), Some(start)) = (&mut profile, start) {
                    p.entry(op.name()).backward += start.elapsed();
                }
                for ((v, gi), done) in node.inputs.iter().zip(gin).zip(added) {
                    let Some(gi) = gi else { continue };
                    if !self.nodes[v.0].needs_grad || done {
                        buffers::recycle(gi);
                        continue;
                    }
                    if gi.shape() != self.nodes[v.0].value.shape() {
                        return Err(shape(
                            "backward",
                            format!(
                                "gradient {:?} for value {:?}",
                                gi.shape(),
                                self.nodes[v.0].value.shape()
                            ),
                        ));
                    }
                    match &mut grads[v.0] {
                        Some(acc) => {
                            let start = profile.as_ref().map(|_| Instant::now());
                            crate::ops::ew::add_assign(acc, &gi);
                            buffers::recycle(gi);
                            if let (Some(p), Some(start)) = (&mut profile, start) {
                                let e = p.entry("gradient sum");
                                e.calls += 1;
                                e.backward += start.elapsed();
                            }
                        }
                        slot => *slot = Some(gi),
                    }
                }
            }
            // Keep gradients of leaves only: intermediate ones are not needed after their op.
            if node.op.is_none() {
                grads[i] = Some(g);
            } else {
                buffers::recycle(g);
            }
        }
        if let Some(p) = &mut profile {
            p.merge_into_global();
        }
        Ok(grads)
    }
}
