//! `asq demo`: the main job end to end on real data. Train a ResNet-20 in full precision on
//! Fashion-MNIST, fine-tune it as W4A4 ASQ+POST from that checkpoint, export it to the integer
//! engine, run integer inference on the test images and report accuracy and speed of the three.

use std::path::PathBuf;
use std::time::Instant;

use asq_models::{QuantPolicy, ResNet};
use asq_train::checkpoint::{Checkpoint, TrainState};
use asq_train::data::idx::load_mnist_dir;
use asq_train::data::{Augment, Dataset, Normalize};
use asq_train::nn::{Module, StepGradScale};
use asq_train::optim::{LrSchedule, LrShape, Optimizer, OptimizerConfig, ParamGroups};
use asq_train::train::{evaluate, fit, TrainConfig};
use asq_train::{Graph, ParamStore};

/// Options of `asq demo`.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Fashion-MNIST directory (IDX files, plain or .gz). Default: the Debian package's, else the
    /// subset shipped with asq.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Training images used (the first N of the training set).
    #[arg(long, default_value_t = 6000)]
    train_images: usize,
    /// Test images evaluated.
    #[arg(long, default_value_t = 2000)]
    test_images: usize,
    /// Full-precision epochs.
    #[arg(long, default_value_t = 2)]
    fp_epochs: u64,
    /// Quantization-aware fine-tuning epochs (from the full-precision weights).
    #[arg(long, default_value_t = 1)]
    qat_epochs: u64,
    /// Mini-batch size.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Bit width of the quantized body (weights and activations).
    #[arg(long, default_value_t = 4)]
    bits: u32,
    /// Seed of initialisation, data order and augmentation.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Directory for the checkpoints (nothing is written without it).
    #[arg(long)]
    out: Option<PathBuf>,
}

use crate::common::{data_dir, measure, Bar, Error};
use crate::recipe::Recipe;

/// Trains `net` for `(epochs, learning rate)`; returns training images/s.
fn train(
    net: &ResNet,
    ps: &mut ParamStore,
    train_set: &Dataset,
    normalize: &Normalize,
    (epochs, lr): (u64, f32),
    args: &DemoArgs,
    what: &str,
) -> Result<f64, Error> {
    let per_epoch = train_set.len().div_ceil(args.batch) as u64;
    let cfg = TrainConfig {
        epochs,
        batch_size: args.batch,
        max_batches: None,
        drop_last: false,
        schedule: LrSchedule {
            base: lr,
            warmup: per_epoch.min(50),
            shape: LrShape::Cosine {
                total: per_epoch * epochs,
                min: 0.0,
            },
        },
        label_smoothing: 0.0,
        augment: Augment {
            crop_pad: 2,
            hflip: true,
        },
        normalize: normalize.clone(),
    };
    let mut opt = Optimizer::new(
        OptimizerConfig::Sgd {
            momentum: 0.9,
            nesterov: false,
        },
        ParamGroups::new(1e-4),
    )?;
    let mut bar = Bar::new(per_epoch * epochs, what);
    let t = Instant::now();
    let mut state = TrainState {
        seed: args.seed,
        ..Default::default()
    };
    let stats = fit(net, ps, &mut opt, train_set, &cfg, &mut state, &mut bar)?;
    bar.0.finish();
    let images: usize = stats.iter().map(|s| s.images).sum();
    Ok(images as f64 / t.elapsed().as_secs_f64())
}

fn save(out: &Option<PathBuf>, name: &str, ps: &ParamStore, recipe: &Recipe) -> Result<(), Error> {
    if let Some(dir) = out {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = dir.join(name);
        Checkpoint::capture(ps, None, TrainState::default(), recipe.meta()).save(&path)?;
        println!("saved {}", path.display());
    }
    Ok(())
}

