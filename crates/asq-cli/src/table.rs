//! `asq table`: the accuracy table of quantization methods x bit widths, trained the way the
//! published tables are (docs/results.md): a full-precision run, then every quantized variant
//! fine-tuned from it. Each run's checkpoint is kept, so an interrupted table resumes where it
//! stopped (finished runs are read back, not retrained), and the markdown table is rewritten
//! (atomically) after every run.

use std::path::PathBuf;
use std::time::Instant;

use asq_train::checkpoint::{atomic_write, Checkpoint};

use crate::common::Error;
use crate::train::{train, TrainArgs};

/// Options of `asq table`.
#[derive(clap::Args)]
pub struct TableArgs {
    /// Directory for the checkpoints and `results.md`.
    #[arg(long, short)]
    out: PathBuf,
    /// Architecture.
    #[arg(long, default_value = "resnet20")]
    model: String,
    /// Body bit widths (rows), comma-separated.
    #[arg(long, default_value = "4,2")]
    bits: String,
    /// Quantization methods (columns), comma-separated.
    #[arg(long, default_value = "lsq,asq,asq-pot,asq-post")]
    methods: String,
    /// Precision of the first conv and the classifier (fp32 as in the published tables).
    #[arg(long, default_value = "fp32")]
    ends: String,
    /// Full-precision epochs.
    #[arg(long, default_value_t = 3)]
    fp_epochs: u64,
    /// Quantization-aware epochs of every variant (from the full-precision weights).
    #[arg(long, default_value_t = 2)]
    qat_epochs: u64,
    /// Learning rate (cosine decay) of every run.
    #[arg(long, default_value_t = 0.01)]
    lr: f32,
    /// Mini-batch size.
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Learning-rate schedule (see `asq train --help`).
    #[arg(long, default_value = "cosine")]
    schedule: String,
    /// Warm-up steps of every run (the reference has none).
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// Which parameters decay: all (the reference) or weights.
    #[arg(long, default_value = "all")]
    decay: String,
    /// Activation-step gradient scale: tensor (the reference) or sample (see `asq train`).
    #[arg(long, default_value = "tensor")]
    step_grad: String,
    /// Initialisation of the full-precision run: torch (the reference) or he.
    #[arg(long, default_value = "torch")]
    init: String,
    /// Training images (default all).
    #[arg(long)]
    train_images: Option<usize>,
    /// Test images (default all).
    #[arg(long, default_value_t = 10_000)]
    test_images: usize,
    /// Data directory: MNIST-layout IDX files (Fashion-MNIST) or CIFAR-10 binary batches
    /// (default: the Debian package's Fashion-MNIST, else the shipped subset).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn list<T: std::str::FromStr>(s: &str, what: &str) -> Result<Vec<T>, Error> {
    s.split(',')
        .map(|v| {
            v.trim()
                .parse()
                .map_err(|_| format!("--{what}: cannot read {v:?}").into())
        })
        .collect()
}

/// A number recorded in a finished run's checkpoint (`test_accuracy`, `train_seconds`).
fn recorded(path: &std::path::Path, key: &str) -> Option<f64> {
    Checkpoint::load(path).ok()?.meta.get(key)?.parse().ok()
}

/// Test accuracy recorded in a finished run's checkpoint.
fn accuracy(path: &std::path::Path) -> Option<f64> {
    recorded(path, "test_accuracy")
}

