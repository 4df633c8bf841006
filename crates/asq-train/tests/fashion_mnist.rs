//! End to end on real Fashion-MNIST: a small CNN trained for a few hundred steps reaches a stated
//! accuracy in full precision and as W4A4 ASQ+POST; a checkpoint save/resume reproduces
//! uninterrupted training bit for bit.
//!
//! Data: the Debian package `dataset-fashion-mnist` when installed (CI installs it), else the
//! 2,000/1,000-image subset shipped in `data/fashion-mnist-subset` (or `ASQ_FASHION_MNIST_DIR`).
//! The thresholds are set for the subset, the harder case (fewer distinct images).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use asq_core::{BitWidth, LevelSet};
use asq_train::checkpoint::{Checkpoint, TrainState};
use asq_train::data::idx::{load_mnist_dir, FASHION_MNIST_DIR};
use asq_train::data::{Augment, Dataset};
use asq_train::nn::{
    ActQuant, BatchNorm2d, Init, Module, QConv2d, QLinear, QuantConfig, WeightQuant,
};
use asq_train::ops::act::relu;
use asq_train::ops::basic::flatten;
use asq_train::ops::conv::ConvSpec;
use asq_train::ops::pool::max_pool2d;
use asq_train::optim::{snapshot, LrSchedule, LrShape, Optimizer, OptimizerConfig, ParamGroups};
use asq_train::train::{evaluate, fit, BatchStats, Callback, Control, Silent, TrainConfig};
use asq_train::{Graph, ParamStore, Result, Var};

fn data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ASQ_FASHION_MNIST_DIR") {
        return PathBuf::from(dir);
    }
    let full = Path::new(FASHION_MNIST_DIR);
    if full.join("train-images-idx3-ubyte.gz").exists() {
        full.to_path_buf()
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/fashion-mnist-subset")
    }
}

fn load() -> (Dataset, Dataset) {
    let dir = data_dir();
    println!("Fashion-MNIST from {}", dir.display());
    let train = load_mnist_dir(&dir, true).expect("train split");
    let test = load_mnist_dir(&dir, false).expect("test split").take(1000);
    (train, test)
}

/// conv(1->16) bn relu pool | conv(16->32) bn relu | conv(32->32) bn relu pool | fc(1568->10).
struct SmallCnn {
    convs: Vec<(QConv2d, BatchNorm2d, bool)>,
    fc: QLinear,
}

impl SmallCnn {
    fn new(
        ps: &mut ParamStore,
        first_last: &QuantConfig,
        body: &QuantConfig,
        seed: u64,
    ) -> Result<Self> {
        let mut init = Init::from(seed);
        let spec = ConvSpec {
            stride: 1,
            pad: 1,
            groups: 1,
        };
        let mut convs = Vec::new();
        for (i, (cin, cout, pool, cfg)) in [
            (1, 16, true, first_last),
            (16, 32, false, body),
            (32, 32, true, body),
        ]
        .into_iter()
        .enumerate()
        {
            let conv = QConv2d::new(ps, &format!("conv{i}"), cin, cout, 3, spec, cfg, &mut init)?;
            let bn = BatchNorm2d::new(ps, &format!("bn{i}"), cout)?;
            convs.push((conv, bn, pool));
        }
        let fc = QLinear::new(ps, "fc", 32 * 7 * 7, 10, first_last, &mut init)?;
        Ok(Self { convs, fc })
    }
}

impl Module for SmallCnn {
    fn forward(&self, g: &mut Graph, ps: &mut ParamStore, x: Var) -> Result<Var> {
        let mut h = x;
        for (conv, bn, pool) in &self.convs {
            h = conv.forward(g, ps, h)?;
            h = bn.forward(g, ps, h)?;
            h = relu(g, h);
            if *pool {
                h = max_pool2d(g, h, 2, 2)?;
            }
        }
        let h = flatten(g, h)?;
        self.fc.forward(g, ps, h)
    }
}

/// About `steps` optimizer steps: whole epochs over a small dataset, one partial epoch over a
/// large one.
fn config(train: &Dataset, steps: usize, batch: usize, lr: f32) -> TrainConfig {
    let per_epoch = train.len().div_ceil(batch).min(steps);
    TrainConfig {
        epochs: steps.div_ceil(per_epoch) as u64,
        batch_size: batch,
        max_batches: Some(per_epoch),
        drop_last: false,
        schedule: LrSchedule {
            base: lr,
            warmup: 20,
            shape: LrShape::Cosine {
                total: steps as u64,
                min: 0.0,
            },
        },
        label_smoothing: 0.0,
        augment: Augment::default(),
        normalize: train.channel_stats(),
    }
}

fn sgd() -> Optimizer {
    Optimizer::new(
        OptimizerConfig::Sgd {
            momentum: 0.9,
            nesterov: true,
        },
        ParamGroups::new(1e-4),
    )
    .unwrap()
}

fn w4a4_asq_post() -> (QuantConfig, QuantConfig) {
    let eight = QuantConfig {
        weights: WeightQuant::Lsq { bits: 8 },
        acts: ActQuant::Lsq {
            bits: 8,
            signed: true,
        },
        step_grad: Default::default(),
    };
    let body = QuantConfig {
        weights: WeightQuant::Levels(LevelSet::post(BitWidth::new(4).unwrap()).unwrap()),
        acts: ActQuant::Asq {
            bits: 4,
            signed: false,
        },
        step_grad: Default::default(),
    };
    (eight, body)
}

