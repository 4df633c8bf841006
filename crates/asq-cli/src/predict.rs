//! `asq predict`: logits of a model for images given as a NumPy array.
//!
//! The input is a float32 `.npy` array `[N, C, H, W]` of images already normalised as the model
//! was trained (NCHW, as PyTorch feeds them); the output is the logits `[N, classes]` as a
//! float32 `.npy`. A `.asqm` runs on the integer engine, a checkpoint on its float or fake-quant
//! graph (eval mode).

use std::path::PathBuf;

use asq_models::IntModel;
use asq_train::checkpoint::{atomic_write, Checkpoint};
use asq_train::data::npy;
use asq_train::nn::Module;
use asq_train::{Graph, ParamStore, Tensor};

use crate::common::{check_new_output, Error};
use crate::recipe::{is_model_file, Recipe};

/// Options of `asq predict`.
#[derive(clap::Args)]
pub struct PredictArgs {
    /// A `.asqm` model (integer engine) or a checkpoint of `asq train` (float / fake-quant graph).
    model: PathBuf,
    /// Images: float32 `.npy`, `[N, C, H, W]`, normalised as in training.
    #[arg(long)]
    input: PathBuf,
    /// Logits `[N, classes]` (float32 `.npy`), written atomically.
    #[arg(long, short)]
    out: PathBuf,
    /// Images per forward pass.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Replace an existing --out.
    #[arg(long)]
    force: bool,
}

/// `asq predict`.
pub fn predict(args: &PredictArgs) -> Result<(), Error> {
    if args.batch == 0 {
        return Err("--batch must be positive".into());
    }
    check_new_output(&args.out, args.force)?;
    let bytes = std::fs::read(&args.input).map_err(|e| format!("{}: {e}", args.input.display()))?;
    let (shape, x) = npy::parse_f32(&bytes, &args.input)?;
    let [n, c, h, w] = shape[..] else {
        return Err(format!(
            "{}: shape {shape:?} is not [N, C, H, W] images",
            args.input.display()
        )
        .into());
    };
    if n == 0 {
        return Err(format!("{}: no images (N = 0)", args.input.display()).into());
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(format!(
            "{}: value {} at index {i} is not finite",
            args.input.display(),
            x[i]
        )
        .into());
    }
    let per = c * h * w;
    let mismatch = |want: (usize, usize, usize)| -> Error {
        format!(
            "{} takes {}x{}x{} images, {} holds {c}x{h}x{w}",
            args.model.display(),
            want.0,
            want.1,
            want.2,
            args.input.display()
        )
        .into()
    };
    let mut logits = Vec::new();
    if is_model_file(&args.model)? {
        let model = IntModel::load(&args.model)?;
        let inp = &model.spec().input;
        if (inp.channels, inp.height, inp.width) != (c, h, w) {
            return Err(mismatch((inp.channels, inp.height, inp.width)));
        }
        for chunk in x.chunks(args.batch * per) {
            logits.extend(model.forward(chunk, chunk.len() / per)?);
        }
    } else {
        let ckpt = Checkpoint::load(&args.model)?;
        let recipe = Recipe::from_meta(&ckpt.meta, &args.model)?;
        if recipe.chw != (c, h, w) {
            return Err(mismatch(recipe.chw));
        }
        let mut ps = ParamStore::new();
        let net = recipe.build(&mut ps, 0u64)?;
        ckpt.restore(&mut ps)?;
        for chunk in x.chunks(args.batch * per) {
            let b = chunk.len() / per;
            let t = Tensor::from_shape_vec(ndarray::IxDyn(&[b, c, h, w]), chunk.to_vec())
                .map_err(|e| e.to_string())?;
            let mut g = Graph::new(false);
            let xv = g.input(t);
            let y = net.forward(&mut g, &mut ps, xv)?;
            logits.extend(g.value(y).iter().copied());
        }
    }
    let classes = logits.len() / n;
    atomic_write(&args.out, &npy::to_bytes_f32(&[n, classes], &logits)?)?;
    println!(
        "{}: logits of {n} images x {classes} classes -> {}",
        args.model.display(),
        args.out.display()
    );
    Ok(())
}
