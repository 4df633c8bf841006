//! `asq import`: a PyTorch state dict saved as safetensors becomes a full-precision checkpoint
//! (names: `asq_models::torch`, docs/formats.md). From there `asq train --init F.ckpt --quant
//! asq-post` quantizes and fine-tunes it (scales calibrate on the first batch), `asq predict`
//! runs it, and `asq export` makes the integer model of a quantized one.

use std::path::PathBuf;

use asq_models::torch::{detect_naming, import as import_tensors, naming, read_safetensors};
use asq_train::checkpoint::{Checkpoint, TrainState};
use asq_train::data::Normalize;
use asq_train::nn::StepGradScale;
use asq_train::ParamStore;

use crate::common::{check_new_output, Error};
use crate::recipe::Recipe;

/// Options of `asq import`.
#[derive(clap::Args)]
pub struct ImportArgs {
    /// A PyTorch state dict saved with `safetensors.torch.save_file` (float32 tensors).
    file: PathBuf,
    /// Architecture the state dict belongs to: a CIFAR-style ResNet (`resnet8`, `resnet20`,
    /// any 6n+2) with the reference's parameter names (docs/formats.md).
    #[arg(long)]
    model: String,
    /// Classes of its classifier.
    #[arg(long, default_value_t = 10)]
    classes: usize,
    /// Input images, CxHxW.
    #[arg(long, default_value = "1x28x28")]
    input: String,
    /// Per-channel mean of the normalisation the model was trained with (comma-separated;
    /// default: Fashion-MNIST's training set).
    #[arg(long, value_delimiter = ',', default_value = "0.2860402")]
    mean: Vec<f32>,
    /// Per-channel standard deviation of that normalisation.
    #[arg(long, value_delimiter = ',', default_value = "0.3530239")]
    std: Vec<f32>,
    /// Checkpoint to write.
    #[arg(long, short)]
    out: PathBuf,
    /// Replace an existing --out.
    #[arg(long)]
    force: bool,
}

/// `asq import`.
pub fn import(args: &ImportArgs) -> Result<(), Error> {
    check_new_output(&args.out, args.force)?;
    let blocks = naming(&args.model).ok_or_else(|| {
        format!(
            "--model {}: PyTorch names are defined for the CIFAR-style ResNets (resnet8, resnet20, \
             ... 6n+2: the reference's or torchvision-style names), torchvision's resnet18 / \
             resnet34 and mobilenetv2 (any width); this architecture has none",
            args.model
        )
    })?;
    let dims: Vec<usize> = args
        .input
        .split('x')
        .map(|d| {
            d.parse()
                .map_err(|_| format!("--input {}: CxHxW", args.input))
        })
        .collect::<Result<_, _>>()?;
    let [c, h, w] = dims[..] else {
        return Err(format!("--input {}: CxHxW", args.input).into());
    };
    if c == 0 || h == 0 || w == 0 || args.classes == 0 {
        return Err("--input and --classes must be positive".into());
    }
    if args.mean.len() != c
        || args.std.len() != c
        || args.std.iter().any(|s| !s.is_finite() || *s <= 0.0)
    {
        return Err(
            format!("--mean and --std need {c} values (one per channel), std positive").into(),
        );
    }
    let recipe = Recipe {
        model: args.model.clone(),
        quant: "fp32".into(),
        bits: 4,
        ends: "int8".into(),
        chw: (c, h, w),
        classes: args.classes,
        normalize: Normalize {
            mean: args.mean.clone(),
            std: args.std.clone(),
        },
        step_grad: StepGradScale::default(),
    };
    let bytes = std::fs::read(&args.file).map_err(|e| format!("{}: {e}", args.file.display()))?;
    let (tensors, meta) = read_safetensors(&bytes, &args.file)?;
    // A file written by `asq export-safetensors` records its recipe (quantization included):
    // the model is rebuilt as it was, quantizers and all.
    let recipe = if meta.contains_key("quant") {
        let saved = Recipe::from_meta(&meta.into_iter().collect(), &args.file)?;
        if saved.model != args.model {
            return Err(format!(
                "{}: holds a {}, not a {}",
                args.file.display(),
                saved.model,
                args.model
            )
            .into());
        }
        saved
    } else {
        recipe
    };
    let mut ps = ParamStore::new();
    recipe.build(&mut ps, 0u64)?;
    // A CIFAR ResNet may come with torchvision-style names instead of the reference's.
    let names = detect_naming(&args.model, &tensors).unwrap_or(blocks);
    let n = import_tensors(&mut ps, &tensors, names, &args.file)?;
    Checkpoint::capture(&ps, None, TrainState::default(), recipe.meta()).save(&args.out)?;
    println!(
        "imported {n} tensors of {} into {} ({})",
        args.file.display(),
        args.out.display(),
        recipe.label()
    );
    Ok(())
}
