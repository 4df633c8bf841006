//! Property tests of the quantizers over random tensors, steps and bit widths.

use asq_core::pack::{pack_codes, packed_len, unpack_codes};
use asq_core::quant::asq::Asq;
use asq_core::quant::lsq::Lsq;
use asq_core::quant::weights::LevelQuantizer;
use asq_core::quant::{self, Grid, IntGrid, Steps};
use asq_core::{BitWidth, LevelSet, QuantRange};
use proptest::prelude::*;

fn range() -> impl Strategy<Value = QuantRange> {
    (2u32..=8, any::<bool>()).prop_map(|(b, s)| {
        if s {
            QuantRange::signed(b).unwrap()
        } else {
            QuantRange::unsigned(b).unwrap()
        }
    })
}

/// Every non-uniform level set the crate builds, at every width it supports.
fn level_set() -> impl Strategy<Value = LevelSet> {
    (2u32..=8, 0usize..5).prop_filter_map("unsupported width", |(b, kind)| {
        let bits = BitWidth::new(b).unwrap();
        match kind {
            0 => LevelSet::pot(bits).ok(),
            1 => LevelSet::apot(bits).ok(),
            2 => LevelSet::post(bits).ok(),
            3 => LevelSet::post_int(bits, 64).ok(),
            _ => LevelSet::post_int(bits, 127).ok(),
        }
    })
}

fn tensor(max_len: usize, scale: f32) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(-scale..scale, 1..max_len)
}

