//! `asq bench kernels`: every integer path and f32 sgemm measured in the same process, on GEMM
//! shapes of real layers, with the machine's peaks, as a table or JSON.

use std::time::{Duration, Instant};

use asq_kernels::probe::{peak_f32, peak_int8};
use asq_kernels::suite::{pseudo, KERNELS, SHAPES};
use asq_kernels::{describe, gemm, Epilogue, Isa};
use asq_train::ops::conv::{conv_precision, with_conv_precision};

/// Options of `asq bench kernels`.
#[derive(clap::Args)]
pub struct KernelArgs {
    /// Print one JSON list (one object per kernel, shape and thread count) instead of a table.
    #[arg(long)]
    json: bool,
    /// Thread counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Seconds spent measuring each (kernel, shape, threads); the whole run scales with it.
    #[arg(long, default_value_t = 0.12)]
    seconds: f64,
    /// Only kernels whose name contains this text (e.g. `post-w4`).
    #[arg(long)]
    kernel: Option<String>,
    /// Only shapes whose name contains this text (e.g. `fc-256`, `resnet20`).
    #[arg(long)]
    shape: Option<String>,
}

/// Best rate (ops/s / 1e9) of `f` over about `seconds`.
fn measure(ops: f64, seconds: f64, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let mut best = f64::INFINITY;
    let mut runs = 0;
    while runs < 3 || (start.elapsed().as_secs_f64() < seconds && runs < 10_000) {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
        runs += 1;
    }
    ops / best / 1e9
}

/// f32 sgemm of the same shape, columns split across the pool's threads.
fn sgemm_gops(m: usize, k: usize, n: usize, seconds: f64) -> f64 {
    let a: Vec<f32> = (0..m * k).map(|i| pseudo(1, i)).collect();
    let b: Vec<f32> = (0..k * n).map(|i| pseudo(2, i)).collect();
    let mut c = vec![0.0f32; m * n];
    measure(2.0 * (m * k * n) as f64, seconds, || {
        asq_kernels::baseline::sgemm_parallel(m, k, n, &a, &b, &mut c).expect("consistent shapes");
    })
}

struct Row {
    shape: &'static str,
    kernel: String,
    path: String,
    m: usize,
    k: usize,
    n: usize,
    threads: usize,
    gops: f64,
    sgemm: f64,
}

