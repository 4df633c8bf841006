//! PyTorch state dicts in and out, as safetensors files.
//!
//! Names follow the PyTorch reference of the accuracy protocol (`shared/tools/reference`,
//! `ResNet20` and its quantized layers) for the CIFAR-style ResNets (`resnet8`, `resnet20`, ...
//! any `6n + 2`), with the zoo's names on the right:
//!
//! | PyTorch | asq |
//! |---|---|
//! | `conv1.weight`, `bn1.*` | `stem.conv.weight`, `stem.bn.*` |
//! | `layers.{i}.conv1.weight` (`.conv.weight` in a quantized layer), `layers.{i}.bn1.*`, `conv2`, `bn2` | `layer{s}.{b}.conv1.weight`, ... with `i = n·(s - 1) + b` |
//! | `layers.{i}.shortcut.0.weight`, `layers.{i}.shortcut.1.*` | `layer{s}.{b}.shortcut.conv.weight`, `.shortcut.bn.*` |
//! | `{conv}.aq.s` | `{conv}.act_step` (the activation step) |
//! | `{conv}.wq.s` (LSQ weights) or `{conv}.wq.alpha` (level sets) | `{conv}.weight_scale` |
//! | `{conv}.adapter.net.0.*`, `.net.2.*` | `{conv}.adapter.fc1.*`, `.fc2.*` (ASQ) |
//! | `fc.weight`, `fc.bias` | the same |
//!
//! torchvision's ResNet-18/34 (`resnet18`, `resnet34`: [`Naming::Torchvision`]) keep the zoo's
//! stage/block layout, so only the stem and the shortcut differ:
//!
//! | torchvision | asq |
//! |---|---|
//! | `conv1.weight`, `bn1.*` | `stem.conv.weight`, `stem.bn.*` |
//! | `layer{s}.{b}.conv1.weight`, `.bn1.*`, `.conv2.weight`, `.bn2.*` | the same |
//! | `layer{s}.{b}.downsample.0.weight`, `.downsample.1.*` | `layer{s}.{b}.shortcut.conv.weight`, `.shortcut.bn.*` |
//! | `fc.weight`, `fc.bias` | the same |
//!
//! with the quantizer parameters of a quantized layer as above (`{conv}.aq.s`, `{conv}.wq.s` or
//! `{conv}.wq.alpha`, `{conv}.adapter.net.{0,2}.*`).
//!
//! A CIFAR ResNet saved with torchvision-style names (`layer{s}.{b}`, `downsample.{0,1}`) is read
//! as such too ([`detect_naming`]).
//!
//! Batch-norm statistics (`running_mean`, `running_var`) are buffers on both sides;
//! `num_batches_tracked` is ignored. Quantizer parameters are optional on import (a float
//! model's are calibrated on the first batch); exported ones are read back exactly.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use asq_train::checkpoint::NamedTensor;
use asq_train::{Error, ParamStore, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

fn format_error(path: &Path, detail: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

/// Every tensor of a safetensors file (all float32; `num_batches_tracked` counters, int64 in
/// PyTorch's files, are skipped) and its metadata. Any other dtype, a header
/// that is too large, offsets that overlap or leave the file: a one-line error naming `path`.
pub fn read_safetensors(
    bytes: &[u8],
    path: &Path,
) -> Result<(Vec<NamedTensor>, BTreeMap<String, String>)> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| format_error(path, format!("not a valid safetensors file: {e}")))?;
    let (_, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| format_error(path, format!("not a valid safetensors file: {e}")))?;
    let metadata: BTreeMap<String, String> = meta
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    let mut tensors: Vec<NamedTensor> = Vec::new();
    for (name, view) in st.tensors() {
        if name.ends_with("num_batches_tracked") {
            continue; // int64 in PyTorch's files; asq keeps no such counter
        }
        if view.dtype() != Dtype::F32 {
            return Err(format_error(
                path,
                format!(
                    "tensor {name} is {:?}, not float32 (save with tensor.float())",
                    view.dtype()
                ),
            ));
        }
        let data = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        tensors.push(NamedTensor {
            name,
            shape: view.shape().to_vec(),
            data,
        });
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((tensors, metadata))
}

/// A safetensors file of float32 `tensors` with `metadata`.
pub fn write_safetensors(
    tensors: &[NamedTensor],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| t.data.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            TensorView::new(Dtype::F32, t.shape.clone(), b)
                .map(|v| (t.name.clone(), v))
                .map_err(|e| Error::Config(format!("tensor {}: {e}", t.name)))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta: HashMap<String, String> = metadata.clone().into_iter().collect();
    safetensors::serialize(views, &Some(meta))
        .map_err(|e| Error::Config(format!("safetensors: {e}")))
}

/// A quantized conv's PyTorch parameter suffix -> asq's (`None`: not a conv parameter name).
fn conv_suffix(rest: &str) -> Option<String> {
    let rest = rest.strip_prefix("conv.").unwrap_or(rest);
    Some(match rest {
        "weight" | "bias" => rest.to_string(),
        "wq.s" | "wq.alpha" => "weight_scale".into(),
        "aq.s" => "act_step".into(),
        _ => {
            let r = rest.strip_prefix("adapter.net.")?;
            let (layer, what) = r.split_once('.')?;
            let fc = match layer {
                "0" => "fc1",
                "2" => "fc2",
                _ => return None,
            };
            if what != "weight" && what != "bias" {
                return None;
            }
            format!("adapter.{fc}.{what}")
        }
    })
}

fn bn_suffix(rest: &str) -> Option<&str> {
    matches!(rest, "weight" | "bias" | "running_mean" | "running_var").then_some(rest)
}

/// How a PyTorch state dict names a zoo model's tensors (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// The accuracy protocol's reference CIFAR ResNets: `layers.{i}`, `blocks` per stage.
    Reference {
        /// Blocks per stage (`resnet20`: 3).
        blocks: usize,
    },
    /// torchvision's `resnet18` / `resnet34`: `layer{s}.{b}`, `downsample.{0,1}`.
    Torchvision,
    /// torchvision's `mobilenet_v2` (any width): `features.{i}`, `classifier.1`.
    TorchvisionMobileNetV2,
}