fn step() -> impl Strategy<Value = f32> {
    (-8.0f32..4.0).prop_map(|e| 2f32.powf(e))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn lsq_outputs_lie_on_the_grid_and_are_idempotent(r in range(), x in tensor(200, 50.0), s in step()) {
        let lsq = Lsq::new(r);
        let mut q = vec![0.0; x.len()];
        lsq.fake_quant(&x, &[s], &mut q).unwrap();
        for &v in &q {
            // v is exactly s times an integer of the range.
            let k = (v / s).round();
            prop_assert_eq!(v, s * k);
            prop_assert!(k >= r.min() as f32 && k <= r.max() as f32);
        }
        let mut qq = vec![0.0; x.len()];
        lsq.fake_quant(&q, &[s], &mut qq).unwrap();
        prop_assert_eq!(q, qq);
    }

    #[test]
    fn lsq_error_is_at_most_half_a_step_inside_the_range(r in range(), x in tensor(200, 50.0), s in step()) {
        let lsq = Lsq::new(r);
        let mut q = vec![0.0; x.len()];
        lsq.fake_quant(&x, &[s], &mut q).unwrap();
        for (&v, &o) in x.iter().zip(&q) {
            let t = v / s;
            if t >= r.min() as f32 && t <= r.max() as f32 {
                prop_assert!((v - o).abs() <= s * 0.5 * (1.0 + 1e-5), "x {} q {} s {}", v, o, s);
            }
        }
    }

    #[test]
    fn quantizers_are_monotone(r in range(), levels in level_set(), mut x in tensor(200, 4.0), s in step()) {
        x.sort_by(f32::total_cmp);
        let mut q = vec![0.0; x.len()];
        Lsq::new(r).fake_quant(&x, &[s], &mut q).unwrap();
        prop_assert!(q.windows(2).all(|w| w[0] <= w[1]));
        LevelQuantizer::new(levels).fake_quant(&x, &[s], &mut q).unwrap();
        prop_assert!(q.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn symmetric_quantizers_are_odd(b in 2u32..=8, levels in level_set(), x in tensor(200, 4.0), s in step()) {
        let neg: Vec<f32> = x.iter().map(|v| -v).collect();
        let (mut a, mut c) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        let lq = LevelQuantizer::new(levels);
        lq.fake_quant(&x, &[s], &mut a).unwrap();
        lq.fake_quant(&neg, &[s], &mut c).unwrap();
        for (p, n) in a.iter().zip(&c) {
            prop_assert_eq!(*p, -*n);
        }
        // Signed uniform grids are odd where the range is symmetric: |x / s| <= p.
        let r = QuantRange::signed(b).unwrap();
        let inside: Vec<f32> = x.iter().map(|v| v.clamp(-(r.max() as f32) * s, r.max() as f32 * s)).collect();
        let inside_neg: Vec<f32> = inside.iter().map(|v| -v).collect();
        Lsq::new(r).fake_quant(&inside, &[s], &mut a).unwrap();
        Lsq::new(r).fake_quant(&inside_neg, &[s], &mut c).unwrap();
        for (p, n) in a.iter().zip(&c) {
            prop_assert_eq!(*p, -*n);
        }
    }

    #[test]
    fn level_projection_is_nearest_in_set_and_idempotent(levels in level_set(), x in tensor(200, 3.0), alpha in step()) {
        let all = levels.levels();
        let lq = LevelQuantizer::new(levels.clone());
        let mut q = vec![0.0; x.len()];
        lq.fake_quant(&x, &[alpha], &mut q).unwrap();
        for (&v, &o) in x.iter().zip(&q) {
            let level = o / alpha;
            prop_assert!(all.iter().any(|&l| (l - level).abs() <= 1e-6 * l.abs().max(1e-30)), "{} not a level", level);
            let t = (v / alpha).clamp(-1.0, 1.0);
            let best = all.iter().map(|l| (l - t).abs()).fold(f32::INFINITY, f32::min);
            prop_assert!((level - t).abs() <= best + 1e-6, "t {} -> {} but a level is {} away", t, level, best);
        }
        let mut qq = vec![0.0; x.len()];
        lq.fake_quant(&q, &[alpha], &mut qq).unwrap();
        prop_assert_eq!(q, qq);
    }

    #[test]
    fn encode_decode_round_trip_every_quantizer(r in range(), levels in level_set(), x in tensor(300, 30.0), s in step()) {
        let mut fq = vec![0.0; x.len()];
        let mut codes = vec![0u8; x.len()];
        let mut back = vec![0.0; x.len()];
        let lsq = Lsq::new(r);
        lsq.fake_quant(&x, &[s], &mut fq).unwrap();
        lsq.encode(&x, &[s], &mut codes).unwrap();
        prop_assert!(codes.iter().all(|&c| c <= r.bits().mask()));
        lsq.decode(&codes, &[s], &mut back).unwrap();
        prop_assert_eq!(&fq, &back);
        let lq = LevelQuantizer::new(levels.clone());
        lq.fake_quant(&x, &[s], &mut fq).unwrap();
        lq.encode(&x, &[s], &mut codes).unwrap();
        prop_assert!(codes.iter().all(|&c| c <= levels.bits().mask()));
        lq.decode(&codes, &[s], &mut back).unwrap();
        prop_assert_eq!(&fq, &back);
    }

    #[test]
    fn pack_unpack_round_trip_every_width(b in 2u32..=8, seed in prop::collection::vec(any::<u8>(), 0..257)) {
        let bits = BitWidth::new(b).unwrap();
        let codes: Vec<u8> = seed.iter().map(|c| c & bits.mask()).collect();
        let mut packed = vec![0u8; packed_len(codes.len(), bits)];
        pack_codes(&codes, bits, &mut packed).unwrap();
        prop_assert_eq!(packed.len(), (codes.len() * b as usize).div_ceil(8));
        let mut back = vec![0u8; codes.len()];
        unpack_codes(&packed, bits, &mut back).unwrap();
        prop_assert_eq!(codes, back);
    }

    #[test]
    fn asq_with_unit_beta_is_lsq_bit_for_bit(
        r in range(), rows in 1usize..6, cols in 1usize..70, s in step(), seed in any::<u64>(), g in 0.01f32..1.0,
    ) {
        let len = rows * cols;
        let x: Vec<f32> = (0..len).map(|i| pseudo(seed, i) * 40.0 * s).collect();
        let go: Vec<f32> = (0..len).map(|i| pseudo(seed ^ 0x9e37, i)).collect();
        let ones = vec![1.0; rows];
        let (mut a, mut b) = (vec![0.0; len], vec![0.0; len]);
        Lsq::new(r).fake_quant(&x, &[s], &mut a).unwrap();
        Asq::new(r).fake_quant(&x, s, &ones, &mut b).unwrap();
        prop_assert_eq!(&a, &b);
        let (mut dxa, mut dxb) = (vec![0.0; len], vec![0.0; len]);
        let mut ds = [0.0];
        let mut db = vec![0.0; rows];
        Lsq::new(r).backward(&x, &[s], &go, g, &mut dxa, &mut ds).unwrap();
        let ds_asq = Asq::new(r).backward(&x, s, &ones, &go, g, &mut dxb, &mut db).unwrap();
        prop_assert_eq!(ds[0].to_bits(), ds_asq.to_bits());
        prop_assert_eq!(dxa, dxb);
    }

    /// The backward pass (lane sums, element-wise terms compiled for the CPU's vectors, head and
    /// tail loops, blocks in parallel) against a naive per-element loop: the same input
    /// gradients bit for bit and the same row and total sums up to f64 rounding. Lengths cross
    /// the 64-element chunks, the lane groups and the parallel threshold.
    #[test]
    fn backward_matches_a_naive_loop(
        r in range(), rows in 1usize..5, cols in prop_oneof![1usize..200, 5000usize..70000], s in step(),
        seed in any::<u64>(), weighted in any::<bool>(),
    ) {
        let grid = IntGrid::new(r);
        let len = rows * cols;
        let x: Vec<f32> = (0..len).map(|i| pseudo(seed, i) * 1.5 * s * r.max() as f32).collect();
        let go: Vec<f32> = (0..len).map(|i| pseudo(seed ^ 3, i)).collect();
        let betas: Vec<f32> = (0..rows).map(|m| 0.5 + pseudo(seed ^ 5, m).abs()).collect();
        let w = weighted.then_some(&betas[..]);
        let mut dx = vec![f32::NAN; len];
        let mut sums = vec![0.0f32; rows];
        let total = quant::backward(&grid, &x, Steps::Scaled { step: s, betas: &betas }, &go, w, &mut dx, &mut sums).unwrap();
        let (lo, hi) = (r.min() as f32, r.max() as f32);
        let mut expect_total = 0.0f64;
        for m in 0..rows {
            let st = s * betas[m];
            let mut row = 0.0f64;
            for k in m * cols..(m + 1) * cols {
                let t = x[k] / st;
                let term = if t <= lo { lo } else if t >= hi { hi } else { grid.project(t) - t };
                let e = if t >= lo && t <= hi { go[k] } else { 0.0 };
                prop_assert_eq!(dx[k].to_bits(), e.to_bits(), "dx at {}", k);
                let gi = if term == 0.0 { 0.0 } else { go[k] * term };
                row += gi as f64;
            }
            prop_assert!((sums[m] as f64 - row).abs() <= 1e-6 * (1.0 + row.abs()), "row {}: {} vs {}", m, sums[m], row);
            expect_total += row * if weighted { betas[m] as f64 } else { 1.0 };
        }
        prop_assert!((total - expect_total).abs() <= 1e-9 * (1.0 + expect_total.abs()), "{} vs {}", total, expect_total);
    }

    #[test]
    fn asq_beta_gradient_is_s_times_the_per_sample_lsq_sum(
        r in range(), rows in 1usize..5, cols in 1usize..50, s in step(), seed in any::<u64>(),
    ) {
        let len = rows * cols;
        let x: Vec<f32> = (0..len).map(|i| pseudo(seed, i) * 20.0 * s).collect();
        let go: Vec<f32> = (0..len).map(|i| pseudo(seed ^ 7, i)).collect();
        let betas: Vec<f32> = (0..rows).map(|m| 0.5 + pseudo(seed ^ 99, m).abs()).collect();
        let mut dx = vec![0.0; len];
        let mut db = vec![0.0; rows];
        let ds = Asq::new(r).backward(&x, s, &betas, &go, 1.0, &mut dx, &mut db).unwrap();
        // Per-sample LSQ with step s * beta_m gives R_m; ASQ: dbeta_m = s R_m, ds = sum beta_m R_m.
        let steps: Vec<f32> = betas.iter().map(|b| s * b).collect();
        let mut rs = vec![0.0; rows];
        Lsq::new(r).backward(&x, &steps, &go, 1.0, &mut dx, &mut rs).unwrap();
        let mut expect = 0.0f64;
        for m in 0..rows {
            prop_assert!((db[m] - s * rs[m]).abs() <= 1e-5 * (1.0 + (s * rs[m]).abs()));
            expect += (betas[m] * rs[m]) as f64;
        }
        prop_assert!((ds as f64 - expect).abs() <= 1e-4 * (1.0 + expect.abs()), "{} vs {}", ds, expect);
    }

    #[test]
    fn saturated_gradients_match_finite_differences(r in range(), levels in level_set(), s in step(), sign in any::<bool>(), n in 1usize..20) {
        // Beyond the clip range the quantizer is smooth in the step: x_hat = s * bound.
        let far = if sign || r.min() == 0 { 3.0 } else { -3.0 };
        let grid = IntGrid::new(r);
        let x: Vec<f32> = (0..n).map(|i| far * s * (r.max() as f32 + 1.0) * (1.0 + i as f32 * 0.1)).collect();
        let go: Vec<f32> = (0..n).map(|i| 1.0 + 0.25 * i as f32).collect();
        check_fd(&grid, &x, &go, s)?;
        let far_l: Vec<f32> = (0..n).map(|i| far * s * 2.0 * (1.0 + i as f32 * 0.1)).collect();
        check_fd(&levels, &far_l, &go, s)?;
    }

    #[test]
    fn non_finite_inputs_never_panic_and_follow_the_policy(r in range(), levels in level_set(), mut x in tensor(100, 10.0), at in any::<prop::sample::Index>(), s in step()) {
        let i = at.index(x.len());
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            x[i] = bad;
            let mut q = vec![0.0; x.len()];
            let mut dx = vec![0.0; x.len()];
            let mut ds = [0.0];
            let lsq = Lsq::new(r);
            lsq.fake_quant(&x, &[s], &mut q).unwrap();
            let grid = IntGrid::new(r);
            let expect = if bad.is_nan() { 0.0 } else if bad > 0.0 { grid.upper() * s } else { grid.lower() * s };
            prop_assert_eq!(q[i], expect);
            lsq.backward(&x, &[s], &vec![1.0; x.len()], 1.0, &mut dx, &mut ds).unwrap();
            prop_assert!(ds[0].is_finite() && dx[i] == 0.0);
            let lq = LevelQuantizer::new(levels.clone());
            lq.fake_quant(&x, &[s], &mut q).unwrap();
            prop_assert!(q[i].is_finite());
            lq.backward(&x, &[s], &vec![1.0; x.len()], 1.0, &mut dx, &mut ds).unwrap();
            prop_assert!(ds[0].is_finite());
        }
    }
}

/// Central finite differences of `L = sum go_i x_hat_i` in the step, against the analytic sum.
fn check_fd<G: Grid>(grid: &G, x: &[f32], go: &[f32], s: f32) -> Result<(), TestCaseError> {
    let loss = |step: f64| -> f64 {
        let mut q = vec![0.0; x.len()];
        quant::fake_quant(grid, x, Steps::PerRow(&[step as f32]), &mut q).unwrap();
        q.iter().zip(go).map(|(a, b)| *a as f64 * *b as f64).sum()
    };
    let h = s as f64 * 1e-3;
    let fd = (loss(s as f64 + h) - loss(s as f64 - h)) / (2.0 * h);
    let mut dx = vec![0.0; x.len()];
    let mut rows = [0.0];
    let total =
        quant::backward(grid, x, Steps::PerRow(&[s]), go, None, &mut dx, &mut rows).unwrap();
    prop_assert!(
        (fd - total).abs() <= 1e-3 * (1.0 + total.abs()),
        "fd {} analytic {}",
        fd,
        total
    );
    prop_assert!(dx.iter().all(|&d| d == 0.0));
    Ok(())
}

/// Deterministic values in [-1, 1) from a seed and an index (splitmix64).
fn pseudo(seed: u64, i: usize) -> f32 {
    let mut z = seed.wrapping_add((i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

#[test]
fn post_magnitudes_step_by_sqrt2_and_fit_the_width() {
    for b in 2..=8 {
        let l = LevelSet::post(BitWidth::new(b).unwrap()).unwrap();
        let m = &l.magnitudes()[1..];
        assert_eq!(m.len(), (1 << (b - 1)) - 1, "{b} bits");
        assert_eq!(2 * m.len() + 1, (1 << b) - 1);
        for w in m.windows(2) {
            let ratio = w[1] as f64 / w[0] as f64;
            assert!(
                (ratio - std::f64::consts::SQRT_2).abs() < 1e-6,
                "{b} bits: ratio {ratio}"
            );
        }
        assert_eq!(m[m.len() - 1], 1.0);
        let codes: std::collections::HashSet<u8> =
            l.levels().iter().map(|&v| l.encode(v)).collect();
        assert_eq!(codes.len(), l.levels().len());
        assert!(codes.iter().all(|&c| c <= l.bits().mask()));
    }
}
