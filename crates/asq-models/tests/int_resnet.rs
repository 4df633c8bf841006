//! ResNet-20 W4A4 ASQ+POST trained briefly on Fashion-MNIST, exported to the integer engine
//! (BN folded into the epilogue): the integer logits follow the fake-quant logits.
//!
//! Both paths quantize every layer input with the same step and per-sample beta; they differ
//! only in float rounding (BN folded vs applied after the convolution), which can move a value
//! across a rounding boundary of the next quantizer, so the comparison is statistical.

mod common;

use std::path::Path;

use asq_models::engine::InputSpec;
use asq_models::{IntModel, QuantPolicy, ResNet};
use asq_train::data::idx::load_mnist_dir;
use asq_train::data::loader::make_batch;
use asq_train::nn::Module;
use asq_train::{Graph, ParamStore};

#[test]
fn integer_resnet20_follows_the_fake_quant_model() {
    let dir = common::fashion_mnist();
    let train = load_mnist_dir(&dir, true).unwrap().take(1024);
    let test = load_mnist_dir(&dir, false).unwrap().take(64);
    let mut ps = ParamStore::new();
    let net = ResNet::cifar(&mut ps, 20, 1, 10, &QuantPolicy::asq_post(4).unwrap(), 1).unwrap();
    let normalize = train.channel_stats();
    common::train_briefly(&net, &mut ps, &train, &normalize, (64, 16, 0.05, 1));

    let idx: Vec<usize> = (0..test.len()).collect();
    let batch = make_batch(&test, &idx, &normalize, None).unwrap();
    let mut g = Graph::new(false);
    let x = g.input(batch.images.clone());
    let y = net.forward(&mut g, &mut ps, x).unwrap();
    let fq: Vec<f32> = g.value(y).iter().copied().collect();
    let input = InputSpec {
        channels: 1,
        height: 28,
        width: 28,
        mean: normalize.mean.clone(),
        std: normalize.std.clone(),
    };
    let model = net.export(&ps, input).unwrap();
    let images = batch.images.as_slice().unwrap();
    let int = model.forward(images, 64).unwrap();
    assert_eq!(fq.len(), int.len());

    // The thread count changes nothing (kernels split work, never sums).
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        assert_eq!(pool.install(|| model.forward(images, 64).unwrap()), int);
    }

    // Raw pixels through the stored normalisation give the same logits, bit for bit.
    let raw: Vec<u8> = idx.iter().flat_map(|&i| test.image(i).to_vec()).collect();
    assert_eq!(model.forward_u8(&raw, 64).unwrap(), int);

    // The file round trip keeps every bit; a saved file loads back the same.
    let bytes = model.to_bytes().unwrap();
    let back = IntModel::from_bytes(&bytes, Path::new("mem")).unwrap();
    assert_eq!(back.forward(images, 64).unwrap(), int);
    let dir = std::env::temp_dir().join(format!("asq-int-resnet-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("resnet20.asqm");
    model.save(&path).unwrap();
    assert_eq!(
        IntModel::load(&path).unwrap().forward(images, 64).unwrap(),
        int
    );
    std::fs::remove_dir_all(&dir).unwrap();
    println!(
        "ResNet-20 W4A4 model file: {} bytes ({} bytes of packed weights)",
        bytes.len(),
        model.weight_bytes()
    );

    // Corrupt and hostile files are errors, never panics.
    let p = Path::new("bad.asqm");
    assert!(IntModel::from_bytes(&bytes[..bytes.len() - 1], p).is_err());
    assert!(IntModel::from_bytes(&bytes[..10], p).is_err());
    let mut flipped = bytes.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x10;
    let err = IntModel::from_bytes(&flipped, p).unwrap_err().to_string();
    assert!(err.contains("checksum"), "{err}");
    let mut magic = bytes.clone();
    magic[0] = b'X';
    assert!(IntModel::from_bytes(&magic, p).is_err());

    // Wrong input shapes and non-finite pixels are errors.
    assert!(model.forward(&images[..100], 1).is_err());
    let mut nan = images.to_vec();
    nan[5] = f32::NAN;
    assert!(model.forward(&nan, 64).is_err());

    let common::Agreement {
        top1: agree,
        diff,
        magnitude: mag,
    } = common::agreement(&fq, &int, 10);
    println!(
        "top-1 agreement {agree}/64, mean |logit difference| {diff:.4} vs mean |logit| {mag:.3}"
    );
    assert!(agree >= 60, "only {agree}/64 predictions agree");
    assert!(
        diff <= 0.05 * mag,
        "mean logit difference {diff} against magnitude {mag}"
    );
}