/// Blocks of MobileNetV2's inverted-residual table (1 + 2 + 3 + 4 + 3 + 3 + 1).
const MOBILENET_BLOCKS: usize = 17;

/// `(torchvision prefix, zoo prefix, is a conv)` of every layer of MobileNetV2: `features.0` is
/// the stem, `features.{i + 1}` block `i` (block 0 has no expansion: its depthwise conv is
/// `conv.0`), `features.18` the 1x1 head, `classifier.1` the classifier.
fn mobilenet_layers() -> Vec<(String, String, bool)> {
    let mut t = vec![
        ("features.0.0".to_string(), "stem.conv".to_string(), true),
        ("features.0.1".into(), "stem.bn".into(), false),
    ];
    for i in 0..MOBILENET_BLOCKS {
        let (f, b) = (format!("features.{}.conv", i + 1), format!("blocks.{i}"));
        let layers: &[(&str, &str, bool)] = if i == 0 {
            &[
                ("0.0", "dw", true),
                ("0.1", "dw_bn", false),
                ("1", "project", true),
                ("2", "project_bn", false),
            ]
        } else {
            &[
                ("0.0", "expand", true),
                ("0.1", "expand_bn", false),
                ("1.0", "dw", true),
                ("1.1", "dw_bn", false),
                ("2", "project", true),
                ("3", "project_bn", false),
            ]
        };
        for (tv, zoo, conv) in layers {
            t.push((format!("{f}.{tv}"), format!("{b}.{zoo}"), *conv));
        }
    }
    let head = format!("features.{}", MOBILENET_BLOCKS + 1);
    t.push((format!("{head}.0"), "head.conv".into(), true));
    t.push((format!("{head}.1"), "head.bn".into(), false));
    t.push(("classifier.1".into(), "fc".into(), true));
    t
}

impl From<usize> for Naming {
    /// A reference CIFAR ResNet with `blocks` blocks per stage.
    fn from(blocks: usize) -> Self {
        Naming::Reference { blocks }
    }
}