pub fn kernels(args: &KernelArgs) -> Result<(), Box<dyn std::error::Error>> {
    if args.threads.contains(&0) {
        return Err("--threads takes positive counts".into());
    }
    let f32_peak = peak_f32(0.2);
    let i8_peak = peak_int8(0.2);
    let mut rows = Vec::new();
    for &threads in &args.threads {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()?;
        pool.install(|| -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
            let wanted = |filter: &Option<String>, name: &str| {
                filter.as_ref().is_none_or(|f| name.contains(f.as_str()))
            };
            for &(shape, m, k, n) in SHAPES.iter().filter(|s| wanted(&args.shape, s.0)) {
                let sgemm = sgemm_gops(m, k, n, args.seconds);
                for case in KERNELS.iter().filter(|c| wanted(&args.kernel, c.name)) {
                    let w = case.weights(n, k)?;
                    let a = case.activations(m, k)?;
                    let mut out = vec![0.0f32; m * n];
                    let epi = Epilogue::default();
                    let gops = measure(2.0 * (m * k * n) as f64, args.seconds, || {
                        gemm(&a, &w, &epi, &mut out).expect("checked shapes");
                    });
                    let path = describe(Isa::best(), &a, &w)?;
                    rows.push(Row {
                        shape,
                        kernel: case.name.into(),
                        path,
                        m,
                        k,
                        n,
                        threads,
                        gops,
                        sgemm,
                    });
                }
                if !args.json {
                    eprint!(".");
                }
            }
            Ok(())
        })
        .map_err(|e| e.to_string())?;
    }
    if !args.json {
        eprintln!();
    }
    let isa = Isa::best().name();
    if args.json {
        println!("[");
        println!(
            "  {{\"kernel\": \"{}\", \"gops\": {:.1}, \"isa\": \"{isa}\"}},",
            f32_peak.name, f32_peak.gops
        );
        if let Some(p) = i8_peak {
            println!(
                "  {{\"kernel\": \"{}\", \"gops\": {:.1}, \"isa\": \"{isa}\"}},",
                p.name, p.gops
            );
        }
        for (i, r) in rows.iter().enumerate() {
            let sep = if i + 1 < rows.len() { "," } else { "" };
            println!(
                "  {{\"kernel\": \"{}\", \"shape\": \"{}\", \"path\": \"{}\", \"m\": {}, \"k\": {}, \"n\": {}, \"threads\": {}, \"gops\": {:.2}, \"sgemm_gops\": {:.2}, \"ratio_vs_sgemm\": {:.3}}}{sep}",
                r.kernel, r.shape, r.path, r.m, r.k, r.n, r.threads, r.gops, r.sgemm, r.gops / r.sgemm
            );
        }
        println!("]");
    } else {
        println!(
            "variant: {isa}; {} {:.1} GOP/s",
            f32_peak.name, f32_peak.gops
        );
        if let Some(p) = i8_peak {
            println!("{} {:.1} GOP/s", p.name, p.gops);
        }
        println!(
            "{:<16} {:<20} {:<22} {:>6} {:>5} {:>5} {:>3} {:>9} {:>9} {:>7}",
            "kernel", "shape", "path", "M", "K", "N", "thr", "GOP/s", "sgemm", "ratio"
        );
        for r in &rows {
            println!(
                "{:<16} {:<20} {:<22} {:>6} {:>5} {:>5} {:>3} {:>9.1} {:>9.1} {:>7.2}",
                r.kernel,
                r.shape,
                r.path,
                r.m,
                r.k,
                r.n,
                r.threads,
                r.gops,
                r.sgemm,
                r.gops / r.sgemm
            );
        }
    }
    Ok(())
}

/// Options of `asq bench models`.
#[derive(clap::Args)]
pub struct ModelArgs {
    /// Architectures, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "lenet5,resnet20,mobilenetv2-cifar-0.5"
    )]
    models: Vec<String>,
    /// Quantization of the integer model (any `--quant` of `asq train`).
    #[arg(long, default_value = "asq-post64")]
    quant: String,
    /// Body bit width.
    #[arg(long, default_value_t = 4)]
    bits: u32,
    /// Batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    batches: Vec<usize>,
    /// Thread counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    threads: Vec<usize>,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Print one JSON object per line (fields model, quant, bits, batch, threads, engine, isa,
    /// images_per_s) instead of a table.
    #[arg(long)]
    json: bool,
    /// Also print where the integer engine's time goes, node by node (first batch size, one
    /// thread): quantizing, im2col, kernel + epilogue.
    #[arg(long)]
    profile: bool,
}

