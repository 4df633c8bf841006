//! `asq train`: builds a zoo model with a quantization policy, optionally starts from the
//! weights of another checkpoint (full precision -> QAT) or resumes its own, trains on
//! Fashion-MNIST and writes a checkpoint whose metadata records how to rebuild the model.

use std::path::{Path, PathBuf};
use std::time::Instant;

use asq_models::policy::POLICY_NAMES;
use asq_models::zoo::ARCH_NAMES;
use asq_models::QuantPolicy;
use asq_train::checkpoint::{Checkpoint, TrainState};
use asq_train::data::Augment;
use asq_train::nn::{Init, InitScheme, StepGradScale};
use asq_train::optim::{LrSchedule, LrShape, Optimizer, OptimizerConfig, ParamGroups};
use asq_train::train::{evaluate, fit, TrainConfig};
use asq_train::ParamStore;

use crate::common::{check_output, Bar, Error};
use crate::plot;
use crate::recipe::{init_from, load_split, Recipe};

/// Options of `asq train`.
#[derive(clap::Args)]
pub struct TrainArgs {
    /// Checkpoint to write (atomically; with --resume, also the one to continue).
    #[arg(long, short)]
    pub(crate) out: PathBuf,
    /// Architecture.
    #[arg(long, default_value = "lenet5", help = format!("Architecture: {ARCH_NAMES}"))]
    pub(crate) model: String,
    /// Quantization of the body (first and last layers stay 8-bit LSQ).
    #[arg(long, default_value = "fp32", help = format!("Quantization: {POLICY_NAMES}"))]
    pub(crate) quant: String,
    /// Bit width of the quantized body, weights and activations (default 4; an error with
    /// --quant fp32, which has none).
    #[arg(long)]
    pub(crate) bits: Option<u32>,
    /// Precision of the first conv and the classifier: int8 (8-bit LSQ, exportable) or fp32
    /// (the protocol of published accuracy tables; not exportable).
    #[arg(long, default_value = "int8")]
    pub(crate) ends: String,
    /// Epochs (with --resume: the total, counting those already done).
    #[arg(long, default_value_t = 3)]
    pub(crate) epochs: u64,
    /// Peak learning rate (cosine decay, after --warmup steps).
    #[arg(long, default_value_t = 0.05)]
    pub(crate) lr: f32,
    /// Steps of linear learning-rate warm-up before the decay (0: none, as PyTorch's
    /// CosineAnnealingLR).
    #[arg(long, default_value_t = 0)]
    pub(crate) warmup: u64,
    /// Mini-batch size.
    #[arg(long, default_value_t = 64)]
    pub(crate) batch: usize,
    /// Learning-rate schedule: cosine (per step to 0 over all steps: PyTorch's CosineAnnealingLR
    /// with T_max = all steps, stepped after every batch) or cosine-epoch (constant within an
    /// epoch: CosineAnnealingLR with T_max = epochs, stepped per epoch).
    #[arg(long, default_value = "cosine")]
    pub(crate) schedule: String,
    /// Optimizer: sgd (momentum 0.9) or adamw.
    #[arg(long, default_value = "sgd")]
    pub(crate) optimizer: String,
    /// Weight decay (L2 for SGD, decoupled for AdamW), on the parameters --decay names.
    #[arg(long, default_value_t = 1e-4)]
    pub(crate) weight_decay: f32,
    /// Which parameters decay: all (PyTorch's optimizers given model.parameters()) or weights
    /// (conv/linear weights only; not biases, norms, step sizes, alphas or adapters).
    #[arg(long, default_value = "all")]
    pub(crate) decay: String,
    /// The element count N of an activation step's gradient scale 1/sqrt(N p): tensor (every
    /// element of the batch: the LSQ/ASQ reference implementations) or sample (one sample's).
    #[arg(long, default_value = "tensor")]
    pub(crate) step_grad: String,
    /// Drop the last, incomplete batch of every epoch (as the reference protocol does).
    #[arg(long)]
    pub(crate) drop_last: bool,
    /// Training images used (the first N; default all).
    #[arg(long)]
    pub(crate) train_images: Option<usize>,
    /// Test images evaluated after training (0: none).
    #[arg(long, default_value_t = 2000)]
    pub(crate) test_images: usize,
    /// Data directory: MNIST-layout IDX files (Fashion-MNIST) or CIFAR-10 binary batches
    /// (default: the Debian package's Fashion-MNIST, else the shipped subset).
    #[arg(long)]
    pub(crate) data: Option<PathBuf>,
    /// Initialisation: torch (PyTorch's default for conv and linear layers: U(+-1/sqrt(fan_in))
    /// weights and biases; the default), he (He normal weights, zero biases), or a checkpoint
    /// FILE to start from (same architecture; quantizer scales start from the first batch when
    /// it has none), e.g. a full-precision run before QAT.
    #[arg(long, value_name = "torch|he|FILE")]
    pub(crate) init: Option<PathBuf>,
    /// Continue the run saved at --out (same model, quantization and data).
    #[arg(long)]
    pub(crate) resume: bool,
    /// Replace an existing --out (otherwise an existing file is an error: nothing is lost).
    #[arg(long)]
    pub(crate) force: bool,
    /// Seed of initialisation, data order and augmentation.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// Also write the training curves (loss and accuracy per batch) to this SVG file.
    #[arg(long)]
    pub(crate) plot: Option<PathBuf>,
}

