//! ResNet-20 W4A4 ASQ+POST trained briefly on Fashion-MNIST, exported to the integer engine
//! (BN folded into the epilogue): the integer logits follow the fake-quant logits.
//!
//! Both paths quantize every layer input with the same step and per-sample beta; they differ
//! only in float rounding (BN folded vs applied after the convolution), which can move a value
//! across a rounding boundary of the next quantizer, so the comparison is statistical.

use std::path::Path;

use asq_models::{QuantPolicy, ResNet};
use asq_train::data::idx::{load_mnist_dir, FASHION_MNIST_DIR};
use asq_train::data::loader::make_batch;
use asq_train::data::Augment;
use asq_train::nn::Module;
use asq_train::optim::{LrSchedule, LrShape, Optimizer, OptimizerConfig, ParamGroups};
use asq_train::train::{fit, Silent, TrainConfig};
use asq_train::{checkpoint::TrainState, Graph, ParamStore};

#[test]
fn integer_resnet20_follows_the_fake_quant_model() {
    let full = Path::new(FASHION_MNIST_DIR);
    let dir = if full.join("train-images-idx3-ubyte.gz").exists() {
        full.to_path_buf()
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../asq-train/data/fashion-mnist-subset")
    };
    let train = load_mnist_dir(&dir, true).unwrap().take(1024);
    let test = load_mnist_dir(&dir, false).unwrap().take(64);
    let mut ps = ParamStore::new();
    let net = ResNet::cifar(&mut ps, 20, 1, 10, &QuantPolicy::asq_post(4).unwrap(), 1).unwrap();
    let cfg = TrainConfig {
        epochs: 1,
        batch_size: 64,
        max_batches: Some(16),
        schedule: LrSchedule {
            base: 0.05,
            warmup: 2,
            shape: LrShape::Constant,
        },
        label_smoothing: 0.0,
        augment: Augment::default(),
        normalize: train.channel_stats(),
    };
    let mut opt = Optimizer::new(
        OptimizerConfig::Sgd {
            momentum: 0.9,
            nesterov: false,
        },
        ParamGroups::new(1e-4),
    )
    .unwrap();
    fit(
        &net,
        &mut ps,
        &mut opt,
        &train,
        &cfg,
        &mut TrainState {
            seed: 1,
            ..Default::default()
        },
        &mut Silent,
    )
    .unwrap();

    let idx: Vec<usize> = (0..test.len()).collect();
    let batch = make_batch(&test, &idx, &cfg.normalize, None).unwrap();
    let mut g = Graph::new(false);
    let x = g.input(batch.images.clone());
    let y = net.forward(&mut g, &mut ps, x).unwrap();
    let fq: Vec<f32> = g.value(y).iter().copied().collect();
    let int = net.export(&ps).unwrap().forward(&batch.images).unwrap();
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
    let agree = fq
        .chunks(10)
        .zip(int.chunks(10))
        .filter(|(a, b)| argmax(a) == argmax(b))
        .count();
    let diff: f32 = fq.iter().zip(&int).map(|(a, b)| (a - b).abs()).sum::<f32>() / fq.len() as f32;
    let mag: f32 = fq.iter().map(|a| a.abs()).sum::<f32>() / fq.len() as f32;
    println!(
        "top-1 agreement {agree}/64, mean |logit difference| {diff:.4} vs mean |logit| {mag:.3}"
    );
    assert!(agree >= 60, "only {agree}/64 predictions agree");
    assert!(
        diff <= 0.05 * mag,
        "mean logit difference {diff} against magnitude {mag}"
    );
}
