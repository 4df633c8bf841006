//! torchvision's ResNet-18/34 and MobileNetV2 state dicts import into the zoo's `resnet18`,
//! `resnet34`, `mobilenetv2` and `mobilenetv2-0.5` and give torchvision's eval-mode logits: the
//! same modules in the same order (ResNets: 7x7 stride-2 stem, max pool with padding,
//! `downsample` shortcuts; MobileNetV2: stride-2 stem, torchvision's strides and widths), on a
//! non-square input. The weights are a formula (`tests/fixtures/torchvision/gen.py`), so the
//! fixture holds only the names, shapes and logits.

use std::path::Path;

use asq_models::torch::{export, import, naming, Naming};
use asq_models::{Model, QuantPolicy, ResNet};
use asq_train::checkpoint::NamedTensor;
use asq_train::nn::Module;
use asq_train::{Graph, ParamStore, Tensor};

fn fixture(file: &str) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torchvision");
    std::fs::read_to_string(dir.join(file)).unwrap()
}

/// The generator's formula (see gen.py), in f64 then rounded to f32.
fn value(name: &str, k: usize, i: usize, shape: &[usize], numel: usize) -> f32 {
    let v = (0.7 * i as f64 + 1.3 * k as f64 + 0.1).sin();
    let x = if name.ends_with("running_var") {
        1.0 + 0.5 * v * v
    } else if name.ends_with("running_mean") {
        0.1 * v
    } else if name.ends_with("weight") && shape.len() == 1 {
        1.0 + 0.1 * v
    } else if name.ends_with("weight") {
        v / (numel as f64 / shape[0] as f64).sqrt()
    } else {
        0.1 * v
    };
    x as f32
}

/// The state dict of `arch` as the generator set it.
fn state_dict(arch: &str) -> Vec<NamedTensor> {
    fixture("manifest.txt")
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{arch} ")))
        .enumerate()
        .map(|(k, l)| {
            let mut it = l.split_whitespace();
            let name = it.next().unwrap().to_string();
            let shape: Vec<usize> = it.map(|d| d.parse().unwrap()).collect();
            let numel = shape.iter().product();
            let data = (0..numel)
                .map(|i| value(&name, k, i, &shape, numel))
                .collect();
            NamedTensor { name, shape, data }
        })
        .collect()
}

fn logits_of(arch: &str) -> Vec<f32> {
    fixture("logits.txt")
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{arch} ")))
        .unwrap()
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect()
}

#[test]
fn torchvision_models_import_and_give_torchvisions_logits() {
    for (arch, kind) in [
        ("resnet18", Naming::Torchvision),
        ("resnet34", Naming::Torchvision),
        ("mobilenetv2", Naming::TorchvisionMobileNetV2),
        ("mobilenetv2-0.5", Naming::TorchvisionMobileNetV2),
    ] {
        assert_eq!(naming(arch), Some(kind));
        let sd = state_dict(arch);
        let mut ps = ParamStore::new();
        let net =
            Model::build(arch, &mut ps, (3, 40, 48), 10, &QuantPolicy::float(), 0u64).unwrap();
        let n = import(&mut ps, &sd, kind, Path::new("x.safetensors")).unwrap();
        assert_eq!(n, sd.len());
        assert_eq!(n, ps.params().len() + ps.buffers().len());
        let x: Vec<f32> = (0..2 * 3 * 40 * 48)
            .map(|i| (0.01 * i as f64).sin() as f32)
            .collect();
        let mut g = Graph::new(false);
        let xv = g.input(Tensor::from_shape_vec(ndarray::IxDyn(&[2, 3, 40, 48]), x).unwrap());
        let y = net.forward(&mut g, &mut ps, xv).unwrap();
        assert_eq!(g.shape(y), &[2, 10]);
        let want = logits_of(arch);
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for (a, b) in g.value(y).iter().zip(&want) {
            assert!(
                (a - b).abs() <= 1e-4 * scale,
                "{arch}: logit {a} vs torchvision {b} (scale {scale})"
            );
        }
        // And back out under the same names, exactly.
        let mut back = export(&ps, kind, true).unwrap();
        let mut orig = sd.clone();
        back.sort_by(|a, b| a.name.cmp(&b.name));
        orig.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(back.len(), orig.len());
        for (a, b) in back.iter().zip(&orig) {
            assert_eq!((&a.name, &a.shape), (&b.name, &b.shape));
            assert_eq!(a.data, b.data, "{}", a.name);
        }
    }
}

#[test]
fn a_name_or_shape_that_does_not_fit_is_an_error_naming_it() {
    assert_eq!(naming("mobilenetv2-cifar"), None);
    let mut sd = state_dict("resnet18");
    let mut ps = ParamStore::new();
    ResNet::basic(&mut ps, 18, 3, 10, &QuantPolicy::float(), 0u64).unwrap();
    let path = Path::new("m.safetensors");
    // ResNet-34's names are not ResNet-18's.
    let extra = NamedTensor {
        name: "layer1.2.conv1.weight".into(),
        shape: vec![64, 64, 3, 3],
        data: vec![0.0; 64 * 64 * 9],
    };
    sd.push(extra);
    let e = import(&mut ps, &sd, Naming::Torchvision, path)
        .unwrap_err()
        .to_string();
    assert!(e.contains("layer1.2.conv1.weight"), "{e}");
    sd.pop();
    // A classifier for 1000 classes into a 10-class model.
    let fc = sd.iter_mut().find(|t| t.name == "fc.weight").unwrap();
    fc.shape = vec![1000, 512];
    fc.data = vec![0.0; 1000 * 512];
    let e = import(&mut ps, &sd, Naming::Torchvision, path)
        .unwrap_err()
        .to_string();
    assert!(e.contains("fc.weight") && e.contains("1000"), "{e}");
    // A missing tensor is named in torchvision's terms.
    let mut sd = state_dict("resnet18");
    sd.retain(|t| t.name != "layer2.0.downsample.1.running_var");
    let e = import(&mut ps, &sd, Naming::Torchvision, path)
        .unwrap_err()
        .to_string();
    assert!(e.contains("layer2.0.downsample.1.running_var"), "{e}");
}

#[test]
fn cifar_resnets_read_torchvision_style_names_too() {
    use asq_models::torch::detect_naming;
    let mut a = ParamStore::new();
    ResNet::cifar(&mut a, 8, 1, 10, &QuantPolicy::float(), 3u64).unwrap();
    let tv = export(&a, Naming::Torchvision, true).unwrap();
    assert!(tv.iter().any(|t| t.name == "layer2.0.downsample.0.weight"));
    let kind = detect_naming("resnet8", &tv).unwrap();
    assert_eq!(kind, Naming::Torchvision);
    let mut b = ParamStore::new();
    ResNet::cifar(&mut b, 8, 1, 10, &QuantPolicy::float(), 4u64).unwrap();
    import(&mut b, &tv, kind, Path::new("r8.safetensors")).unwrap();
    for (pa, pb) in a.params().iter().zip(b.params()) {
        assert_eq!((&pa.name, &pa.value), (&pb.name, &pb.value));
    }
    // The reference's names are still detected as such.
    let reference = export(&a, 1usize, true).unwrap();
    assert_eq!(
        detect_naming("resnet8", &reference),
        Some(Naming::Reference { blocks: 1 })
    );
}
