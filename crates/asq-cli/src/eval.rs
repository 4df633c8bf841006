//! `asq eval`: test accuracy and speed of a `.asqm` (integer engine) or a checkpoint (float or
//! fake-quant graph).

use std::path::PathBuf;

use asq_models::IntModel;
use asq_train::checkpoint::Checkpoint;
use asq_train::data::Normalize;
use asq_train::nn::Module;
use asq_train::{Graph, ParamStore};

use crate::common::{confusion, Error};
use crate::recipe::{is_model_file, load_split, Recipe};

/// Options of `asq eval`.
#[derive(clap::Args)]
pub struct EvalArgs {
    /// A `.asqm` model (integer engine) or a checkpoint (float / fake-quant graph).
    model: PathBuf,
    /// Data directory: MNIST-layout IDX files (Fashion-MNIST) or CIFAR-10 binary batches
    /// (default: the Debian package's Fashion-MNIST, else the shipped subset).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Test images evaluated (the first N; default all).
    #[arg(long)]
    test_images: Option<usize>,
    /// Batch size of the timed passes.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Also print per-class accuracy and the most frequent confusion of each class.
    #[arg(long)]
    classes: bool,
}

/// `asq eval`.
pub fn eval(args: &EvalArgs) -> Result<(), Error> {
    if args.batch == 0 {
        return Err("--batch must be positive".into());
    }
    let test = load_split(&args.data, false, args.test_images)?;
    if is_model_file(&args.model)? {
        let model = IntModel::load(&args.model)?;
        let spec = model.spec();
        let inp = &spec.input;
        if (inp.channels, inp.height, inp.width) != (test.c, test.h, test.w) {
            return Err(format!(
                "{} takes {}x{}x{} images, the test set has {}x{}x{}",
                args.model.display(),
                inp.channels,
                inp.height,
                inp.width,
                test.c,
                test.h,
                test.w
            )
            .into());
        }
        let normalize = Normalize {
            mean: inp.mean.clone(),
            std: inp.std.clone(),
        };
        let logits = |x: &asq_train::Tensor| -> Result<Vec<f32>, Error> {
            let flat = x.as_slice().ok_or("non-contiguous batch")?;
            Ok(model.forward(flat, x.shape()[0])?)
        };
        let (conf, speed) = confusion(&test, &normalize, args.batch, logits)?;
        let acc = conf.accuracy();
        let label = spec.meta.get("quant").map_or(String::new(), |q| {
            format!(" {q} W{0}A{0}", spec.meta.get("bits").map_or("?", |b| b))
        });
        println!(
            "{}{label} on the integer engine ({}): {} test images, accuracy {:.2} %, {speed:.0} images/s (batch {})",
            spec.name,
            asq_kernels::Isa::best().name(),
            test.len(),
            100.0 * acc,
            args.batch
        );
        if args.classes {
            print!("\n{}", conf.table());
        }
        return Ok(());
    }
    let ckpt = Checkpoint::load(&args.model)?;
    let recipe = Recipe::from_meta(&ckpt.meta, &args.model)?;
    let mut ps = ParamStore::new();
    let net = recipe.build(&mut ps, 0u64)?;
    ckpt.restore(&mut ps)?;
    let (conf, speed) = confusion(&test, &recipe.normalize, args.batch, |x| {
        let mut g = Graph::new(false);
        let v = g.input(x.clone());
        let y = net.forward(&mut g, &mut ps, v)?;
        Ok(g.value(y).iter().copied().collect())
    })?;
    let acc = conf.accuracy();
    let engine = if recipe.quant == "fp32" {
        "float graph"
    } else {
        "fake-quant graph"
    };
    println!(
        "{} on the {engine}: {} test images, accuracy {:.2} %, {speed:.0} images/s (batch {})",
        recipe.label(),
        test.len(),
        100.0 * acc,
        args.batch
    );
    if args.classes {
        print!("\n{}", conf.table());
    }
    Ok(())
}
