//! The GEMM contract and the one blocked driver every kernel variant plugs into.
//!
//! `out[m, n] = act(acc[m, n] · (a_scale[m] · w_scale[n]) + bias[n] + residual[m, n])` with
//! `acc[m, n] = sum_k a[m, k] · value(w[n, k])` in exact i32 arithmetic (for exact POST:
//! `acc = E + O · (1/√2)`, from two i32 accumulators). The epilogue is written once, here, in
//! scalar code with a fixed operation order (no FMA), so every variant produces the same bits.
//!
//! The driver splits the output channels into panels of [`NR`], expands each panel's packed
//! codes into an int8 buffer once per task (the variant's `expand`), and runs the variant's
//! micro-kernel over tiles of [`MR`] rows x [`NR`] channels. Threads (rayon) take disjoint ranges of
//! panels, so no expansion is repeated and no output element is shared.

use rayon::prelude::*;

use crate::activations::QuantActivations;
use crate::dispatch::{Isa, Path, Plan};
use crate::error::{Error, Result};
use crate::weights::{PackedWeights, WeightForm};

/// Rows per micro-kernel tile.
pub const MR: usize = 4;
/// Output channels per panel (one micro-kernel tile; AVX2 computes it as two 8-channel halves).
pub const NR: usize = 16;
/// Reduction steps per group (4 bytes per channel: one dword in a vector register).
pub const KGROUP: usize = 4;
/// Bytes of one expanded int8 group of a panel.
pub const GROUP_BYTES: usize = NR * KGROUP;

/// What happens after the integer product.
#[derive(Debug, Clone, Copy, Default)]
pub struct Epilogue<'a> {
    /// Added per output channel after rescaling.
    pub bias: Option<&'a [f32]>,
    /// Added element-wise after the bias, before the activation (a residual connection);
    /// same `[M, N]` layout as the output.
    pub residual: Option<&'a [f32]>,
    /// Clamp negatives to 0.
    pub relu: bool,
}

impl Epilogue<'_> {
    /// Checks the bias (`channels` values) and residual (`len` values): lengths and finiteness.
    pub(crate) fn validate(&self, channels: usize, len: usize) -> Result<()> {
        for (what, values, want) in [
            ("bias", self.bias, channels),
            ("residual", self.residual, len),
        ] {
            let Some(v) = values else { continue };
            if v.len() != want {
                return Err(Error::Shape(format!(
                    "{what} has {} values, needs {want}",
                    v.len()
                )));
            }
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(Error::Core(asq_core::Error::NonFinite {
                    what,
                    value: v[i],
                    index: i,
                }));
            }
        }
        Ok(())
    }

    /// Bias and residual contributions at output `(row, col)` of an `n`-column output.
    #[inline(always)]
    pub(crate) fn extra(&self, row: usize, col: usize, n: usize) -> (f32, f32) {
        (
            self.bias.map_or(0.0, |b| b[col]),
            self.residual.map_or(0.0, |r| r[row * n + col]),
        )
    }
}

/// Problems smaller than this many multiply-adds run on one thread.
pub const PARALLEL_MIN_MACS: usize = 1 << 20;

/// Final rescale of one accumulator (the only place outputs are formed).
#[inline(always)]
pub(crate) fn finish(
    acc: f32,
    a_scale: f32,
    w_scale: f32,
    bias: f32,
    residual: f32,
    relu: bool,
) -> f32 {
    let v = acc * (a_scale * w_scale) + bias + residual;
    if relu {
        v.max(0.0)
    } else {
        v
    }
}

/// `acc` of the exact POST form from its even and odd sums.
#[inline(always)]
pub(crate) fn post_acc(even: i32, odd: i32) -> f32 {
    even as f32 + odd as f32 * std::f32::consts::FRAC_1_SQRT_2
}

