//! `asq export-safetensors`: a checkpoint's float weights, batch-norm statistics and quantizer
//! parameters as a safetensors state dict under the reference's PyTorch names, with the recipe
//! (model, quantization, bits, input, normalisation) in the metadata (docs/formats.md).

use std::path::PathBuf;

use asq_models::torch::{export, naming, write_safetensors};
use asq_train::checkpoint::{atomic_write, Checkpoint};
use asq_train::ParamStore;

use crate::common::{check_new_output, Error};
use crate::recipe::Recipe;

/// Options of `asq export-safetensors`.
#[derive(clap::Args)]
pub struct ExportSafetensorsArgs {
    /// Checkpoint written by `asq train` or `asq import`.
    checkpoint: PathBuf,
    /// File to write (`.safetensors`).
    #[arg(long, short)]
    out: PathBuf,
    /// Replace an existing --out.
    #[arg(long)]
    force: bool,
}

/// `asq export-safetensors`.
pub fn export_safetensors(args: &ExportSafetensorsArgs) -> Result<(), Error> {
    check_new_output(&args.out, args.force)?;
    let ckpt = Checkpoint::load(&args.checkpoint)?;
    let recipe = Recipe::from_meta(&ckpt.meta, &args.checkpoint)?;
    let blocks = naming(&recipe.model).ok_or_else(|| {
        format!(
            "{}: PyTorch names are defined for the CIFAR-style ResNets and torchvision's \
             ResNet-18/34 and MobileNetV2, not {}",
            args.checkpoint.display(),
            recipe.model
        )
    })?;
    let mut ps = ParamStore::new();
    recipe.build(&mut ps, 0u64)?;
    ckpt.restore(&mut ps)?;
    // LSQ weights keep a step (`wq.s`); level sets (POT, APoT, POST) an alpha (`wq.alpha`).
    let weights = recipe.quant.split_once('-').map_or("lsq", |(_, w)| w);
    let tensors = export(&ps, blocks, weights == "lsq")?;
    let mut meta = recipe.meta();
    meta.insert("weight_quantizer".into(), weights.into());
    meta.insert("format".into(), "pt".into());
    atomic_write(&args.out, &write_safetensors(&tensors, &meta)?)?;
    println!(
        "wrote {} tensors of {} to {}",
        tensors.len(),
        recipe.label(),
        args.out.display()
    );
    Ok(())
}
