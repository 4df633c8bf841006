//! `asq plot`: pictures of what a quantized model learnt, as self-contained SVG files.
//!
//! - `--betas FILE.svg`: per layer, the distribution over test images of ASQ's per-sample step
//!   multiplier `beta` (the paper's mechanism: how much the step adapts, layer by layer), one
//!   curve per checkpoint (e.g. the 4-bit and the 2-bit run).
//! - `--weights FILE.svg`: per quantized layer, the histogram of the normalised weights
//!   `w / alpha` (per output channel) of the first checkpoint, with the POT and POST levels of its
//!   bit width drawn over it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use asq_core::{BitWidth, LevelSet};
use asq_train::checkpoint::{atomic_write, Checkpoint};
use asq_train::data::loader::make_batch;
use asq_train::nn::Module;
use asq_train::{Graph, ParamStore};

use crate::common::{check_new_output, Error};
use crate::plot::{svg, Chart, Series};
use crate::recipe::{load_split, Recipe};

/// Options of `asq plot`.
#[derive(clap::Args)]
pub struct PlotArgs {
    /// Quantized checkpoints written by `asq train` (e.g. the W4A4 and W2A2 runs of one method).
    #[arg(required = true)]
    checkpoints: Vec<PathBuf>,
    /// Write the per-layer distributions of ASQ's beta over the test images to this SVG file.
    #[arg(long)]
    betas: Option<PathBuf>,
    /// Write per-layer histograms of w / alpha with the POT and POST levels to this SVG file.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Test images the betas are measured on (the first N).
    #[arg(long, default_value_t = 2000)]
    test_images: usize,
    /// Data directory: MNIST-layout IDX files (Fashion-MNIST) or CIFAR-10 binary batches
    /// (default: the Debian package's Fashion-MNIST, else the shipped subset).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Replace existing output files.
    #[arg(long)]
    force: bool,
}

const COLORS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

/// A histogram of `values` over `[lo, hi]` in `bins` bins, as a step curve of fractions.
fn histogram(values: &[f32], lo: f64, hi: f64, bins: usize) -> Vec<(f64, f64)> {
    let mut counts = vec![0usize; bins];
    let width = (hi - lo) / bins as f64;
    for &v in values {
        let b = ((v as f64 - lo) / width).floor();
        if b >= 0.0 && (b as usize) < bins {
            counts[b as usize] += 1;
        }
    }
    let n = values.len().max(1) as f64;
    let mut pts = vec![(lo, 0.0)];
    for (i, &c) in counts.iter().enumerate() {
        let (x0, x1, y) = (
            lo + i as f64 * width,
            lo + (i + 1) as f64 * width,
            c as f64 / n,
        );
        pts.push((x0, y));
        pts.push((x1, y));
    }
    pts.push((hi, 0.0));
    pts
}

/// Vertical marks at `levels`, `height` high, joined along the axis.
fn marks(levels: &[f32], height: f64) -> Vec<(f64, f64)> {
    let mut pts = Vec::new();
    for &l in levels {
        let l = l as f64;
        pts.extend([(l, 0.0), (l, height), (l, 0.0)]);
    }
    pts
}

