//! A quantized convolution of asq-train, exported to asq-kernels, computes the same result in
//! integers as its fake-quant float forward: same codes (one rounding rule, same per-sample
//! steps), exact integer sums, only the final float rescale differs.

use asq_core::{BitWidth, LevelSet};
use asq_kernels::conv::{conv2d, Conv2dShape};
use asq_kernels::Epilogue;
use asq_models::export::{export_conv, quantize_input};
use asq_train::nn::{ActQuant, Init, Module, QConv2d, QuantConfig, WeightQuant};
use asq_train::ops::conv::ConvSpec;
use asq_train::{Graph, ParamStore, Tensor};

fn check(weights: WeightQuant, acts: ActQuant, stride: usize) {
    let mut ps = ParamStore::new();
    let mut init = Init::from(5);
    let spec = ConvSpec {
        stride,
        pad: 1,
        groups: 1,
    };
    let layer = QConv2d::new(
        &mut ps,
        "conv",
        8,
        16,
        3,
        spec,
        &QuantConfig::new(weights, acts),
        &mut init,
    )
    .unwrap();
    let rng = init.rng();
    let x = Tensor::from_shape_fn(ndarray::IxDyn(&[3, 8, 7, 6]), |_| rng.uniform() * 2.0);
    // A training pass initialises the step and alphas; then perturb the adapter so that the
    // betas differ per sample.
    let mut g = Graph::new(true);
    let xv = g.input(x.clone());
    layer.forward(&mut g, &mut ps, xv).unwrap();
    drop(g);
    if let Some(id) = ps.find("conv.adapter.fc2.weight") {
        ps.get_mut(id)
            .value
            .iter_mut()
            .for_each(|v| *v = rng.normal() * 0.2);
    }
    let mut g = Graph::new(false);
    let xv = g.input(x.clone());
    let y = layer.forward(&mut g, &mut ps, xv).unwrap();
    let fq = g.value(y).clone();

    let exported = export_conv(&ps, &layer).unwrap();
    let qa = quantize_input(&mut ps, &layer, &exported, &x).unwrap();
    let shape = Conv2dShape {
        batch: 3,
        in_h: 7,
        in_w: 6,
        in_c: 8,
        kh: 3,
        kw: 3,
        stride,
        pad: 1,
    };
    let (oh, ow) = (shape.out_h(), shape.out_w());
    let mut out = vec![0.0f32; 3 * oh * ow * 16];
    conv2d(
        &qa,
        &exported.weights,
        &shape,
        &Epilogue::default(),
        &mut out,
    )
    .unwrap();
    let scale = fq.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let mut worst = 0.0f32;
    for n in 0..3 {
        for o in 0..16 {
            for y in 0..oh {
                for x in 0..ow {
                    let a = fq[[n, o, y, x]];
                    let b = out[((n * oh + y) * ow + x) * 16 + o];
                    worst = worst.max((a - b).abs());
                }
            }
        }
    }
    println!("max |fake-quant - integer| = {worst:e} (output scale {scale})");
    assert!(
        worst <= 1e-5 * scale.max(1.0),
        "integer and fake-quant outputs differ by {worst}"
    );
}

#[test]
fn asq_post_int_grid_conv_matches() {
    check(
        WeightQuant::Levels(LevelSet::post_int(BitWidth::new(4).unwrap(), 64).unwrap()),
        ActQuant::Asq {
            bits: 8,
            signed: false,
        },
        1,
    );
}

#[test]
fn asq_exact_post_conv_matches() {
    check(
        WeightQuant::Levels(LevelSet::post(BitWidth::new(4).unwrap()).unwrap()),
        ActQuant::Asq {
            bits: 4,
            signed: false,
        },
        2,
    );
}

#[test]
fn lsq_conv_matches() {
    check(
        WeightQuant::Lsq { bits: 4 },
        ActQuant::Lsq {
            bits: 8,
            signed: true,
        },
        1,
    );
}
