//! PyTorch state dicts in and out: a ResNet-8 saved by PyTorch as safetensors
//! (`tests/fixtures/torch_import/gen.py`) imported into the zoo's ResNet-8 gives PyTorch's
//! eval-mode logits; asq's export of a quantized model reads back exactly; hostile files are
//! one-line errors.

mod common;

use std::path::Path;

use common::rel;

use asq_models::torch::{cifar_blocks, export, import, read_safetensors, write_safetensors};
use asq_models::{QuantPolicy, ResNet};
use asq_train::checkpoint::NamedTensor;
use asq_train::nn::Module;
use asq_train::{Graph, ParamStore, Tensor};

fn dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch_import")
}

fn floats(name: &str) -> Vec<f32> {
    std::fs::read(dir().join(name))
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn fixture() -> Vec<NamedTensor> {
    let path = dir().join("resnet8.safetensors");
    read_safetensors(&std::fs::read(&path).unwrap(), &path)
        .unwrap()
        .0
}

fn logits(net: &ResNet, ps: &mut ParamStore, x: &[f32], training: bool) -> Vec<f32> {
    let mut g = Graph::new(training);
    let t =
        Tensor::from_shape_vec(ndarray::IxDyn(&[x.len() / 784, 1, 28, 28]), x.to_vec()).unwrap();
    let xv = g.input(t);
    let y = net.forward(&mut g, ps, xv).unwrap();
    g.value(y).iter().copied().collect()
}

#[test]
fn pytorch_weights_give_pytorchs_logits() {
    let blocks = cifar_blocks("resnet8").unwrap();
    let mut ps = ParamStore::new();
    let net = ResNet::cifar(&mut ps, 8, 1, 10, &QuantPolicy::float(), 0u64).unwrap();
    let n = import(
        &mut ps,
        &fixture(),
        blocks,
        Path::new("resnet8.safetensors"),
    )
    .unwrap();
    assert_eq!(n, ps.params().len() + ps.buffers().len());
    let got = logits(&net, &mut ps, &floats("images.bin"), false);
    let want = floats("logits.bin");
    let r = rel(&got, &want);
    assert!(r < 1e-4, "logits differ from PyTorch's by {r:.2e} relative");
}

#[test]
fn a_quantized_model_round_trips_through_safetensors() {
    let blocks = 1;
    let policy = QuantPolicy::asq_post(4).unwrap();
    let mut ps = ParamStore::new();
    let net = ResNet::cifar(&mut ps, 8, 1, 10, &policy, 0u64).unwrap();
    import(&mut ps, &fixture(), blocks, Path::new("f")).unwrap();
    // Quantizers calibrate on a first training-mode batch, as after any float import.
    let x = floats("images.bin");
    logits(&net, &mut ps, &x, true);
    let tensors = export(&ps, blocks, false).unwrap();
    assert!(tensors.iter().any(|t| t.name == "layers.1.conv1.wq.alpha"));
    assert!(tensors
        .iter()
        .any(|t| t.name == "layers.2.conv2.adapter.net.2.bias"));
    let scale = tensors
        .iter()
        .find(|t| t.name == "layers.0.conv1.wq.alpha")
        .unwrap();
    assert_eq!(scale.shape, [16, 1, 1, 1]);
    let meta = [("quant".to_string(), "asq-post".to_string())].into();
    let bytes = write_safetensors(&tensors, &meta).unwrap();
    let (back, meta_back) = read_safetensors(&bytes, Path::new("x.safetensors")).unwrap();
    assert_eq!(meta_back, meta);
    let mut ps2 = ParamStore::new();
    let net2 = ResNet::cifar(&mut ps2, 8, 1, 10, &policy, 7u64).unwrap();
    import(&mut ps2, &back, blocks, Path::new("x.safetensors")).unwrap();
    for (a, b) in ps.params().iter().zip(ps2.params()) {
        assert_eq!(a.value, b.value, "{}", a.name);
    }
    for (a, b) in ps.buffers().iter().zip(ps2.buffers()) {
        assert_eq!(a, b, "{}", a.0);
    }
    // The imported quantizers are initialised: the eval pass is the same, bit for bit.
    assert_eq!(
        logits(&net, &mut ps, &x, false),
        logits(&net2, &mut ps2, &x, false)
    );
}

#[test]
fn tensors_that_do_not_fit_are_named() {
    let path = Path::new("bad.safetensors");
    let mut ps = ParamStore::new();
    ResNet::cifar(&mut ps, 8, 1, 10, &QuantPolicy::float(), 0u64).unwrap();
    let good = fixture();
    let err = |tensors: Vec<NamedTensor>| {
        let mut ps = ps.clone();
        import(&mut ps, &tensors, 1, path).unwrap_err().to_string()
    };
    let mut renamed = good.clone();
    renamed[3].name = "layers.0.conv3.weight".into();
    let e = err(renamed);
    assert!(
        e.starts_with("bad.safetensors: ") && e.contains("layers.0.conv3.weight"),
        "{e}"
    );
    let missing: Vec<NamedTensor> = good
        .iter()
        .filter(|t| t.name != "fc.bias")
        .cloned()
        .collect();
    assert!(err(missing).contains("no fc.bias"));
    let mut reshaped = good.clone();
    let i = reshaped.iter().position(|t| t.name == "fc.weight").unwrap();
    reshaped[i].shape = vec![5, 128];
    assert!(err(reshaped).contains("fc.weight has shape [5, 128]"));
    let mut nan = good.clone();
    nan[0].data[0] = f32::NAN;
    assert!(err(nan).contains("NaN"));
    // A ResNet-14 read as ResNet-8's file: layers.1 is stage 1's second block there.
    let mut deeper = ParamStore::new();
    ResNet::cifar(&mut deeper, 14, 1, 10, &QuantPolicy::float(), 0u64).unwrap();
    let e = import(&mut deeper, &good, 2, path).unwrap_err().to_string();
    assert!(e.contains("layers.1.bn1.bias has shape [32]"), "{e}");

    // Files: wrong dtype, header length of 100 GB, overlapping offsets, truncation.
    let header = |json: &str, data: usize| {
        let mut f = (json.len() as u64).to_le_bytes().to_vec();
        f.extend_from_slice(json.as_bytes());
        f.extend(std::iter::repeat_n(0u8, data));
        f
    };
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            header(
                r#"{"w":{"dtype":"F64","shape":[2],"data_offsets":[0,16]}}"#,
                16,
            ),
            "not float32",
        ),
        (
            [100u64 << 30]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            "not a valid",
        ),
        (
            header(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                12,
            ),
            "not a valid",
        ),
        (
            header(
                r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
                8,
            ),
            "not a valid",
        ),
        (b"\x01\x02".to_vec(), "not a valid"),
    ];
    for (bytes, want) in cases {
        let e = read_safetensors(&bytes, path).unwrap_err().to_string();
        assert!(
            e.starts_with("bad.safetensors: ") && e.contains(want) && !e.contains('\n'),
            "{want}: {e}"
        );
    }
}
