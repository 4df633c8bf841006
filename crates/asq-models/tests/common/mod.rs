//! Helpers shared by the integration tests: the data, and how closely an integer model follows
//! its fake-quant model.
// Each test binary uses some of these helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use asq_train::checkpoint::TrainState;
use asq_train::data::idx::FASHION_MNIST_DIR;
use asq_train::data::{Augment, Dataset, Normalize};
use asq_train::nn::Module;
use asq_train::optim::{LrSchedule, LrShape, Optimizer, OptimizerConfig, ParamGroups};
use asq_train::train::{fit, Silent, TrainConfig};
use asq_train::ParamStore;

/// Fashion-MNIST: the Debian package's copy, else the subset shipped with asq-train.
pub fn fashion_mnist() -> PathBuf {
    let full = Path::new(FASHION_MNIST_DIR);
    if full.join("train-images-idx3-ubyte.gz").exists() {
        full.to_path_buf()
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../asq-train/data/fashion-mnist-subset")
    }
}

/// How two logit matrices (`classes` per row) agree.
pub struct Agreement {
    /// Rows with the same top-1 class.
    pub top1: usize,
    /// Mean absolute logit difference.
    pub diff: f32,
    /// Mean absolute logit of the first.
    pub magnitude: f32,
}

/// Compares fake-quant logits `fq` with integer-engine logits `int`.
pub fn agreement(fq: &[f32], int: &[f32], classes: usize) -> Agreement {
    assert_eq!(fq.len(), int.len());
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |b, (i, &x)| if x > b.1 { (i, x) } else { b },
            )
            .0
    };
    Agreement {
        top1: fq
            .chunks(classes)
            .zip(int.chunks(classes))
            .filter(|(a, b)| argmax(a) == argmax(b))
            .count(),
        diff: fq.iter().zip(int).map(|(a, b)| (a - b).abs()).sum::<f32>() / fq.len() as f32,
        magnitude: fq.iter().map(|a| a.abs()).sum::<f32>() / fq.len() as f32,
    }
}

/// A short quantization-aware run (SGD, constant lr after 2 warm-up steps, no augmentation):
/// enough to set the quantizer scales and batch-norm statistics the export reads.
pub fn train_briefly(
    net: &dyn Module,
    ps: &mut ParamStore,
    data: &Dataset,
    normalize: &Normalize,
    (batch, batches, lr, seed): (usize, usize, f32, u64),
) {
    let cfg = TrainConfig {
        epochs: 1,
        batch_size: batch,
        max_batches: Some(batches),
        drop_last: false,
        schedule: LrSchedule {
            base: lr,
            warmup: 2,
            shape: LrShape::Constant,
        },
        label_smoothing: 0.0,
        augment: Augment::default(),
        normalize: normalize.clone(),
    };
    let sgd = OptimizerConfig::Sgd {
        momentum: 0.9,
        nesterov: false,
    };
    let mut opt = Optimizer::new(sgd, ParamGroups::new(1e-4)).unwrap();
    let mut state = TrainState {
        seed,
        ..Default::default()
    };
    fit(net, ps, &mut opt, data, &cfg, &mut state, &mut Silent).unwrap();
}

/// Relative L2 distance `|a - b| / |b|`, in f64.
pub fn rel(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (d / n.max(1e-30)).sqrt()
}
