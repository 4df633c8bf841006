//! Every zoo architecture: parameter counts of the published networks, a few quantization-
//! aware training steps on Fashion-MNIST, export to the integer engine, and agreement of the
//! integer model with the fake-quant model it came from.

mod common;

use std::path::Path;

use asq_models::engine::InputSpec;
use asq_models::{IntModel, Model, QuantPolicy};
use asq_train::data::idx::load_mnist_dir;
use asq_train::data::loader::make_batch;
use asq_train::data::Dataset;
use asq_train::nn::Module;
use asq_train::{Graph, ParamStore};

fn data() -> (Dataset, Dataset) {
    let dir = common::fashion_mnist();
    (
        load_mnist_dir(&dir, true).unwrap().take(512),
        load_mnist_dir(&dir, false).unwrap().take(48),
    )
}

fn weights(ps: &ParamStore) -> usize {
    ps.params()
        .iter()
        .filter(|p| p.name.ends_with(".weight") && !p.name.contains("adapter"))
        .map(|p| p.value.len())
        .sum()
}

#[test]
fn published_architectures_have_their_parameter_counts() {
    // Weights of conv and linear layers (no BN, biases or quantizer parameters), 10 classes,
    // one input channel: the published figures up to the first conv and the classifier.
    for (arch, lo, hi) in [
        ("mlp", 200_000, 300_000),
        ("lenet5", 55_000, 70_000),
        ("resnet20", 260_000, 290_000),
        ("resnet18", 11_000_000, 11_300_000),
        ("resnet34", 21_000_000, 21_400_000),
        ("mobilenetv2", 2_150_000, 2_300_000),
        ("mobilenetv2-cifar", 2_150_000, 2_300_000),
    ] {
        let mut ps = ParamStore::new();
        Model::build(arch, &mut ps, (1, 28, 28), 10, &QuantPolicy::float(), 1).unwrap();
        let n = weights(&ps);
        println!("{arch}: {n} weights");
        assert!((lo..hi).contains(&n), "{arch}: {n} weights");
    }
    let mut ps = ParamStore::new();
    for bad in [
        "resnet21",
        "vgg16",
        "mobilenetv2-x",
        "mobilenetv2-9",
        "mobilenetv2-cifar-x",
    ] {
        assert!(
            Model::build(bad, &mut ps, (1, 28, 28), 10, &QuantPolicy::float(), 1).is_err(),
            "{bad}"
        );
    }
    assert!(Model::build("lenet5", &mut ps, (1, 8, 8), 10, &QuantPolicy::float(), 1).is_err());
}

#[test]
fn every_architecture_trains_exports_and_agrees_with_fake_quant() {
    let (train, test) = data();
    let normalize = train.channel_stats();
    for (arch, policy) in [
        ("mlp", "asq-post"),
        ("lenet5", "asq-post"),
        ("lenet5", "lsq"),
        ("lenet5", "asq-post64"),
        ("resnet20", "asq-pot"),
        ("mobilenetv2-0.25", "asq-post"),
        ("mobilenetv2-cifar-0.25", "lsq-apot"),
        ("resnet18", "asq-post"),
    ] {
        let mut ps = ParamStore::new();
        let policy_v = QuantPolicy::named(policy, 4).unwrap();
        let net = Model::build(arch, &mut ps, (1, 28, 28), 10, &policy_v, 7).unwrap();
        common::train_briefly(&net, &mut ps, &train, &normalize, (32, 12, 0.02, 3));

        let input = InputSpec {
            channels: 1,
            height: 28,
            width: 28,
            mean: normalize.mean.clone(),
            std: normalize.std.clone(),
        };
        let model = net.export(&ps, arch, input).unwrap();
        let idx: Vec<usize> = (0..test.len()).collect();
        let batch = make_batch(&test, &idx, &normalize, None).unwrap();
        let mut g = Graph::new(false);
        let x = g.input(batch.images.clone());
        let y = net.forward(&mut g, &mut ps, x).unwrap();
        let fq: Vec<f32> = g.value(y).iter().copied().collect();
        let int = model
            .forward(batch.images.as_slice().unwrap(), test.len())
            .unwrap();
        let common::Agreement {
            top1: agree,
            diff,
            magnitude: mag,
        } = common::agreement(&fq, &int, 10);
        println!(
            "{arch} {policy}: {} nodes, {} weight bytes, top-1 agreement {agree}/{}, mean |diff| {diff:.4} vs |logit| {mag:.3}",
            model.spec().nodes.len(),
            model.weight_bytes(),
            test.len()
        );
        assert!(
            agree * 10 >= test.len() * 9,
            "{arch} {policy}: {agree}/{}",
            test.len()
        );
        assert!(
            diff <= 0.05 * mag + 1e-3,
            "{arch} {policy}: {diff} vs {mag}"
        );
        let back = IntModel::from_bytes(&model.to_bytes().unwrap(), Path::new("m")).unwrap();
        assert_eq!(
            back.forward(batch.images.as_slice().unwrap(), test.len())
                .unwrap(),
            int
        );
        // Small batches run as a team of threads splitting every GEMM layer by output rows
        // (more threads than cores too): each sample's logits keep every bit.
        let per = batch.images.len() / test.len();
        let classes = int.len() / test.len();
        for threads in [2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for (first, n) in [(0, 1), (5, 1), (9, 3)] {
                let x = &batch.images.as_slice().unwrap()[first * per..(first + n) * per];
                let got = pool.install(|| model.forward(x, n).unwrap());
                assert_eq!(
                    got,
                    int[first * classes..(first + n) * classes],
                    "{arch} {policy}: {threads} threads, images {first}..{}",
                    first + n
                );
            }
        }
    }
}

#[test]
fn float_layers_cannot_be_exported() {
    let mut ps = ParamStore::new();
    let net = Model::build("lenet5", &mut ps, (1, 28, 28), 10, &QuantPolicy::float(), 1).unwrap();
    let input = InputSpec {
        channels: 1,
        height: 28,
        width: 28,
        mean: vec![0.5],
        std: vec![0.5],
    };
    let err = net.export(&ps, "lenet5", input).unwrap_err().to_string();
    assert!(err.contains("float"), "{err}");
}