/// `asq bench models`: images/s of each zoo model on the integer engine against the same
/// architecture's FP32 graph, measured in the same process (1x28x28 inputs, random weights
/// with scales and batch-norm statistics set by one training-mode pass: speed does not depend
/// on training).
pub fn models(args: &ModelArgs) -> Result<(), Box<dyn std::error::Error>> {
    use asq_models::engine::InputSpec;
    use asq_models::{Model, QuantPolicy};
    use asq_train::nn::Module;
    use asq_train::{Graph, ParamStore, Rng, Tensor};
    if args.threads.is_empty()
        || args.threads.contains(&0)
        || args.batches.contains(&0)
        || args.seconds.is_nan()
        || args.seconds <= 0.0
    {
        return Err("--threads, --batches and --seconds must be positive".into());
    }
    let isa = Isa::best().name();
    if !args.json {
        println!(
            "| model | batch | threads | FP32 graph images/s | integer engine ({isa}) images/s | ratio |"
        );
        println!("|---|---|---|---|---|---|");
    }
    let chw = (1, 28, 28);
    for arch in &args.models {
        let mut fps = ParamStore::new();
        let fnet = Model::build(arch, &mut fps, chw, 10, &QuantPolicy::float(), 1)?;
        let mut qps = ParamStore::new();
        let policy = QuantPolicy::named(&args.quant, args.bits)?;
        let qnet = Model::build(arch, &mut qps, chw, 10, &policy, 1)?;
        let mut rng = Rng::new(2);
        let warm = Tensor::from_shape_fn(ndarray::IxDyn(&[8, 1, 28, 28]), |_| rng.normal());
        let mut g = Graph::new(true);
        let x = g.input(warm);
        qnet.forward(&mut g, &mut qps, x)?;
        drop(g);
        let input = InputSpec {
            channels: 1,
            height: 28,
            width: 28,
            mean: vec![0.0],
            std: vec![1.0],
        };
        let int = qnet.export(&qps, arch, input)?;
        for &batch in &args.batches {
            let images =
                Tensor::from_shape_fn(ndarray::IxDyn(&[batch, 1, 28, 28]), |_| rng.normal());
            let flat = images.as_slice().ok_or("contiguous")?.to_vec();
            for &threads in &args.threads {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()?;
                // The pool's threads record the float graph's convolutions: at this thread's
                // precision.
                let precision = conv_precision();
                let rate = |f: &mut (dyn FnMut() + Send)| {
                    pool.install(|| {
                        with_conv_precision(precision, || {
                            measure(batch as f64 * 1e9, args.seconds, &mut *f)
                        })
                    })
                };
                let fp = rate(&mut || {
                    let mut g = Graph::new(false);
                    let x = g.input(images.clone());
                    std::hint::black_box(fnet.forward(&mut g, &mut fps, x).expect("valid model"));
                });
                let q = rate(&mut || {
                    std::hint::black_box(int.forward(&flat, batch).expect("valid model"));
                });
                if args.json {
                    for (engine, v) in [("fp32", fp), ("int", q)] {
                        println!(
                            "{{\"model\": \"{arch}\", \"quant\": \"{}\", \"bits\": {}, \"batch\": {batch}, \"threads\": {threads}, \"engine\": \"{engine}\", \"isa\": \"{}\", \"images_per_s\": {v:.1}}}",
                            if engine == "fp32" { "fp32" } else { &args.quant },
                            if engine == "fp32" { 32 } else { args.bits },
                            if engine == "fp32" { "matrixmultiply" } else { isa },
                        );
                    }
                } else {
                    println!(
                        "| {arch} | {batch} | {threads} | {fp:.0} | {q:.0} | {:.2} |",
                        q / fp
                    );
                }
            }
        }
        if args.profile {
            let batch = args.batches[0];
            let images =
                Tensor::from_shape_fn(ndarray::IxDyn(&[batch, 1, 28, 28]), |_| rng.normal());
            let flat = images.as_slice().ok_or("contiguous")?.to_vec();
            let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
            // The best of several passes, node by node.
            let mut best: Option<Vec<asq_models::engine::NodeTime>> = None;
            for _ in 0..20 {
                let (_, t) = pool.install(|| int.profile(&flat, batch))?;
                best = Some(match best {
                    None => t,
                    Some(b) => b
                        .into_iter()
                        .zip(t)
                        .map(|(a, b)| asq_models::engine::NodeTime {
                            op: a.op,
                            quantize: a.quantize.min(b.quantize),
                            im2col: a.im2col.min(b.im2col),
                            kernel: a.kernel.min(b.kernel),
                        })
                        .collect(),
                });
            }
            let nodes = best.unwrap_or_default();
            let total: f64 = nodes.iter().map(|t| t.quantize + t.im2col + t.kernel).sum();
            println!(
                "\n{arch}, batch {batch}, one thread: integer engine time by node (best of 20 passes; µs)\n"
            );
            println!("| node | op | quantize | im2col | kernel + epilogue | share |");
            println!("|---|---|---|---|---|---|");
            let us = |s: f64| format!("{:.1}", s * 1e6);
            let (mut q, mut c, mut k) = (0.0, 0.0, 0.0);
            for (i, t) in nodes.iter().enumerate() {
                let sum = t.quantize + t.im2col + t.kernel;
                println!(
                    "| {i} | {} | {} | {} | {} | {:.1} % |",
                    t.op,
                    us(t.quantize),
                    us(t.im2col),
                    us(t.kernel),
                    100.0 * sum / total.max(1e-12)
                );
                (q, c, k) = (q + t.quantize, c + t.im2col, k + t.kernel);
            }
            println!(
                "| all | | {} ({:.0} %) | {} ({:.0} %) | {} ({:.0} %) | 100 % |",
                us(q),
                100.0 * q / total,
                us(c),
                100.0 * c / total,
                us(k),
                100.0 * k / total
            );
        }
    }
    Ok(())
}