/// Checks operands and the i32 overflow bound; returns the plan of `isa` for them.
pub(crate) fn check(
    a: &QuantActivations,
    w: &PackedWeights,
    epi: &Epilogue<'_>,
    out: &[f32],
    isa: Isa,
) -> Result<Plan> {
    if a.cols() != w.cols() {
        return Err(Error::Shape(format!(
            "activations have K = {}, weights K = {}",
            a.cols(),
            w.cols()
        )));
    }
    if out.len() != a.rows() * w.rows() {
        return Err(Error::Shape(format!(
            "output has {} values, [{}, {}] needs {}",
            out.len(),
            a.rows(),
            w.rows(),
            a.rows() * w.rows()
        )));
    }
    epi.validate(w.rows(), out.len())?;
    let bound = a.max_abs() as u64 * w.form().max_abs() as u64 * w.groups() as u64 * KGROUP as u64;
    if bound > i32::MAX as u64 {
        return Err(Error::Overflow(format!(
            "K = {} with |a| <= {} and |w| <= {} can exceed i32",
            a.cols(),
            a.max_abs(),
            w.form().max_abs()
        )));
    }
    Plan::new(isa, a, w)
}

/// A raw output pointer shared by tasks that write disjoint columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint (row, column) blocks; see `gemm_planned`.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Runs the blocked GEMM with an already checked plan.
pub(crate) fn gemm_planned(
    plan: &Plan,
    a: &QuantActivations,
    w: &PackedWeights,
    epi: &Epilogue<'_>,
    out: &mut [f32],
) {
    let panels = w.panels();
    let macs = a.rows() * w.rows() * w.cols();
    let threads = rayon::current_num_threads();
    let want = if macs >= PARALLEL_MIN_MACS && threads > 1 {
        threads * 4
    } else {
        1
    };
    // Split the channels first (no repeated expansion); when there are too few panels (small
    // C_out, e.g. the first convs of ResNet-20) split the rows too.
    let split_n = want.min(panels);
    let tiles = a.rows().div_ceil(MR);
    let split_m = want.div_ceil(split_n).min(tiles);
    let ptr = OutPtr(out.as_mut_ptr());
    let run = |t: usize| {
        let (tn, tm) = (t % split_n, t / split_n);
        let (p0, p1) = (panels * tn / split_n, panels * (tn + 1) / split_n);
        let (t0, t1) = (tiles * tm / split_m, tiles * (tm + 1) / split_m);
        run_panels(
            plan,
            a,
            w,
            epi,
            ptr,
            p0..p1,
            t0 * MR..(t1 * MR).min(a.rows()),
        );
    };
    for_tasks(split_n * split_m, run);
}

/// Runs `f(t)` for every task `t`, on the rayon pool when there is more than one.
fn for_tasks(tasks: usize, f: impl Fn(usize) + Send + Sync) {
    if tasks <= 1 {
        f(0);
    } else {
        (0..tasks).into_par_iter().for_each(f);
    }
}

/// The epilogue of one run of outputs: row `m`, columns `c0..c0 + acc.len()` (at most 16).
/// `odd` holds the odd-exponent sums of exact POST. The one place GEMM and GEMV form outputs.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn finish_run(
    out: OutPtr,
    w: &PackedWeights,
    epi: &Epilogue<'_>,
    a_scale: f32,
    m: usize,
    c0: usize,
    acc: &[i32],
    odd: Option<&[i32]>,
) {
    let (n, cols) = (w.rows(), acc.len());
    let base = m * n + c0;
    let mut vals = [0.0f32; NR];
    if cols == NR {
        // A whole panel: fixed-size arrays and no options inside the loop, so it vectorizes
        // (same operations in the same order as below: the same bits).
        let full = |s: &[f32]| -> [f32; NR] { s.try_into().expect("16 values") };
        let ws = full(&w.scales()[c0..c0 + NR]);
        let zeros = [0.0f32; NR];
        let b = epi.bias.map_or(zeros, |b| full(&b[c0..c0 + NR]));
        let r = epi.residual.map_or(zeros, |v| full(&v[base..base + NR]));
        let mut a = [0.0f32; NR];
        match odd {
            Some(o) => {
                for j in 0..NR {
                    a[j] = post_acc(acc[j], o[j]);
                }
            }
            None => {
                for j in 0..NR {
                    a[j] = acc[j] as f32;
                }
            }
        }
        for j in 0..NR {
            vals[j] = finish(a[j], a_scale, ws[j], b[j], r[j], epi.relu);
        }
    } else {
        let ws = &w.scales()[c0..c0 + cols];
        let bias = epi.bias.map(|b| &b[c0..c0 + cols]);
        let res = epi.residual.map(|v| &v[base..base + cols]);
        for j in 0..cols {
            let accf = match odd {
                Some(o) => post_acc(acc[j], o[j]),
                None => acc[j] as f32,
            };
            let b = bias.map_or(0.0, |b| b[j]);
            let r = res.map_or(0.0, |v| v[j]);
            vals[j] = finish(accf, a_scale, ws[j], b, r, epi.relu);
        }
    }
    store_run(out, base, &vals[..cols]);
}