/// The naming of the zoo architecture `arch`, if PyTorch names are defined for it.
pub fn naming(arch: &str) -> Option<Naming> {
    if arch == "mobilenetv2"
        || arch
            .strip_prefix("mobilenetv2-")
            .is_some_and(|w| w.parse::<f32>().is_ok())
    {
        return Some(Naming::TorchvisionMobileNetV2);
    }
    match arch {
        "resnet18" | "resnet34" => Some(Naming::Torchvision),
        _ => cifar_blocks(arch).map(|blocks| Naming::Reference { blocks }),
    }
}

/// The naming of a state dict for the zoo architecture `arch`: [`naming`], except that a CIFAR
/// ResNet saved with torchvision-style names (`layer{s}.{b}...`, `downsample`) instead of the
/// reference's flat `layers.{i}` reads as [`Naming::Torchvision`] (the zoo's stage/block layout
/// is the same, so both name the same tensors).
pub fn detect_naming(arch: &str, tensors: &[NamedTensor]) -> Option<Naming> {
    let n = naming(arch)?;
    if matches!(n, Naming::Reference { .. })
        && tensors.iter().any(|t| t.name.starts_with("layer1."))
        && !tensors.iter().any(|t| t.name.starts_with("layers."))
    {
        return Some(Naming::Torchvision);
    }
    Some(n)
}

/// The zoo name of a parameter or buffer named `torch` in a PyTorch state dict of `naming`;
/// `None` for names that do not belong to such a model.
pub fn asq_name(torch: &str, naming: impl Into<Naming>) -> Option<String> {
    match naming.into() {
        n @ (Naming::Reference { .. } | Naming::Torchvision) => resnet_asq_name(torch, n),
        Naming::TorchvisionMobileNetV2 => {
            mobilenet_layers().into_iter().find_map(|(tv, zoo, conv)| {
                let rest = torch.strip_prefix(&tv)?.strip_prefix('.')?;
                if conv {
                    // The quantizer suffixes of a quantized layer, but not `conv.` (a prefix of
                    // the block's own names here).
                    if rest.starts_with("conv.") {
                        return None;
                    }
                    Some(format!("{zoo}.{}", conv_suffix(rest)?))
                } else {
                    Some(format!("{zoo}.{}", bn_suffix(rest)?))
                }
            })
        }
    }
}

/// [`asq_name`] for the ResNets: the reference's flat `layers.{i}` (`blocks` per stage) or
/// torchvision's `layer{s}.{b}`, which differ in how blocks and shortcuts are named.
fn resnet_asq_name(torch: &str, naming: Naming) -> Option<String> {
    if let Some(rest) = torch.strip_prefix("conv1.") {
        return Some(format!("stem.conv.{}", conv_suffix(rest)?));
    }
    if let Some(rest) = torch.strip_prefix("bn1.") {
        return Some(format!("stem.bn.{}", bn_suffix(rest)?));
    }
    if let Some(rest) = torch.strip_prefix("fc.") {
        return Some(format!("fc.{}", conv_suffix(rest)?));
    }
    let (stage, block, rest, (short_conv, short_bn)) = match naming {
        Naming::Reference { blocks } => {
            let (i, rest) = torch.strip_prefix("layers.")?.split_once('.')?;
            let i: usize = i.parse().ok()?;
            if blocks == 0 || i >= 3 * blocks {
                return None;
            }
            (
                i / blocks + 1,
                i % blocks,
                rest,
                ("shortcut.0.", "shortcut.1."),
            )
        }
        Naming::Torchvision => {
            let (stage, rest) = torch.strip_prefix("layer")?.split_once('.')?;
            let (block, rest) = rest.split_once('.')?;
            let stage: usize = stage.parse().ok()?;
            if stage == 0 {
                return None;
            }
            (
                stage,
                block.parse().ok()?,
                rest,
                ("downsample.0.", "downsample.1."),
            )
        }
        Naming::TorchvisionMobileNetV2 => return None,
    };
    let tail = if let Some(r) = rest.strip_prefix(short_conv) {
        format!("shortcut.conv.{}", conv_suffix(r)?)
    } else if let Some(r) = rest.strip_prefix(short_bn) {
        format!("shortcut.bn.{}", bn_suffix(r)?)
    } else {
        let (layer, r) = rest.split_once('.')?;
        match layer {
            "conv1" | "conv2" => format!("{layer}.{}", conv_suffix(r)?),
            "bn1" | "bn2" => format!("{layer}.{}", bn_suffix(r)?),
            _ => return None,
        }
    };
    Some(format!("layer{stage}.{block}.{tail}"))
}