/// The table of `asq bench train --profile`: milliseconds per step by op kind, and the rest
/// of the step (optimizer update, loss, zeroing of gradients) as "outside the tape".
fn print_train_profile(ops: &[asq_train::graph::OpTime], elapsed: Duration, steps: usize) {
    let per_step = |d: Duration| d.as_secs_f64() * 1e3 / steps as f64;
    let step = per_step(elapsed);
    println!("| op | calls/step | forward ms | backward ms | share of the step |");
    println!("|---|---|---|---|---|");
    let mut taped = 0.0;
    for t in ops {
        let (f, b) = (per_step(t.forward), per_step(t.backward));
        taped += f + b;
        println!(
            "| {} | {} | {f:.2} | {b:.2} | {:.1} % |",
            t.op,
            t.calls / steps as u64,
            100.0 * (f + b) / step
        );
    }
    let rest = (step - taped).max(0.0);
    println!(
        "| outside the tape | | | | {:.1} % ({rest:.2} ms) |",
        100.0 * rest / step
    );
    println!("| step | | | | {step:.2} ms |");
}

/// The direct convolution kernels' share of a profiled training step: thread time per step and
/// rate per thread on each shape (multiply-adds computed, thrown-away grid positions included),
/// to set against the kernels' rates in cache (docs/training.md).
fn print_kernel_profile(kernels: &[asq_train::graph::KernelTime], steps: usize) {
    if kernels.is_empty() {
        return;
    }
    println!();
    println!(
        "| kernel | input ch | output ch | positions | taps | calls/step | thread ms/step | GFLOP/s per thread |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for k in kernels {
        let secs = k.time.as_secs_f64();
        let rate = if secs > 0.0 {
            k.flops_per_call() * k.calls as f64 / secs / 1e9
        } else {
            0.0
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.2} | {rate:.1} |",
            k.kernel,
            k.ci,
            k.co,
            k.positions,
            k.taps,
            k.calls / steps as u64,
            secs * 1e3 / steps as f64
        );
    }
}

/// Options of `asq bench train`.
#[derive(clap::Args)]
pub struct TrainBenchArgs {
    /// Architecture.
    #[arg(long, default_value = "resnet20")]
    model: String,
    /// Quantizations, comma-separated (any `--quant` of `asq train`).
    #[arg(long, value_delimiter = ',', default_value = "fp32,lsq,asq-post")]
    quant: Vec<String>,
    /// Body bit width of the quantized variants.
    #[arg(long, default_value_t = 4)]
    bits: u32,
    /// Images per step.
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Thread counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2")]
    threads: Vec<usize>,
    /// Timed steps per measurement (after 3 untimed ones); the median is reported.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Print one JSON object per line (model, quant, bits, batch, threads,
    /// conv_precision, images_per_s).
    #[arg(long)]
    json: bool,
    /// Also print where a step's time goes: forward and backward time per op kind, averaged
    /// over the timed steps (measured in extra profiled steps after the timed ones), and the
    /// direct convolution kernels' thread time and GFLOP/s per thread on each shape.
    #[arg(long)]
    profile: bool,
}

