//! Training throughput of ResNet-20 (1x28x28 inputs, batch 128, the pool's threads: run with
//! RAYON_NUM_THREADS=2 to match the reference): one SGD step (forward, backward, update) for
//! FP32, LSQ W4A4 and ASQ+POST W4A4. Throughput is in images, so `elem/s` reads as images/s.

#![allow(missing_docs)] // criterion_group! generates undocumented functions

use std::time::Duration;

use asq_models::{QuantPolicy, ResNet};
use asq_train::optim::{Optimizer, OptimizerConfig, ParamGroups};
use asq_train::train::train_step;
use asq_train::{ParamStore, Rng, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const BATCH: usize = 128;

fn resnet20_training(c: &mut Criterion) {
    let mut g = c.benchmark_group("train/resnet20-b128");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(10)
        .measurement_time(Duration::from_secs(8))
        .warm_up_time(Duration::from_secs(1));
    let mut rng = Rng::new(1);
    let images = Tensor::from_shape_fn(ndarray::IxDyn(&[BATCH, 1, 28, 28]), |_| rng.normal());
    let labels: Vec<usize> = (0..BATCH).map(|i| i % 10).collect();
    for (name, policy) in [
        ("fp32", QuantPolicy::float()),
        ("lsq-w4a4", QuantPolicy::lsq(4)),
        ("asq-post-w4a4", QuantPolicy::asq_post(4).unwrap()),
    ] {
        let mut ps = ParamStore::new();
        let net = ResNet::cifar(&mut ps, 20, 1, 10, &policy, 1).unwrap();
        let mut opt = Optimizer::new(
            OptimizerConfig::Sgd {
                momentum: 0.9,
                nesterov: false,
            },
            ParamGroups::new(1e-4),
        )
        .unwrap();
        g.bench_function(name, |b| {
            b.iter(|| {
                train_step(&net, &mut ps, &mut opt, images.clone(), &labels, 0.0, 0.01).unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, resnet20_training);
criterion_main!(benches);