/// The PyTorch name of a zoo parameter or buffer under `naming` (inverse of [`asq_name`]);
/// `weight_scale` needs to know whether the weights are LSQ (`wq.s`) or a level set
/// (`wq.alpha`). `None` for the quantizers' "ready" flags, which PyTorch does not need.
pub fn torch_name(asq: &str, naming: impl Into<Naming>, lsq_weights: bool) -> Option<String> {
    let conv = |rest: &str| -> Option<String> {
        Some(match rest {
            "weight" | "bias" => rest.to_string(),
            "weight_scale" => (if lsq_weights { "wq.s" } else { "wq.alpha" }).into(),
            "act_step" => "aq.s".into(),
            _ => {
                let r = rest.strip_prefix("adapter.")?;
                let (fc, what) = r.split_once('.')?;
                let n = match fc {
                    "fc1" => 0,
                    "fc2" => 2,
                    _ => return None,
                };
                format!("adapter.net.{n}.{what}")
            }
        })
    };
    let naming = naming.into();
    if naming == Naming::TorchvisionMobileNetV2 {
        return mobilenet_layers()
            .into_iter()
            .find_map(|(tv, zoo, is_conv)| {
                let rest = asq.strip_prefix(&zoo)?.strip_prefix('.')?;
                Some(if is_conv {
                    format!("{tv}.{}", conv(rest)?)
                } else {
                    format!("{tv}.{}", bn_suffix(rest)?)
                })
            });
    }
    if let Some(rest) = asq.strip_prefix("stem.conv.") {
        return Some(format!("conv1.{}", conv(rest)?));
    }
    if let Some(rest) = asq.strip_prefix("stem.bn.") {
        return Some(format!("bn1.{}", bn_suffix(rest)?));
    }
    if let Some(rest) = asq.strip_prefix("fc.") {
        return Some(format!("fc.{}", conv(rest)?));
    }
    let rest = asq.strip_prefix("layer")?;
    let (stage, rest) = rest.split_once('.')?;
    let (block, rest) = rest.split_once('.')?;
    let (stage, block): (usize, usize) = (stage.parse().ok()?, block.parse().ok()?);
    let (prefix, short_conv, short_bn) = match naming {
        Naming::Reference { blocks } => {
            if stage == 0 || block >= blocks {
                return None;
            }
            let i = (stage - 1) * blocks + block;
            (format!("layers.{i}"), "shortcut.0", "shortcut.1")
        }
        Naming::Torchvision => {
            if stage == 0 {
                return None;
            }
            (
                format!("layer{stage}.{block}"),
                "downsample.0",
                "downsample.1",
            )
        }
        Naming::TorchvisionMobileNetV2 => return None, // mapped above
    };
    let tail = if let Some(r) = rest.strip_prefix("shortcut.conv.") {
        format!("{short_conv}.{}", conv(r)?)
    } else if let Some(r) = rest.strip_prefix("shortcut.bn.") {
        format!("{short_bn}.{}", bn_suffix(r)?)
    } else {
        let (layer, r) = rest.split_once('.')?;
        match layer {
            "conv1" | "conv2" => format!("{layer}.{}", conv(r)?),
            "bn1" | "bn2" => format!("{layer}.{}", bn_suffix(r)?),
            _ => return None,
        }
    };
    Some(format!("{prefix}.{tail}"))
}

/// Blocks per stage of a CIFAR ResNet named `arch` (`resnet20` -> 3), if it is one.
pub fn cifar_blocks(arch: &str) -> Option<usize> {
    let depth: usize = arch.strip_prefix("resnet")?.parse().ok()?;
    // 18 and 34 are the basic-block ImageNet-style ResNets: 16 and 32 are not multiples of 6.
    (depth >= 8 && (depth - 2).is_multiple_of(6)).then_some((depth - 2) / 6)
}