/// `asq bench train`: training throughput, the step of the criterion bench `train` (forward,
/// backward, SGD update) on random 1x28x28 images, first and last layers in full precision as
/// in the reference protocol; the median step time of `--steps` steps.
pub fn train(args: &TrainBenchArgs) -> Result<(), Box<dyn std::error::Error>> {
    use asq_models::{Model, QuantPolicy};
    use asq_train::optim::{Optimizer, OptimizerConfig, ParamGroups};
    use asq_train::train::train_step;
    use asq_train::{ParamStore, Rng, Tensor};
    if args.batch == 0 || args.steps == 0 || args.threads.is_empty() || args.threads.contains(&0) {
        return Err("--batch, --steps and --threads must be positive".into());
    }
    let mut rng = Rng::new(1);
    let images = Tensor::from_shape_fn(ndarray::IxDyn(&[args.batch, 1, 28, 28]), |_| rng.normal());
    let labels: Vec<usize> = (0..args.batch).map(|i| i % 10).collect();
    if !args.json {
        println!("| model | quant | batch | threads | images/s |");
        println!("|---|---|---|---|---|");
    }
    for quant in &args.quant {
        let policy = if quant == "fp32" {
            QuantPolicy::float()
        } else {
            QuantPolicy::named(quant, args.bits)?.float_ends()
        };
        for &threads in &args.threads {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()?;
            let mut ps = ParamStore::new();
            let net = Model::build(&args.model, &mut ps, (1, 28, 28), 10, &policy, 1u64)?;
            let mut opt = Optimizer::new(
                OptimizerConfig::Sgd {
                    momentum: 0.9,
                    nesterov: false,
                },
                ParamGroups::all(1e-4),
            )?;
            let mut times = Vec::with_capacity(args.steps);
            // The step runs on the pool's threads: at this thread's convolution precision.
            let precision = conv_precision();
            pool.install(|| {
                with_conv_precision(precision, || -> asq_train::Result<()> {
                    for i in 0..args.steps + 3 {
                        let t = Instant::now();
                        train_step(&net, &mut ps, &mut opt, images.clone(), &labels, 0.0, 0.01)?;
                        if i >= 3 {
                            times.push(t.elapsed().as_secs_f64());
                        }
                    }
                    if args.profile {
                        asq_train::graph::set_profiling(true);
                        let t = Instant::now();
                        for _ in 0..args.steps {
                            train_step(
                                &net,
                                &mut ps,
                                &mut opt,
                                images.clone(),
                                &labels,
                                0.0,
                                0.01,
                            )?;
                        }
                        let elapsed = t.elapsed();
                        asq_train::graph::set_profiling(false);
                        let ops = asq_train::graph::take_profile();
                        print_train_profile(&ops, elapsed, args.steps);
                        print_kernel_profile(&asq_train::graph::take_kernel_profile(), args.steps);
                    }
                    Ok(())
                })
            })?;
            times.sort_by(f64::total_cmp);
            let ips = args.batch as f64 / times[times.len() / 2];
            let bits = if quant == "fp32" { 32 } else { args.bits };
            if args.json {
                println!(
                    "{{\"model\": \"{}\", \"quant\": \"{quant}\", \"bits\": {bits}, \"batch\": {}, \"threads\": {threads}, \"conv_precision\": \"{}\", \"images_per_s\": {ips:.1}}}",
                    args.model, args.batch, precision.name()
                );
            } else {
                println!(
                    "| {} | {quant} | {} | {threads} | {ips:.0} |",
                    args.model, args.batch
                );
            }
        }
    }
    Ok(())
}