/// `asq train`.
pub fn train(args: &TrainArgs) -> Result<(), Error> {
    if args.batch == 0 {
        return Err("--batch must be positive".into());
    }
    if !(args.lr.is_finite() && args.lr > 0.0) {
        return Err(format!("--lr {} must be a positive number", args.lr).into());
    }
    check_output(&args.out)?;
    if let Some(p) = &args.plot {
        check_output(p)?;
    }
    if args.out.exists() && !args.resume && !args.force {
        return Err(format!(
            "{} exists: pass --resume to continue it or --force to replace it",
            args.out.display()
        )
        .into());
    }
    if args.quant == "fp32" {
        if let Some(b) = args.bits {
            return Err(format!(
                "--bits {b} does not apply to --quant fp32 (full precision); pick a quantization, e.g. --quant asq-post"
            )
            .into());
        }
    }
    let bits = args.bits.unwrap_or(4);
    // Unknown names and widths fail here, before the data is read.
    QuantPolicy::named(&args.quant, bits)?;
    let train_set = load_split(&args.data, true, args.train_images)?;
    let recipe = Recipe {
        model: args.model.clone(),
        quant: args.quant.clone(),
        bits,
        ends: args.ends.clone(),
        chw: (train_set.c, train_set.h, train_set.w),
        classes: train_set.classes,
        normalize: train_set.channel_stats(),
        step_grad: StepGradScale::parse(&args.step_grad)?,
    };
    let (scheme, init_file) = match args.init.as_deref().and_then(Path::to_str) {
        None => (InitScheme::default(), None),
        Some(name @ ("torch" | "he")) => (InitScheme::parse(name)?, None),
        Some(_) => (InitScheme::default(), args.init.as_deref()),
    };
    let groups = match args.decay.as_str() {
        "all" => ParamGroups::all(args.weight_decay),
        "weights" => ParamGroups::new(args.weight_decay),
        d => return Err(format!("unknown --decay {d:?} (all or weights)").into()),
    };
    if !(args.weight_decay.is_finite() && args.weight_decay >= 0.0) {
        return Err(format!("--weight-decay {} must be >= 0", args.weight_decay).into());
    }
    let mut ps = ParamStore::new();
    let net = recipe.build(&mut ps, Init::new(args.seed, scheme))?;
    let opt_config = match args.optimizer.as_str() {
        "sgd" => OptimizerConfig::Sgd {
            momentum: 0.9,
            nesterov: false,
        },
        "adamw" => OptimizerConfig::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
        o => return Err(format!("unknown optimizer {o:?} (sgd or adamw)").into()),
    };
    let mut opt = Optimizer::new(opt_config, groups)?;
    let mut state = TrainState {
        seed: args.seed,
        ..Default::default()
    };
    if args.resume {
        let ckpt = Checkpoint::load(&args.out)?;
        let saved = Recipe::from_meta(&ckpt.meta, &args.out)?;
        if saved.meta() != recipe.meta() {
            return Err(format!(
                "{}: saved run is {} on {}x{}x{} images; this command asks for {} on {}x{}x{} (or different training data)",
                args.out.display(),
                saved.label(),
                saved.chw.0,
                saved.chw.1,
                saved.chw.2,
                recipe.label(),
                recipe.chw.0,
                recipe.chw.1,
                recipe.chw.2,
            )
            .into());
        }
        ckpt.restore(&mut ps)?;
        if let Some(o) = ckpt.optimizer {
            opt = o;
        }
        state = ckpt.state;
        println!(
            "resuming {} at epoch {} batch {}",
            args.out.display(),
            state.epoch + 1,
            state.batch
        );
    } else if let Some(init) = init_file {
        let src = Checkpoint::load(init)?;
        // A checkpoint of the same quantization (a calibrated or QAT model) keeps its
        // quantizers; any other (a float model, other bits) lets them calibrate anew.
        let same = Recipe::from_meta(&src.meta, init).is_ok_and(|r| {
            (r.quant.as_str(), r.bits, r.ends.as_str())
                == (recipe.quant.as_str(), recipe.bits, recipe.ends.as_str())
        });
        let n = init_from(&mut ps, &src, same);
        if n == 0 {
            return Err(format!(
                "{}: no tensor matches {} (different architecture?)",
                init.display(),
                recipe.label()
            )
            .into());
        }
        println!("initialised {n} tensors from {}", init.display());
    }
    let per_epoch = if args.drop_last {
        train_set.len() / args.batch
    } else {
        train_set.len().div_ceil(args.batch)
    } as u64;
    if per_epoch == 0 {
        return Err(format!(
            "--drop-last with {} images leaves no batch of {}",
            train_set.len(),
            args.batch
        )
        .into());
    }
    let total = per_epoch * args.epochs;
    if args.warmup >= total {
        return Err(format!(
            "--warmup {} must be shorter than the run ({total} steps)",
            args.warmup
        )
        .into());
    }
    let schedule = match args.schedule.as_str() {
        "cosine" => LrSchedule {
            base: args.lr,
            warmup: args.warmup,
            shape: LrShape::Cosine {
                total: total - args.warmup,
                min: 0.0,
            },
        },
        "cosine-epoch" => LrSchedule {
            base: args.lr,
            warmup: args.warmup,
            shape: LrShape::CosineEpochs {
                per_epoch,
                epochs: args.epochs,
                min: 0.0,
            },
        },
        o => return Err(format!("unknown --schedule {o:?} (cosine or cosine-epoch)").into()),
    };
    let cfg = TrainConfig {
        epochs: args.epochs,
        batch_size: args.batch,
        max_batches: None,
        drop_last: args.drop_last,
        schedule,
        label_smoothing: 0.0,
        augment: Augment {
            crop_pad: 2,
            hflip: true,
        },
        normalize: recipe.normalize.clone(),
    };
    println!(
        "training {} on {} images ({} epochs, batch {}, {} threads)",
        recipe.label(),
        train_set.len(),
        args.epochs,
        args.batch,
        rayon::current_num_threads()
    );
    let done = state.epoch * per_epoch + state.batch;
    let mut bar = Bar::new((per_epoch * args.epochs).max(done), &recipe.model);
    bar.0.set_position(done);
    let t = Instant::now();
    let stats = fit(
        &net, &mut ps, &mut opt, &train_set, &cfg, &mut state, &mut bar,
    )?;
    bar.0.finish();
    let images: usize = stats.iter().map(|s| s.images).sum();
    println!();
    println!("| epoch | loss | train accuracy | images/s |");
    println!("|---|---|---|---|");
    for s in &stats {
        println!(
            "| {} | {:.4} | {:.2} % | {:.0} |",
            s.epoch + 1,
            s.loss,
            100.0 * s.accuracy,
            s.images as f64 / s.seconds
        );
    }
    let mut meta = recipe.meta();
    meta.insert(
        "train_seconds".into(),
        format!("{:.0}", t.elapsed().as_secs_f64()),
    );
    if args.test_images > 0 {
        let test = load_split(&args.data, false, Some(args.test_images))?;
        let (loss, acc) = evaluate(&net, &mut ps, &test, &recipe.normalize, args.batch)?;
        println!(
            "test: {} images, loss {loss:.4}, accuracy {:.2} %",
            test.len(),
            100.0 * acc
        );
        meta.insert("test_accuracy".into(), format!("{acc:.4}"));
    }
    Checkpoint::capture(&ps, Some(&opt), state, meta).save(&args.out)?;
    if let Some(path) = &args.plot {
        let first = done as f64;
        let curve = |f: fn(&(f64, f64)) -> f64| -> Vec<(f64, f64)> {
            bar.1
                .iter()
                .enumerate()
                .map(|(i, b)| (first + i as f64, f(b)))
                .collect()
        };
        let smoothed = |pts: Vec<(f64, f64)>| -> Vec<(f64, f64)> {
            let ys: Vec<f64> = pts.iter().map(|p| p.1).collect();
            pts.iter()
                .zip(plot::smooth(
                    &ys,
                    (20.0 / ys.len().max(1) as f64).clamp(0.02, 0.5),
                ))
                .map(|(p, y)| (p.0, y))
                .collect()
        };
        let (loss, acc) = (curve(|b| b.0), curve(|b| 100.0 * b.1));
        let chart = |title: &str, y: &str, pts: Vec<(f64, f64)>| plot::Chart {
            title: format!("{}: {title}", recipe.label()),
            x_label: "optimizer step".into(),
            y_label: y.into(),
            series: vec![
                plot::Series {
                    name: "per batch".into(),
                    color: "#aec7e8",
                    points: pts.clone(),
                },
                plot::Series {
                    name: "moving average".into(),
                    color: "#1f77b4",
                    points: smoothed(pts),
                },
            ],
        };
        let doc = plot::svg(&[
            chart("training loss", "loss", loss),
            chart("training accuracy", "accuracy (%)", acc),
        ]);
        asq_train::checkpoint::atomic_write(path, doc.as_bytes())?;
        println!("curves in {}", path.display());
    }
    println!(
        "saved {} ({:.0} training images/s)",
        args.out.display(),
        images as f64 / t.elapsed().as_secs_f64()
    );
    Ok(())
}