/// Fills `ps` (a freshly built zoo model) from a PyTorch state dict. Every tensor must map to a
/// parameter or buffer of the same shape, and every float parameter and batch-norm statistic of
/// the model must be in the file; quantizer parameters may be missing (they calibrate on the
/// first batch), and those present mark their quantizer as initialised. Returns how many
/// tensors were read. Errors name the tensor.
pub fn import(
    ps: &mut ParamStore,
    tensors: &[NamedTensor],
    naming: impl Into<Naming>,
    path: &Path,
) -> Result<usize> {
    let naming = naming.into();
    let mut filled: Vec<String> = Vec::new();
    for t in tensors {
        if t.name.ends_with("num_batches_tracked") {
            continue;
        }
        let name = asq_name(&t.name, naming).ok_or_else(|| {
            format_error(path, format!("tensor {} is not part of this model", t.name))
        })?;
        let target = if let Some(id) = ps.find(&name) {
            &mut ps.get_mut(id).value
        } else if let Some((_, v)) = ps.buffers_mut().iter_mut().find(|(n, _)| *n == name) {
            v
        } else {
            return Err(format_error(
                path,
                format!("tensor {} ({name}) is not part of this model", t.name),
            ));
        };
        // PyTorch stores per-channel scales as [C, 1, 1, 1]; asq as [C].
        let want: usize = target.len();
        let same_shape = target.shape() == t.shape.as_slice()
            || (name.ends_with("weight_scale") && t.data.len() == want)
            || (name.ends_with("act_step") && t.data.len() == 1 && want == 1);
        if !same_shape {
            return Err(format_error(
                path,
                format!(
                    "tensor {} has shape {:?}, the model's {name} is {:?}",
                    t.name,
                    t.shape,
                    target.shape()
                ),
            ));
        }
        if let Some(i) = t.data.iter().position(|v| !v.is_finite()) {
            return Err(format_error(
                path,
                format!("tensor {} holds {} at {i}", t.name, t.data[i]),
            ));
        }
        target.iter_mut().zip(&t.data).for_each(|(a, b)| *a = *b);
        filled.push(name);
    }
    // Quantizers with imported scales are initialised.
    for (n, v) in ps.buffers_mut() {
        let layer = if let Some(l) = n.strip_suffix(".act_ready") {
            format!("{l}.act_step")
        } else if let Some(l) = n.strip_suffix(".weight_ready") {
            format!("{l}.weight_scale")
        } else {
            continue;
        };
        if filled.contains(&layer) {
            v.fill(1.0);
        }
    }
    let quantizer =
        |n: &str| n.ends_with("act_step") || n.ends_with("weight_scale") || n.contains(".adapter.");
    let missing = ps
        .params()
        .iter()
        .map(|p| p.name.clone())
        .chain(ps.buffers().iter().map(|(n, _)| n.clone()))
        .filter(|n| !n.ends_with("_ready") && !quantizer(n))
        .find(|n| !filled.contains(n));
    if let Some(n) = missing {
        let torch = torch_name(&n, naming, true).unwrap_or_default();
        return Err(format_error(
            path,
            format!("the file has no {torch} (the model's {n})"),
        ));
    }
    Ok(filled.len())
}

