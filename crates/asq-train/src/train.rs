//! The training loop: seeded epochs of mini-batches, callbacks for progress and metrics, exact
//! resumption from a [`TrainState`].

use std::time::Instant;

use crate::checkpoint::TrainState;
use crate::data::loader::{batch_rng, epoch_order, make_batch};
use crate::data::{Augment, Dataset, Normalize};
use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::nn::Module;
use crate::ops::loss::{correct, softmax_cross_entropy};
use crate::optim::{LrSchedule, Optimizer};
use crate::params::ParamStore;

/// Hyper-parameters of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Epochs to train (an epoch is `batches_per_epoch` batches).
    pub epochs: u64,
    /// Images per batch.
    pub batch_size: usize,
    /// Cap on batches per epoch (`None`: the whole dataset).
    pub max_batches: Option<usize>,
    /// Skip the last, incomplete batch of an epoch (PyTorch's `drop_last`).
    pub drop_last: bool,
    /// Learning-rate schedule over optimizer steps.
    pub schedule: LrSchedule,
    /// Label smoothing of the cross-entropy.
    pub label_smoothing: f32,
    /// Training augmentation.
    pub augment: Augment,
    /// Input normalisation.
    pub normalize: Normalize,
}

impl TrainConfig {
    /// Batches per epoch for a dataset of `n` images.
    pub fn batches_per_epoch(&self, n: usize) -> usize {
        let b = self.batch_size.max(1);
        let all = if self.drop_last { n / b } else { n.div_ceil(b) };
        self.max_batches.map_or(all, |m| m.min(all))
    }
}

/// Metrics of one training batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchStats {
    /// Epoch (0-based).
    pub epoch: u64,
    /// Batch within the epoch (0-based).
    pub batch: u64,
    /// Batches in this epoch.
    pub batches: u64,
    /// Mean loss of the batch.
    pub loss: f32,
    /// Correct predictions in the batch.
    pub correct: usize,
    /// Images in the batch.
    pub size: usize,
    /// Learning rate used.
    pub lr: f32,
    /// Training throughput of this batch (forward + backward + update).
    pub images_per_sec: f64,
}

/// Metrics of one epoch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpochStats {
    /// Epoch (0-based).
    pub epoch: u64,
    /// Mean training loss.
    pub loss: f64,
    /// Training accuracy.
    pub accuracy: f64,
    /// Images seen.
    pub images: usize,
    /// Wall time.
    pub seconds: f64,
}

/// What a callback asks the loop to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Keep training.
    Continue,
    /// Stop after this batch (the state records where, so training can resume).
    Stop,
}

/// Hooks for progress bars, logging, checkpoints and early stops.
pub trait Callback {
    /// After every optimizer step.
    fn on_batch(&mut self, _stats: &BatchStats, _ps: &ParamStore, _state: &TrainState) -> Control {
        Control::Continue
    }
    /// After every full epoch.
    fn on_epoch(&mut self, _stats: &EpochStats, _ps: &ParamStore, _state: &TrainState) {}
}

/// A callback that does nothing.
pub struct Silent;
impl Callback for Silent {}

/// One training step on a batch: forward, loss, backward, update. Returns (loss, correct).
pub fn train_step(
    model: &dyn Module,
    ps: &mut ParamStore,
    opt: &mut Optimizer,
    images: crate::Tensor,
    labels: &[usize],
    label_smoothing: f32,
    lr: f32,
) -> Result<(f32, usize)> {
    let mut g = Graph::new(true);
    let x = g.input(images);
    let logits = model.forward(&mut g, ps, x)?;
    let loss = softmax_cross_entropy(&mut g, logits, labels, label_smoothing)?;
    let lv = g.value(loss).iter().next().copied().unwrap_or(f32::NAN);
    if !lv.is_finite() {
        return Err(Error::NonFinite("training loss (diverged)".into()));
    }
    let ok = correct(g.value(logits), labels);
    ps.zero_grad();
    g.backward(loss, ps)?;
    opt.step(ps, lr)?;
    Ok((lv, ok))
}