/// `asq plot`.
pub fn plot(args: &PlotArgs) -> Result<(), Error> {
    if args.betas.is_none() && args.weights.is_none() {
        return Err("nothing to draw: pass --betas FILE.svg and/or --weights FILE.svg".into());
    }
    for path in [&args.betas, &args.weights].into_iter().flatten() {
        check_new_output(path, args.force)?;
    }
    let mut loaded = Vec::new();
    for path in &args.checkpoints {
        let ckpt = Checkpoint::load(path)?;
        let recipe = Recipe::from_meta(&ckpt.meta, path)?;
        if recipe.quant == "fp32" {
            return Err(format!(
                "{}: a full-precision model has no quantizers",
                path.display()
            )
            .into());
        }
        loaded.push((path, ckpt, recipe));
    }
    if let Some(out) = &args.betas {
        let test = load_split(&args.data, false, Some(args.test_images))?;
        // Per layer, per checkpoint: every test image's beta.
        let mut per_layer: BTreeMap<String, Vec<(String, Vec<f32>)>> = BTreeMap::new();
        let mut order: Vec<String> = Vec::new();
        for (path, ckpt, recipe) in &loaded {
            let mut ps = ParamStore::new();
            let net = recipe.build(&mut ps, 0u64)?;
            ckpt.restore(&mut ps)?;
            let mut betas: BTreeMap<String, Vec<f32>> = BTreeMap::new();
            let idx: Vec<usize> = (0..test.len()).collect();
            for chunk in idx.chunks(250) {
                let b = make_batch(&test, chunk, &recipe.normalize, None)?;
                let mut g = Graph::new(false).observe();
                let x = g.input(b.images);
                net.forward(&mut g, &mut ps, x)?;
                for (key, v) in g.observations() {
                    let layer = key.trim_end_matches(".beta").to_string();
                    if !order.contains(&layer) {
                        order.push(layer.clone());
                    }
                    betas.entry(layer).or_default().extend(v);
                }
            }
            if betas.is_empty() {
                return Err(format!(
                    "{}: {} has no ASQ layers (no beta to draw)",
                    path.display(),
                    recipe.label()
                )
                .into());
            }
            for (layer, v) in betas {
                per_layer
                    .entry(layer)
                    .or_default()
                    .push((recipe.label(), v));
            }
        }
        let mut charts = Vec::new();
        println!("| layer | per checkpoint: beta mean ± std (range over all checkpoints) |");
        println!("|---|---|");
        for layer in &order {
            let runs = &per_layer[layer];
            let (lo, hi) = runs
                .iter()
                .flat_map(|r| r.1.iter())
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
                    (a.min(v as f64), b.max(v as f64))
                });
            let pad = ((hi - lo) * 0.05).max(1e-3);
            let mut series = Vec::new();
            let mut cells = Vec::new();
            for (i, (label, v)) in runs.iter().enumerate() {
                let n = v.len() as f64;
                let mean = v.iter().map(|&b| b as f64).sum::<f64>() / n;
                let sd = (v.iter().map(|&b| (b as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
                cells.push(format!("{label}: {mean:.3} ± {sd:.3} ({lo:.3}..{hi:.3})"));
                series.push(Series {
                    name: label.clone(),
                    color: COLORS[i % COLORS.len()],
                    points: histogram(v, lo - pad, hi + pad, 40),
                });
            }
            println!("| {layer} | {} |", cells.join("; "));
            charts.push(Chart {
                title: format!("{layer}: ASQ beta over {} test images", args.test_images),
                x_label: "beta (step multiplier)".into(),
                y_label: "fraction of images".into(),
                series,
            });
        }
        atomic_write(out, svg(&charts).as_bytes())?;
        println!("wrote {} ({} layers)", out.display(), charts.len());
    }
    if let Some(out) = &args.weights {
        let (path, ckpt, recipe) = &loaded[0];
        let bits = BitWidth::new(recipe.bits)?;
        let signed = |l: LevelSet| -> Vec<f32> {
            let m = l.magnitudes();
            m.iter().map(|v| -v).chain(m.iter().copied()).collect()
        };
        let post = signed(LevelSet::post(bits)?);
        let pot = signed(LevelSet::pot(bits)?);
        let find = |name: &str| ckpt.params.iter().find(|t| t.name == name);
        let mut charts = Vec::new();
        for scale in ckpt
            .params
            .iter()
            .filter(|t| t.name.ends_with(".weight_scale"))
        {
            let layer = scale.name.trim_end_matches(".weight_scale");
            let Some(w) = find(&format!("{layer}.weight")) else {
                continue;
            };
            let channels = scale.data.len();
            if channels == 0 || w.data.len() % channels != 0 {
                return Err(
                    format!("{}: {layer}: weights and scales disagree", path.display()).into(),
                );
            }
            let k = w.data.len() / channels;
            let v: Vec<f32> = w
                .data
                .iter()
                .enumerate()
                .map(|(i, &x)| x / scale.data[i / k])
                .collect();
            let hist = histogram(&v, -1.25, 1.25, 100);
            let top = hist.iter().map(|p| p.1).fold(0.0, f64::max).max(1e-3);
            charts.push(Chart {
                title: format!(
                    "{layer} ({}): w / alpha, {} weights",
                    recipe.label(),
                    v.len()
                ),
                x_label: "normalised weight".into(),
                y_label: "fraction of weights".into(),
                series: vec![
                    Series {
                        name: "weights".into(),
                        color: COLORS[0],
                        points: hist,
                    },
                    Series {
                        name: format!("POST levels ({} bits)", recipe.bits),
                        color: COLORS[1],
                        points: marks(&post, top),
                    },
                    Series {
                        name: format!("POT levels ({} bits)", recipe.bits),
                        color: COLORS[2],
                        points: marks(&pot, top * 0.6),
                    },
                ],
            });
        }
        if charts.is_empty() {
            return Err(
                format!("{}: no quantized weights (no weight_scale)", path.display()).into(),
            );
        }
        atomic_write(out, svg(&charts).as_bytes())?;
        println!("wrote {} ({} layers)", out.display(), charts.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_fractions_and_marks_stand_on_the_axis() {
        let h = histogram(&[0.1, 0.2, 0.2, 0.9, 5.0], 0.0, 1.0, 4);
        let total: f64 = h[1..h.len() - 1].chunks(2).map(|p| p[0].1).sum();
        assert!((total - 0.8).abs() < 1e-12, "{h:?}"); // 5.0 is outside [0, 1]
        assert_eq!(h.first(), Some(&(0.0, 0.0)));
        assert_eq!(h.last(), Some(&(1.0, 0.0)));
        let m = marks(&[-0.5, 0.5], 2.0);
        assert_eq!(
            m,
            vec![
                (-0.5, 0.0),
                (-0.5, 2.0),
                (-0.5, 0.0),
                (0.5, 0.0),
                (0.5, 2.0),
                (0.5, 0.0)
            ]
        );
    }
}
