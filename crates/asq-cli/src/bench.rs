//! `asq bench kernels`: every integer path and f32 sgemm measured in the same process, on GEMM
//! shapes of real layers, with the machine's peaks, as a table or JSON.

use std::time::Instant;

use asq_core::quant::Steps;
use asq_core::{BitWidth, LevelSet, QuantRange};
use asq_kernels::probe::{peak_f32, peak_int8};
use asq_kernels::{describe, gemm, Epilogue, Isa, PackedWeights, QuantActivations};

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
}

/// GEMM shapes (M, K, N) from real layers.
const SHAPES: &[(&str, usize, usize, usize)] = &[
    ("gemv", 1, 1024, 1024),
    ("fc", 64, 576, 1024),
    ("fc", 256, 1024, 1024),
    ("square", 1024, 1024, 1024),
    // ResNet-20 3x3 convs on 28x28 inputs as im2col GEMMs: M = batch * H * W, K = 9 * C_in.
    ("resnet20-conv1-b1", 784, 144, 16),
    ("resnet20-conv2-b1", 196, 288, 32),
    ("resnet20-conv3-b1", 49, 576, 64),
    ("resnet20-conv1-b64", 50176, 144, 16),
    ("resnet20-conv2-b64", 12544, 288, 32),
    ("resnet20-conv3-b64", 3136, 576, 64),
];

#[derive(Clone, Copy)]
enum WeightKind {
    Int8,
    PostInt(u32),
    PostExact(u32),
}

/// (name, weights, activation bits).
const KERNELS: &[(&str, WeightKind, u32)] = &[
    ("int8", WeightKind::Int8, 8),
    ("post-w4a8", WeightKind::PostInt(4), 8),
    ("post-exact-w4a8", WeightKind::PostExact(4), 8),
    ("post-w3a8", WeightKind::PostInt(3), 8),
    ("post-w2a8", WeightKind::PostInt(2), 8),
    ("post-w4a4", WeightKind::PostInt(4), 4),
];

fn pseudo(seed: u64, i: usize) -> f32 {
    let mut z = seed.wrapping_add((i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

fn weights(kind: WeightKind, n: usize, k: usize) -> Result<PackedWeights, asq_kernels::Error> {
    let w: Vec<f32> = (0..n * k).map(|i| pseudo(7, i) * 0.5).collect();
    let alphas = vec![0.5f32; n];
    let b = |x| BitWidth::new(x).expect("2..=8");
    match kind {
        WeightKind::Int8 => {
            let r = QuantRange::signed(8)?;
            let steps = vec![0.5 / 127.0; n];
            let mut codes = vec![0u8; n * k];
            asq_core::quant::encode(
                &asq_core::quant::IntGrid::new(r),
                &w,
                Steps::PerRow(&steps),
                &mut codes,
            )?;
            PackedWeights::from_uniform_codes(&codes, n, k, r, &steps)
        }
        WeightKind::PostInt(bits) => {
            PackedWeights::quantize_levels(&w, n, k, &LevelSet::post_int(b(bits), 64)?, &alphas)
        }
        WeightKind::PostExact(bits) => {
            PackedWeights::quantize_levels(&w, n, k, &LevelSet::post(b(bits))?, &alphas)
        }
    }
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
    let threads = rayon::current_num_threads().min(n.div_ceil(16));
    let chunk = n.div_ceil(threads);
    measure(2.0 * (m * k * n) as f64, seconds, || {
        let cols: Vec<(usize, usize)> = (0..threads)
            .map(|t| (t * chunk, ((t + 1) * chunk).min(n)))
            .collect();
        let cp = c.as_mut_ptr() as usize;
        rayon::scope(|s| {
            for &(n0, n1) in &cols {
                let (a, b) = (&a, &b);
                s.spawn(move |_| {
                    // Column blocks are disjoint; matrixmultiply takes raw strided pointers.
                    let cptr = (cp as *mut f32).wrapping_add(n0);
                    // SAFETY: a is m x k (row stride k), b is k x n (row stride n) offset to
                    // column n0, c is m x n offset to column n0; each task writes its own columns.
                    unsafe {
                        matrixmultiply::sgemm(
                            m,
                            k,
                            n1 - n0,
                            1.0,
                            a.as_ptr(),
                            k as isize,
                            1,
                            b.as_ptr().add(n0),
                            n as isize,
                            1,
                            0.0,
                            cptr,
                            n as isize,
                            1,
                        )
                    }
                });
            }
        });
    })
}

struct Row {
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
            for &(_, m, k, n) in SHAPES {
                let sgemm = sgemm_gops(m, k, n, args.seconds);
                for &(name, kind, abits) in KERNELS {
                    let w = weights(kind, n, k)?;
                    let range = QuantRange::unsigned(abits)?;
                    let x: Vec<f32> = (0..m * k).map(|i| pseudo(3, i).abs()).collect();
                    let betas: Vec<f32> = (0..m).map(|r| 0.5 + pseudo(4, r).abs()).collect();
                    let step = 1.0 / range.max() as f32;
                    let a = QuantActivations::quantize(
                        &x,
                        m,
                        k,
                        range,
                        Steps::Scaled {
                            step,
                            betas: &betas,
                        },
                    )?;
                    let mut out = vec![0.0f32; m * n];
                    let epi = Epilogue::default();
                    let gops = measure(2.0 * (m * k * n) as f64, args.seconds, || {
                        gemm(&a, &w, &epi, &mut out).expect("checked shapes");
                    });
                    let path = describe(Isa::best(), &a, &w)?;
                    rows.push(Row {
                        kernel: name.into(),
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
            println!(
                "  {{\"kernel\": \"{}\", \"path\": \"{}\", \"m\": {}, \"k\": {}, \"n\": {}, \"threads\": {}, \"gops\": {:.2}, \"sgemm_gops\": {:.2}, \"ratio_vs_sgemm\": {:.3}}}{}",
                r.kernel, r.path, r.m, r.k, r.n, r.threads, r.gops, r.sgemm, r.gops / r.sgemm,
                if i + 1 < rows.len() { "," } else { "" }
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
            "{:<16} {:<22} {:>6} {:>5} {:>5} {:>3} {:>9} {:>9} {:>7}",
            "kernel", "path", "M", "K", "N", "thr", "GOP/s", "sgemm", "ratio"
        );
        for r in &rows {
            println!(
                "{:<16} {:<22} {:>6} {:>5} {:>5} {:>3} {:>9.1} {:>9.1} {:>7.2}",
                r.kernel,
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