/// `asq table`.
pub fn table(args: &TableArgs) -> Result<(), Error> {
    let bits: Vec<u32> = list(&args.bits, "bits")?;
    let methods: Vec<String> = list(&args.methods, "methods")?;
    if bits.is_empty() || methods.is_empty() {
        return Err("--bits and --methods need at least one entry".into());
    }
    for &b in &bits {
        for m in &methods {
            asq_models::QuantPolicy::named(m, b)?;
        }
    }
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let run = |quant: &str, b: u32, epochs: u64, init: Option<PathBuf>, out: PathBuf| {
        train(&TrainArgs {
            out,
            model: args.model.clone(),
            quant: quant.into(),
            bits: (quant != "fp32").then_some(b),
            ends: args.ends.clone(),
            epochs,
            lr: args.lr,
            batch: args.batch,
            optimizer: "sgd".into(),
            schedule: args.schedule.clone(),
            warmup: args.warmup,
            weight_decay: 1e-4,
            decay: args.decay.clone(),
            step_grad: args.step_grad.clone(),
            drop_last: true,
            train_images: args.train_images,
            test_images: args.test_images,
            data: args.data.clone(),
            init: Some(init.unwrap_or_else(|| PathBuf::from(&args.init))),
            resume: false,
            // Unfinished runs (no recorded accuracy) are redone.
            force: true,
            seed: args.seed,
            plot: None,
        })
    };
    let t = Instant::now();
    let fp = args.out.join(format!("{}-fp32.ckpt", args.model));
    if accuracy(&fp).is_none() {
        run("fp32", 32, args.fp_epochs, None, fp.clone())?;
    }
    let fp_acc = accuracy(&fp).ok_or("the full-precision run recorded no accuracy")?;
    let mut cells = vec![vec![None; methods.len()]; bits.len()];
    let mut minutes = vec![vec![None; methods.len()]; bits.len()];
    let fp_minutes = recorded(&fp, "train_seconds").map(|s| s / 60.0);
    let command: Vec<String> = std::env::args().collect();
    let write = |cells: &[Vec<Option<f64>>], minutes: &[Vec<Option<f64>>]| -> Result<(), Error> {
        let pct = |a: Option<f64>| a.map_or("…".to_string(), |a| format!("{:.2}", 100.0 * a));
        let mut md = format!(
            "# {} on Fashion-MNIST: test accuracy (%)\n\n\
             Written by `asq table`: full precision {} epochs ({} initialisation), then each variant \
             {} epochs from it; SGD (momentum 0.9, weight decay 1e-4 on {} parameters), lr {} with \
             {} decay ({} warm-up steps), batch {} (last partial batch dropped), random crop (pad 2) \
             + flip, first/last layers {}, activation-step gradient scale over the {}, seed {}; {} \
             training images, {} test images.\n\n\
             | W/A | {} |\n|---|{}\n| FP32 | {}{} |\n",
            args.model,
            args.fp_epochs,
            args.init,
            args.qat_epochs,
            args.decay,
            args.lr,
            args.schedule,
            args.warmup,
            args.batch,
            args.ends,
            args.step_grad,
            args.seed,
            args.train_images.map_or("all".to_string(), |n| n.to_string()),
            args.test_images,
            methods.join(" | "),
            "---|".repeat(methods.len()),
            pct(Some(fp_acc)),
            " |".repeat(methods.len() - 1),
        );
        for (b, row) in bits.iter().zip(cells) {
            let row: Vec<String> = row.iter().map(|a| pct(*a)).collect();
            md.push_str(&format!("| {b}/{b} | {} |\n", row.join(" | ")));
        }
        let mins = |m: Option<f64>| m.map_or("…".to_string(), |m| format!("{m:.0}"));
        md.push_str(&format!(
            "\nTraining wall time per cell (minutes; FP32 run {}):\n\n| W/A | {} |\n|---|{}\n",
            mins(fp_minutes),
            methods.join(" | "),
            "---|".repeat(methods.len()),
        ));
        for (b, row) in bits.iter().zip(minutes) {
            let row: Vec<String> = row.iter().map(|m| mins(*m)).collect();
            md.push_str(&format!("| {b}/{b} | {} |\n", row.join(" | ")));
        }
        md.push_str(&format!(
            "\nCommand: `asq {}`; {} worker threads.\n",
            command.get(1..).unwrap_or_default().join(" "),
            rayon::current_num_threads()
        ));
        atomic_write(&args.out.join("results.md"), md.as_bytes())?;
        println!("\n{md}");
        Ok(())
    };
    for (i, &b) in bits.iter().enumerate() {
        for (j, m) in methods.iter().enumerate() {
            let path = args.out.join(format!("{}-{m}-w{b}a{b}.ckpt", args.model));
            if accuracy(&path).is_none() {
                run(m, b, args.qat_epochs, Some(fp.clone()), path.clone())?;
            }
            cells[i][j] = accuracy(&path);
            minutes[i][j] = recorded(&path, "train_seconds").map(|s| s / 60.0);
            write(&cells, &minutes)?;
        }
    }
    println!(
        "table done in {:.0} s; results in {}",
        t.elapsed().as_secs_f64(),
        args.out.join("results.md").display()
    );
    Ok(())
}
