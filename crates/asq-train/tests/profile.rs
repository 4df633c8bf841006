//! The per-op profile of training graphs (`graph::set_profiling`), in its own test binary: the
//! switch is process-wide.

use asq_train::graph::{set_profiling, take_kernel_profile, take_profile};
use asq_train::ops::conv::{conv2d, with_conv_precision, ConvPrecision, ConvSpec};
use asq_train::ops::{act, basic};
use asq_train::{Graph, Tensor};

fn pass() {
    let mut g = Graph::new(true);
    let x = g.input_with_grad(Tensor::from_shape_fn(ndarray::IxDyn(&[64, 64]), |i| {
        i[0] as f32 - i[1] as f32
    }));
    let h = act::relu(&mut g, x);
    let h = act::relu(&mut g, h);
    let s = basic::sum(&mut g, h);
    g.gradients(s).unwrap();
}

#[test]
fn profile_counts_ops_and_times_both_passes_only_while_on() {
    pass();
    assert!(take_profile().is_empty(), "off by default");
    set_profiling(true);
    pass();
    pass();
    set_profiling(false);
    let ops = take_profile();
    let clamp = ops
        .iter()
        .find(|t| t.op == "ClampOp")
        .expect("ReLU is a ClampOp");
    assert_eq!(clamp.calls, 4, "two ReLUs in each of two passes");
    assert!(clamp.backward > std::time::Duration::ZERO);
    let sum = ops.iter().find(|t| t.op == "SumOp").expect("the sum");
    assert_eq!(sum.calls, 2);
    // Largest total first.
    let totals: Vec<_> = ops.iter().map(|t| t.forward + t.backward).collect();
    assert!(totals.windows(2).all(|w| w[0] >= w[1]), "{ops:?}");
    pass();
    assert!(take_profile().is_empty(), "off again, and taken");

    // The direct convolution kernels time themselves while it is on: per sample, the forward
    // and input-gradient products and the weight gradient, each under its shape.
    conv_pass(3, 16, 28);
    assert!(
        take_kernel_profile().is_empty(),
        "kernels untimed while off"
    );
    set_profiling(true);
    conv_pass(3, 16, 28);
    // 20 samples: weight-gradient chunks of two (a batched call counts each sample).
    conv_pass(20, 32, 14);
    set_profiling(false);
    take_profile();
    let kernels = take_kernel_profile();
    // 28x28 planes: forward and input gradient, 3 samples each, on the padded grid (28 rows of
    // 30, rounded to 48-position tiles) or, on AVX2, in Winograd's F(4x4, 3x3) over the 784
    // pixels (the rows kernel there at ConvPrecision::Highest); the weight gradient along the
    // grid, or on AVX2 in Winograd's F(3x3, 4x4).
    let kinds = [("grid", 864), ("rows", 784), ("winograd", 784)];
    let product = kernels
        .iter()
        .find(|k| k.ci == 16 && kinds.contains(&(k.kernel, k.positions)))
        .unwrap_or_else(|| panic!("16-channel 28x28 product: {kernels:?}"));
    assert_eq!(
        (product.co, product.taps, product.calls),
        (16, 9, 6),
        "{product:?}"
    );
    assert_eq!(
        product.flops_per_call(),
        2.0 * (16 * 16 * 9 * product.positions) as f64
    );
    eprintln!("16-channel 28x28 product on the {} kernel", product.kernel);
    let dw16 = kernels
        .iter()
        .find(|k| {
            k.ci == 16
                && [("dw grid", 864), ("dw winograd", 784)].contains(&(k.kernel, k.positions))
        })
        .unwrap_or_else(|| panic!("16-channel 28x28 weight gradient: {kernels:?}"));
    assert_eq!(dw16.calls, 3, "{dw16:?}");
    eprintln!(
        "16-channel 28x28 weight gradient on the {} kernel",
        dw16.kernel
    );
    // 14x14 planes with 32 channels on the rows kernel (or, on AVX2 machines, Winograd's
    // F(4x4, 3x3)), the weight gradient along the channels over the 196 pixels (or in
    // Winograd's domain).
    let rows = kernels
        .iter()
        .find(|k| k.ci == 32 && k.positions == 196 && ["rows", "winograd"].contains(&k.kernel))
        .unwrap_or_else(|| panic!("32-channel 14x14 product: {kernels:?}"));
    assert_eq!((rows.co, rows.calls), (32, 40), "{rows:?}");
    eprintln!("32-channel 14x14 product on the {} kernel", rows.kernel);
    let dw = kernels
        .iter()
        .find(|k| k.ci == 32 && k.positions == 196 && k.kernel.starts_with("dw "))
        .unwrap_or_else(|| panic!("32-channel 14x14 weight gradient: {kernels:?}"));
    assert!(
        ["dw channels", "dw winograd"].contains(&dw.kernel),
        "{dw:?}"
    );
    assert_eq!(dw.calls, 20, "{dw:?}");
    assert!(kernels.iter().all(|k| k.time > std::time::Duration::ZERO));
    let times: Vec<_> = kernels.iter().map(|k| k.time).collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "largest first");
    assert!(take_kernel_profile().is_empty(), "taken");

    // At ConvPrecision::Highest no F(4x4) tile anywhere: the 16-channel 28x28 product and
    // weight gradient leave Winograd's domain, the 32-channel 14x14 ones (on AVX2) take
    // F(2x2), whose kernels time under the same names; the same calls either way.
    set_profiling(true);
    with_conv_precision(ConvPrecision::Highest, || {
        conv_pass(3, 16, 28);
        conv_pass(20, 32, 14);
    });
    set_profiling(false);
    take_profile();
    let highest = take_kernel_profile();
    let find = |ci: usize, dw: bool| {
        highest
            .iter()
            .find(|k| k.ci == ci && k.kernel.starts_with("dw ") == dw)
            .unwrap_or_else(|| panic!("{ci} channels, dw {dw}: {highest:?}"))
    };
    let (p16, dw16, p32) = (find(16, false), find(16, true), find(32, false));
    assert!(["grid", "rows"].contains(&p16.kernel), "{p16:?}");
    assert!(
        ["dw grid", "dw channels"].contains(&dw16.kernel),
        "{dw16:?}"
    );
    assert!(["rows", "winograd"].contains(&p32.kernel), "{p32:?}");
    assert_eq!((p16.calls, dw16.calls, p32.calls), (6, 3, 40));
    eprintln!(
        "at Highest: 16-channel 28x28 on {:?}",
        highest
            .iter()
            .filter(|k| k.ci == 16)
            .map(|k| k.kernel)
            .collect::<Vec<_>>()
    );
}

/// A direct 3x3 convolution of `n` samples of `c` channels on `hw x hw` planes, forward and
/// backward.
fn conv_pass(n: usize, c: usize, hw: usize) {
    let mut g = Graph::new(true);
    let x = g.input_with_grad(Tensor::from_shape_fn(
        ndarray::IxDyn(&[n, c, hw, hw]),
        |i| ((i[1] * 7 + i[2] * 3 + i[3]) % 11) as f32 - 5.0,
    ));
    let w = g.input_with_grad(Tensor::from_shape_fn(ndarray::IxDyn(&[c, c, 3, 3]), |i| {
        ((i[0] + 2 * i[1] + i[2] * i[3]) % 5) as f32 * 0.1
    }));
    let spec = ConvSpec {
        stride: 1,
        pad: 1,
        groups: 1,
    };
    let y = conv2d(&mut g, x, w, None, spec).unwrap();
    let s = basic::sum(&mut g, y);
    g.gradients(s).unwrap();
}
