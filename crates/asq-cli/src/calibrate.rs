//! `asq calibrate`: post-training quantization. A full-precision checkpoint becomes a quantized
//! one whose step sizes and alphas are initialised from a few hundred training images (one
//! eval-mode pass: batch norms keep their running statistics; ASQ adapters start at beta = 1,
//! their initialisation); its PTQ test accuracy is reported, and `asq train --init Q.ckpt`
//! fine-tunes it with the calibrated quantizers kept.

use std::path::PathBuf;

use asq_train::checkpoint::{Checkpoint, TrainState};
use asq_train::data::loader::make_batch;
use asq_train::nn::Module;
use asq_train::train::evaluate;
use asq_train::{Graph, ParamStore};

use crate::common::{check_new_output, Error};
use crate::recipe::{init_from, load_split, Recipe};

/// Options of `asq calibrate`.
#[derive(clap::Args)]
pub struct CalibrateArgs {
    /// A full-precision checkpoint (`asq train`, `asq import`).
    checkpoint: PathBuf,
    /// Quantization (any `--quant` of `asq train` but fp32).
    #[arg(long, default_value = "asq-post")]
    quant: String,
    /// Body bit width.
    #[arg(long, default_value_t = 4)]
    bits: u32,
    /// Precision of the first conv and the classifier: int8 (exportable) or fp32.
    #[arg(long, default_value = "int8")]
    ends: String,
    /// Calibration images: the first N of the training set (or of --images-dir).
    #[arg(long, default_value_t = 256)]
    images: usize,
    /// Calibrate on a folder of PNG/JPEG images instead (resized and centre-cropped to the
    /// model's input, normalised with the checkpoint's mean/std).
    #[arg(long)]
    images_dir: Option<PathBuf>,
    /// Test images for the PTQ accuracy (0: none).
    #[arg(long, default_value_t = 2000)]
    test_images: usize,
    /// Data directory: MNIST-layout IDX files (Fashion-MNIST) or CIFAR-10 binary batches
    /// (default: the Debian package's Fashion-MNIST, else the shipped subset).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Checkpoint to write.
    #[arg(long, short)]
    out: PathBuf,
    /// Replace an existing --out.
    #[arg(long)]
    force: bool,
}

/// `asq calibrate`.
pub fn calibrate(args: &CalibrateArgs) -> Result<(), Error> {
    check_new_output(&args.out, args.force)?;
    if args.quant == "fp32" {
        return Err(
            "--quant fp32 has nothing to calibrate; pick a quantization, e.g. asq-post".into(),
        );
    }
    if args.images == 0 {
        return Err("--images must be positive".into());
    }
    let src = Checkpoint::load(&args.checkpoint)?;
    let float = Recipe::from_meta(&src.meta, &args.checkpoint)?;
    if float.quant != "fp32" {
        return Err(format!(
            "{} is already quantized ({}); calibrate a full-precision checkpoint",
            args.checkpoint.display(),
            float.label()
        )
        .into());
    }
    let recipe = Recipe {
        quant: args.quant.clone(),
        bits: args.bits,
        ends: args.ends.clone(),
        ..float
    };
    let mut ps = ParamStore::new();
    let net = recipe.build(&mut ps, 0u64)?;
    init_from(&mut ps, &src, false);
    let train = match &args.images_dir {
        Some(dir) => {
            let all = crate::images::load_folder(dir, recipe.chw)?;
            let n = all.len().min(args.images);
            all.take(n)
        }
        None => load_split(&args.data, true, Some(args.images))?,
    };
    if (train.c, train.h, train.w) != recipe.chw {
        return Err(format!(
            "{} takes {}x{}x{} images, the data has {}x{}x{}",
            args.checkpoint.display(),
            recipe.chw.0,
            recipe.chw.1,
            recipe.chw.2,
            train.c,
            train.h,
            train.w
        )
        .into());
    }
    // One eval-mode pass over all calibration images: every quantizer initialises its scales
    // from the first batch it sees (LSQ: 2 mean|x| / sqrt(p); alpha: the 0.99 quantile of |w|).
    let idx: Vec<usize> = (0..train.len()).collect();
    let batch = make_batch(&train, &idx, &recipe.normalize, None)?;
    let mut g = Graph::new(false);
    let x = g.input(batch.images);
    net.forward(&mut g, &mut ps, x)?;
    drop(g);
    let mut meta = recipe.meta();
    meta.insert("calibration_images".into(), train.len().to_string());
    if args.test_images > 0 {
        let test = load_split(&args.data, false, Some(args.test_images))?;
        let (_, fp) = {
            let mut fps = ParamStore::new();
            let fnet = float_net(&src, &args.checkpoint, &mut fps)?;
            evaluate(&fnet, &mut fps, &test, &recipe.normalize, 250)?
        };
        let (_, acc) = evaluate(&net, &mut ps, &test, &recipe.normalize, 250)?;
        println!(
            "{} on {} test images: full precision {:.2} %, after calibration on {} images (PTQ) {:.2} %",
            recipe.label(),
            test.len(),
            100.0 * fp,
            train.len(),
            100.0 * acc
        );
        meta.insert("ptq_accuracy".into(), format!("{acc:.4}"));
    }
    Checkpoint::capture(&ps, None, TrainState::default(), meta).save(&args.out)?;
    println!("saved {}", args.out.display());
    Ok(())
}

/// The full-precision model of `src`.
fn float_net(
    src: &Checkpoint,
    path: &std::path::Path,
    ps: &mut ParamStore,
) -> Result<asq_models::Model, Error> {
    let recipe = Recipe::from_meta(&src.meta, path)?;
    let net = recipe.build(ps, 0u64)?;
    src.restore(ps)?;
    Ok(net)
}