fn train_and_eval(first_last: &QuantConfig, body: &QuantConfig, steps: usize) -> f64 {
    let (train, test) = load();
    let mut ps = ParamStore::new();
    let model = SmallCnn::new(&mut ps, first_last, body, 1).unwrap();
    let cfg = config(&train, steps, 64, 0.05);
    let mut opt = sgd();
    let mut state = TrainState {
        seed: 3,
        ..Default::default()
    };
    let t = std::time::Instant::now();
    let stats = fit(
        &model,
        &mut ps,
        &mut opt,
        &train,
        &cfg,
        &mut state,
        &mut Silent,
    )
    .unwrap();
    let secs = t.elapsed().as_secs_f64();
    let (loss, acc) = evaluate(&model, &mut ps, &test, &cfg.normalize, 250).unwrap();
    let last = stats.last().unwrap();
    let images: usize = stats.iter().map(|s| s.images).sum();
    println!(
        "{} steps: last-epoch train loss {:.3}, acc {:.3}; test loss {loss:.3}, test acc {acc:.4}; {:.0} images/s",
        state.step,
        last.loss,
        last.accuracy,
        images as f64 / secs
    );
    acc
}

#[test]
fn full_precision_small_cnn_learns_fashion_mnist() {
    let acc = train_and_eval(&QuantConfig::float(), &QuantConfig::float(), 300);
    assert!(acc >= 0.83, "full-precision test accuracy {acc}");
}

#[test]
fn w4a4_asq_post_small_cnn_learns_fashion_mnist() {
    let (first_last, body) = w4a4_asq_post();
    let acc = train_and_eval(&first_last, &body, 300);
    assert!(acc >= 0.83, "W4A4 ASQ+POST test accuracy {acc}");
}

struct StopAt(u64);
impl Callback for StopAt {
    fn on_batch(
        &mut self,
        _: &BatchStats,
        _: &ParamStore,
        state: &asq_train::checkpoint::TrainState,
    ) -> Control {
        if state.step == self.0 {
            Control::Stop
        } else {
            Control::Continue
        }
    }
}

#[test]
fn checkpoint_resume_is_bit_exact() {
    let (train, _) = load();
    let train = train.take(600);
    let (first_last, body) = w4a4_asq_post();
    let mut cfg = config(&train, 6, 32, 0.05);
    cfg.epochs = 2;
    assert_eq!(cfg.max_batches, Some(6));
    cfg.augment = Augment {
        crop_pad: 2,
        hflip: true,
    };

    // Uninterrupted: 2 epochs of 6 batches.
    let mut ps_a = ParamStore::new();
    let model_a = SmallCnn::new(&mut ps_a, &first_last, &body, 7).unwrap();
    let mut opt_a = sgd();
    let mut st_a = TrainState {
        seed: 11,
        ..Default::default()
    };
    fit(
        &model_a,
        &mut ps_a,
        &mut opt_a,
        &train,
        &cfg,
        &mut st_a,
        &mut Silent,
    )
    .unwrap();

    // Interrupted after 8 steps (mid-epoch), saved, restored into fresh objects, resumed.
    let mut ps_b = ParamStore::new();
    let model_b = SmallCnn::new(&mut ps_b, &first_last, &body, 7).unwrap();
    let mut opt_b = sgd();
    let mut st_b = TrainState {
        seed: 11,
        ..Default::default()
    };
    fit(
        &model_b,
        &mut ps_b,
        &mut opt_b,
        &train,
        &cfg,
        &mut st_b,
        &mut StopAt(8),
    )
    .unwrap();
    assert_eq!((st_b.epoch, st_b.batch, st_b.step), (1, 2, 8));
    let dir = std::env::temp_dir().join(format!("asq-resume-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("run.ckpt");
    Checkpoint::capture(&ps_b, Some(&opt_b), st_b, BTreeMap::new())
        .save(&path)
        .unwrap();
    drop((ps_b, model_b, opt_b));

    let ckpt = Checkpoint::load(&path).unwrap();
    let mut ps_c = ParamStore::new();
    let model_c = SmallCnn::new(&mut ps_c, &first_last, &body, 99).unwrap(); // different init
    ckpt.restore(&mut ps_c).unwrap();
    let mut opt_c = ckpt.optimizer.clone().unwrap();
    let mut st_c = ckpt.state;
    fit(
        &model_c,
        &mut ps_c,
        &mut opt_c,
        &train,
        &cfg,
        &mut st_c,
        &mut Silent,
    )
    .unwrap();
    std::fs::remove_dir_all(&dir).ok();

    assert_eq!(st_a, st_c);
    let (a, c) = (snapshot(&ps_a), snapshot(&ps_c));
    for (i, (x, y)) in a.iter().zip(&c).enumerate() {
        let bits = |t: &asq_train::Tensor| t.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(x),
            bits(y),
            "parameter {} differs after resume",
            ps_a.params()[i].name
        );
    }
    for ((n, x), (_, y)) in ps_a.buffers().iter().zip(ps_c.buffers()) {
        assert_eq!(x, y, "buffer {n} differs after resume");
    }
}
