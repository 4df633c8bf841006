//! The per-op profile of training graphs (`graph::set_profiling`), in its own test binary: the
//! switch is process-wide.

use asq_train::graph::{set_profiling, take_profile};
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
}