/// Runs the demo.
pub fn run(args: &DemoArgs) -> Result<(), Error> {
    if args.batch == 0 || args.train_images == 0 || args.test_images == 0 {
        return Err("--batch, --train-images and --test-images must be positive".into());
    }
    let dir = data_dir(&args.data)?;
    let train_set = load_mnist_dir(&dir, true)?.take(args.train_images);
    let test = load_mnist_dir(&dir, false)?.take(args.test_images);
    let normalize = train_set.channel_stats();
    println!(
        "Fashion-MNIST from {}: {} training and {} test images; ResNet-20; {} threads",
        dir.display(),
        train_set.len(),
        test.len(),
        rayon::current_num_threads()
    );

    // 1. Full precision.
    let mut fp_ps = ParamStore::new();
    let fp_net = ResNet::cifar(&mut fp_ps, 20, 1, 10, &QuantPolicy::float(), args.seed)?;
    let fp_train_speed = train(
        &fp_net,
        &mut fp_ps,
        &train_set,
        &normalize,
        (args.fp_epochs, 0.05),
        args,
        "FP32",
    )?;
    let recipe = |quant: &str| Recipe {
        model: "resnet20".into(),
        quant: quant.into(),
        bits: args.bits,
        ends: "int8".into(),
        chw: (train_set.c, train_set.h, train_set.w),
        classes: train_set.classes,
        normalize: normalize.clone(),
        step_grad: StepGradScale::default(),
    };
    save(&args.out, "resnet20-fp32.ckpt", &fp_ps, &recipe("fp32"))?;

    // 2. W{bits}A{bits} ASQ+POST from the FP weights (scales initialise on the first batch).
    let policy = QuantPolicy::asq_post(args.bits)?;
    let mut q_ps = ParamStore::new();
    let q_net = ResNet::cifar(&mut q_ps, 20, 1, 10, &policy, args.seed)?;
    for p in fp_ps.params() {
        let id = q_ps
            .find(&p.name)
            .ok_or_else(|| format!("quantized model lacks {}", p.name))?;
        q_ps.get_mut(id).value.assign(&p.value);
    }
    for (name, value) in fp_ps.buffers() {
        if let Some(slot) = q_ps.buffers_mut().iter_mut().find(|(n, _)| n == name) {
            slot.1.assign(value);
        }
    }
    let label = format!("W{0}A{0} QAT", args.bits);
    let q_train_speed = train(
        &q_net,
        &mut q_ps,
        &train_set,
        &normalize,
        (args.qat_epochs, 0.01),
        args,
        &label,
    )?;
    let q_recipe = recipe("asq-post");
    save(
        &args.out,
        &format!("resnet20-asq-post-w{0}a{0}.ckpt", args.bits),
        &q_ps,
        &q_recipe,
    )?;

    // 3. Export and integer inference; compare with the float passes.
    let input = asq_models::engine::InputSpec {
        channels: 1,
        height: 28,
        width: 28,
        mean: normalize.mean.clone(),
        std: normalize.std.clone(),
    };
    let int = q_net.export(&q_ps, input)?;
    let int = {
        let mut spec = int.spec().clone();
        spec.meta = q_recipe.meta();
        asq_models::IntModel::new(spec)?
    };
    if let Some(dir) = &args.out {
        let path = dir.join(format!("resnet20-asq-post-w{0}a{0}.asqm", args.bits));
        int.save(&path)?;
        println!("saved {}", path.display());
    }
    let bs = 64.min(test.len());
    let (fp_acc, fp_speed) = measure(&test, &normalize, bs, |x| {
        let mut g = Graph::new(false);
        let v = g.input(x.clone());
        let y = fp_net.forward(&mut g, &mut fp_ps, v)?;
        Ok(g.value(y).iter().copied().collect())
    })?;
    let (fq_acc, fq_speed) = measure(&test, &normalize, bs, |x| {
        let mut g = Graph::new(false);
        let v = g.input(x.clone());
        let y = q_net.forward(&mut g, &mut q_ps, v)?;
        Ok(g.value(y).iter().copied().collect())
    })?;
    let int_logits = |x: &asq_train::Tensor| -> Result<Vec<f32>, Error> {
        let flat = x.as_slice().ok_or("non-contiguous batch")?;
        Ok(int.forward(flat, x.shape()[0])?)
    };
    let (int_acc, int_speed) = measure(&test, &normalize, bs, int_logits)?;
    let (_, int_b1) = measure(&test.take(200.min(test.len())), &normalize, 1, int_logits)?;
    let (_, fp_b1) = measure(&test.take(200.min(test.len())), &normalize, 1, |x| {
        let mut g = Graph::new(false);
        let v = g.input(x.clone());
        let y = fp_net.forward(&mut g, &mut fp_ps, v)?;
        Ok(g.value(y).iter().copied().collect())
    })?;
    let loss = evaluate(&q_net, &mut q_ps, &test, &normalize, bs)?.0;

    println!();
    println!("| model | engine | test accuracy | inference images/s (batch {bs}) | batch 1 | training images/s |");
    println!("|---|---|---|---|---|---|");
    println!("| ResNet-20 FP32 | float graph | {:.2} % | {fp_speed:.0} | {fp_b1:.0} | {fp_train_speed:.0} |", 100.0 * fp_acc);
    println!(
        "| ResNet-20 {label} | fake-quant graph | {:.2} % | {fq_speed:.0} | | {q_train_speed:.0} |",
        100.0 * fq_acc
    );
    println!(
        "| ResNet-20 {label} | integer engine ({}) | {:.2} % | {int_speed:.0} | {int_b1:.0} | |",
        asq_kernels::Isa::best().name(),
        100.0 * int_acc
    );
    println!();
    println!(
        "fake-quant test loss {loss:.4}; integer vs fake-quant accuracy difference {:+.2} points",
        100.0 * (int_acc - fq_acc)
    );
    Ok(())
}