/// Trains from `state` until `config.epochs`, or until a callback stops. `state` is updated
/// after every batch, so saving it with the parameters resumes exactly.
pub fn fit(
    model: &dyn Module,
    ps: &mut ParamStore,
    opt: &mut Optimizer,
    data: &Dataset,
    config: &TrainConfig,
    state: &mut TrainState,
    callback: &mut dyn Callback,
) -> Result<Vec<EpochStats>> {
    if data.is_empty() || config.batch_size == 0 {
        return Err(Error::Config(
            "training needs a non-empty dataset and a positive batch size".into(),
        ));
    }
    let batches = config.batches_per_epoch(data.len()) as u64;
    if batches == 0 {
        return Err(Error::Config(format!(
            "no complete batch of {} in {} images (drop_last)",
            config.batch_size,
            data.len()
        )));
    }
    let mut epochs = Vec::new();
    while state.epoch < config.epochs {
        let order = epoch_order(data.len(), state.seed, state.epoch);
        let start = Instant::now();
        let (mut loss_sum, mut correct_sum, mut seen) = (0.0f64, 0usize, 0usize);
        while state.batch < batches {
            let b = state.batch as usize;
            let idx = &order[b * config.batch_size..((b + 1) * config.batch_size).min(order.len())];
            let mut rng = batch_rng(state.seed, state.epoch, state.batch);
            let batch = make_batch(
                data,
                idx,
                &config.normalize,
                Some((&config.augment, &mut rng)),
            )?;
            let lr = config.schedule.at(state.step);
            let t = Instant::now();
            let (loss, ok) = train_step(
                model,
                ps,
                opt,
                batch.images,
                &batch.labels,
                config.label_smoothing,
                lr,
            )?;
            let dt = t.elapsed().as_secs_f64();
            state.step += 1;
            state.batch += 1;
            loss_sum += loss as f64 * idx.len() as f64;
            correct_sum += ok;
            seen += idx.len();
            let stats = BatchStats {
                epoch: state.epoch,
                batch: state.batch - 1,
                batches,
                loss,
                correct: ok,
                size: idx.len(),
                lr,
                images_per_sec: idx.len() as f64 / dt.max(1e-9),
            };
            if callback.on_batch(&stats, ps, state) == Control::Stop {
                return Ok(epochs);
            }
        }
        let stats = EpochStats {
            epoch: state.epoch,
            loss: loss_sum / seen.max(1) as f64,
            accuracy: correct_sum as f64 / seen.max(1) as f64,
            images: seen,
            seconds: start.elapsed().as_secs_f64(),
        };
        state.epoch += 1;
        state.batch = 0;
        callback.on_epoch(&stats, ps, state);
        epochs.push(stats);
    }
    Ok(epochs)
}

/// Mean loss and accuracy on `data` in evaluation mode (running statistics, no augmentation).
pub fn evaluate(
    model: &dyn Module,
    ps: &mut ParamStore,
    data: &Dataset,
    normalize: &Normalize,
    batch_size: usize,
) -> Result<(f64, f64)> {
    if data.is_empty() || batch_size == 0 {
        return Err(Error::Config(
            "evaluation needs a non-empty dataset and a positive batch size".into(),
        ));
    }
    let (mut loss_sum, mut ok) = (0.0f64, 0usize);
    let idx: Vec<usize> = (0..data.len()).collect();
    for chunk in idx.chunks(batch_size) {
        let batch = make_batch(data, chunk, normalize, None)?;
        let mut g = Graph::new(false);
        let x = g.input(batch.images);
        let logits = model.forward(&mut g, ps, x)?;
        let loss = softmax_cross_entropy(&mut g, logits, &batch.labels, 0.0)?;
        loss_sum += *g.value(loss).iter().next().expect("scalar") as f64 * chunk.len() as f64;
        ok += correct(g.value(logits), &batch.labels);
    }
    Ok((loss_sum / data.len() as f64, ok as f64 / data.len() as f64))
}