/// The float weights, batch-norm statistics and quantizer parameters of `ps` under the
/// reference's names (see the module docs); per-channel scales as `[C, 1, 1, 1]` for convs,
/// `[C, 1]` for linear layers, as PyTorch keeps them.
pub fn export(
    ps: &ParamStore,
    naming: impl Into<Naming>,
    lsq_weights: bool,
) -> Result<Vec<NamedTensor>> {
    let naming = naming.into();
    let mut out = Vec::new();
    let all = ps
        .params()
        .iter()
        .map(|p| (p.name.as_str(), &p.value))
        .chain(ps.buffers().iter().map(|(n, v)| (n.as_str(), v)));
    for (name, value) in all {
        if name.ends_with("_ready") {
            continue;
        }
        let torch = torch_name(name, naming, lsq_weights)
            .ok_or_else(|| Error::Config(format!("{name} has no PyTorch name")))?;
        let mut shape = value.shape().to_vec();
        if name.ends_with("weight_scale") {
            let weight = name.trim_end_matches("weight_scale").to_string() + "weight";
            let rank = ps
                .find(&weight)
                .map_or(4, |id| ps.get(id).value.shape().len());
            shape.extend(std::iter::repeat_n(1, rank.saturating_sub(1)));
        }
        out.push(NamedTensor {
            name: torch,
            shape,
            data: value.iter().copied().collect(),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        for (torch, asq) in [
            ("conv1.weight", "stem.conv.weight"),
            ("bn1.running_var", "stem.bn.running_var"),
            ("layers.4.conv2.conv.weight", "layer2.1.conv2.weight"),
            (
                "layers.3.shortcut.0.weight",
                "layer2.0.shortcut.conv.weight",
            ),
            ("layers.3.shortcut.1.bias", "layer2.0.shortcut.bn.bias"),
            ("layers.8.conv1.aq.s", "layer3.2.conv1.act_step"),
            ("layers.8.conv1.wq.alpha", "layer3.2.conv1.weight_scale"),
            (
                "layers.0.conv1.adapter.net.2.bias",
                "layer1.0.conv1.adapter.fc2.bias",
            ),
            ("fc.weight", "fc.weight"),
        ] {
            assert_eq!(asq_name(torch, 3).as_deref(), Some(asq), "{torch}");
            let back = torch_name(asq, 3, false).unwrap();
            assert_eq!(asq_name(&back, 3).as_deref(), Some(asq), "{back}");
        }
        for bad in [
            "layers.9.conv1.weight",
            "conv9.weight",
            "layers.0.bn1.momentum",
            "x",
        ] {
            assert_eq!(asq_name(bad, 3), None, "{bad}");
        }
        assert_eq!(cifar_blocks("resnet20"), Some(3));
        assert_eq!(cifar_blocks("resnet18"), None);
        assert_eq!(naming("resnet18"), Some(Naming::Torchvision));
        assert_eq!(naming("resnet20"), Some(Naming::Reference { blocks: 3 }));
        assert_eq!(naming("mlp"), None);
        let t = |name: &str| NamedTensor {
            name: name.into(),
            shape: vec![1],
            data: vec![0.0],
        };
        let reference = [t("conv1.weight"), t("layers.0.conv1.weight")];
        let tv_style = [t("conv1.weight"), t("layer1.0.conv1.weight")];
        assert_eq!(
            detect_naming("resnet20", &reference),
            Some(Naming::Reference { blocks: 3 })
        );
        assert_eq!(
            detect_naming("resnet20", &tv_style),
            Some(Naming::Torchvision)
        );
        assert_eq!(
            detect_naming("resnet18", &tv_style),
            Some(Naming::Torchvision)
        );
        assert_eq!(detect_naming("lenet5", &tv_style), None);
    }

    #[test]
    fn torchvision_names_map_both_ways() {
        let tv = Naming::Torchvision;
        for (torch, asq) in [
            ("conv1.weight", "stem.conv.weight"),
            ("bn1.running_mean", "stem.bn.running_mean"),
            ("layer1.0.conv1.weight", "layer1.0.conv1.weight"),
            ("layer4.1.bn2.bias", "layer4.1.bn2.bias"),
            (
                "layer2.0.downsample.0.weight",
                "layer2.0.shortcut.conv.weight",
            ),
            (
                "layer3.0.downsample.1.running_var",
                "layer3.0.shortcut.bn.running_var",
            ),
            ("layer3.5.conv2.aq.s", "layer3.5.conv2.act_step"),
            ("layer1.0.conv1.wq.s", "layer1.0.conv1.weight_scale"),
            ("fc.bias", "fc.bias"),
        ] {
            assert_eq!(asq_name(torch, tv).as_deref(), Some(asq), "{torch}");
            assert_eq!(torch_name(asq, tv, true).as_deref(), Some(torch), "{asq}");
        }
        for bad in [
            "layer0.0.conv1.weight",
            "layer1.0.downsample.2.weight",
            "layer1.0.relu.weight",
            "layers.0.conv1.weight",
            "features.0.0.weight",
        ] {
            assert_eq!(asq_name(bad, tv), None, "{bad}");
        }
    }
}
