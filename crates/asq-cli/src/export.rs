//! `asq export`: rebuilds the model from a checkpoint and writes the integer-engine model
//! (`.asqm`).

use std::path::PathBuf;

use asq_models::engine::InputSpec;
use asq_models::IntModel;
use asq_train::checkpoint::Checkpoint;
use asq_train::ParamStore;

use crate::common::{check_new_output, Error};
use crate::recipe::Recipe;

/// Options of `asq export`.
#[derive(clap::Args)]
pub struct ExportArgs {
    /// Checkpoint written by `asq train` (a quantized model).
    checkpoint: PathBuf,
    /// Model file to write (`.asqm`).
    #[arg(long, short)]
    out: PathBuf,
    /// Replace an existing --out.
    #[arg(long)]
    force: bool,
}

/// `asq export`.
pub fn export(args: &ExportArgs) -> Result<(), Error> {
    check_new_output(&args.out, args.force)?;
    let ckpt = Checkpoint::load(&args.checkpoint)?;
    let recipe = Recipe::from_meta(&ckpt.meta, &args.checkpoint)?;
    if recipe.quant == "fp32" || recipe.ends == "fp32" {
        return Err(format!(
            "{}: {} has full-precision layers, which have no integer form; train with --quant (e.g. asq-post) and --ends int8",
            args.checkpoint.display(),
            recipe.label()
        )
        .into());
    }
    let mut ps = ParamStore::new();
    let net = recipe.build(&mut ps, 0u64)?;
    ckpt.restore(&mut ps)?;
    let (c, h, w) = recipe.chw;
    let input = InputSpec {
        channels: c,
        height: h,
        width: w,
        mean: recipe.normalize.mean.clone(),
        std: recipe.normalize.std.clone(),
    };
    let model = net.export(&ps, &recipe.model, input)?;
    let mut spec = model.spec().clone();
    spec.meta = ckpt.meta.clone();
    let model = IntModel::new(spec)?;
    model.save(&args.out)?;
    let size = std::fs::metadata(&args.out)
        .map_err(|e| format!("{}: {e}", args.out.display()))?
        .len();
    println!(
        "exported {} -> {}: {} nodes, {} bytes of packed weights, {size} bytes on disk",
        recipe.label(),
        args.out.display(),
        model.spec().nodes.len(),
        model.weight_bytes()
    );
    Ok(())
}