/// Writes `vals` at `out[i..i + vals.len()]`.
#[inline(always)]
fn store_run(out: OutPtr, i: usize, vals: &[f32]) {
    // SAFETY: `i + vals.len() <= M · N` (a row's columns c0..c0 + cols with c0 + cols <= N,
    // shapes checked by `check`), and the (row, column) block belongs to this task alone.
    unsafe {
        let dst = out.0.add(i);
        for (j, &v) in vals.iter().enumerate() {
            dst.add(j).write(v);
        }
    }
}

fn run_panels(
    plan: &Plan,
    a: &QuantActivations,
    w: &PackedWeights,
    epi: &Epilogue<'_>,
    out: OutPtr,
    panels: std::ops::Range<usize>,
    rows: std::ops::Range<usize>,
) {
    let groups = w.groups();
    let n = w.rows();
    let two = matches!(w.form(), WeightForm::PostExact { .. });
    let mut buf = vec![0i8; groups * GROUP_BYTES * if two { 2 } else { 1 }];
    let (first, second) = match w.form() {
        WeightForm::Int8 { table } => (table.as_slice(), None),
        WeightForm::PostExact { even, odd } => (even.as_slice(), Some(odd.as_slice())),
    };
    let mut acc = [[0i32; NR]; MR];
    let mut acc2 = [[0i32; NR]; MR];
    for p in panels {
        let (b1, b2) = buf.split_at_mut(groups * GROUP_BYTES);
        plan.expand(w.panel(p), w.bits(), first, b1);
        let corr1 = plan.correction(b1, groups);
        let mut corr2 = [0; NR];
        if let Some(t) = second {
            plan.expand(w.panel(p), w.bits(), t, b2);
            corr2 = plan.correction(b2, groups);
        }
        let (c0, cols) = (p * NR, NR.min(n - p * NR));
        for m0 in rows.clone().step_by(MR) {
            plan.tile(a, m0, b1, &corr1, &mut acc);
            if two {
                plan.tile(a, m0, b2, &corr2, &mut acc2);
            }
            for (r, row) in acc.iter().enumerate() {
                let m = m0 + r;
                if m >= a.rows() {
                    break;
                }
                let odd = two.then(|| &acc2[r][..cols]);
                finish_run(out, w, epi, a.scales()[m], m, c0, &row[..cols], odd);
            }
        }
    }
}

/// GEMV (one activation row) with in-register expansion, threads over panel ranges.
pub(crate) fn gemv_planned(
    plan: &Plan,
    a: &QuantActivations,
    w: &PackedWeights,
    epi: &Epilogue<'_>,
    out: &mut [f32],
) {
    let panels = w.panels();
    let n = w.rows();
    let threads = rayon::current_num_threads();
    let tasks = if n * w.cols() >= PARALLEL_MIN_MACS / 4 && threads > 1 {
        (threads * 2).min(panels)
    } else {
        1
    };
    let ptr = OutPtr(out.as_mut_ptr());
    let sa = a.scales()[0];
    let two = matches!(w.form(), WeightForm::PostExact { .. });
    for_tasks(tasks, |t| {
        let (p0, p1) = (panels * t / tasks, panels * (t + 1) / tasks);
        let mut acc = [0i32; NR];
        let mut acc2 = [0i32; NR];
        for p in p0..p1 {
            plan.gemv_panel(a, w, p, &mut acc, &mut acc2);
            let cols = NR.min(n - p * NR);
            finish_run(
                ptr,
                w,
                epi,
                sa,
                0,
                p * NR,
                &acc[..cols],
                two.then(|| &acc2[..cols]),
            );
        }
    });
}

/// Whether `path` can run GEMV with in-register expansion for these weights.
pub(crate) fn gemv_supported(path: Path, w: &PackedWeights) -> bool {
    matches!(
        path,
        Path::Avx2Maddubs { .. } | Path::Avx2Widen | Path::Avx512Vnni
    ) && matches!(w.bits().get(), 2 | 3 | 4 | 8)
}
