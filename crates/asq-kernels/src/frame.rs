//! The GEMM contract and the one blocked driver every kernel variant plugs into.
//!
//! `out[m, n] = act(acc[m, n] · (a_scale[m] · w_scale[n]) + bias[n] + residual[m, n])` with
//! `acc[m, n] = sum_k a[m, k] · value(w[n, k])` in exact i32 arithmetic (for exact POST:
//! `acc = E + O · (1/√2)`, from two i32 accumulators). The epilogue is written once, here, in
//! scalar code with a fixed operation order (no FMA), so every variant produces the same bits.
//!
//! The weights are packed in panels of [`NR`] channels (the tile layout of [`crate::tile`]). The
//! micro-kernel's tile is the variant's own: [`TileShape`] (`rows` x `panels · NR`), declared by
//! the plan ([`crate::dispatch::Plan::shape`]): the portable and AVX2 kernels work on 4 rows x 1
//! panel, the AVX-512 VNNI kernel on 8 rows x 2 panels (16 accumulator registers, enough
//! independent `vpdpbusd` chains to cover their latency at two per cycle). The driver expands the
//! packed codes of a tile's panels into an int8 buffer once per task (the variant's `expand`),
//! runs the micro-kernel over the rows and hands every finished row of 16 channels to the one
//! epilogue. Threads (rayon) take disjoint ranges of panels (and of rows when there are few
//! panels), so no expansion is repeated and no output element is shared.

use rayon::prelude::*;

use asq_core::QuantRange;

use crate::activations::{range_max_abs, QuantActivations};
use crate::dispatch::{Isa, Path, Plan};
use crate::error::{Error, Result};
use crate::weights::{PackedWeights, WeightForm};

/// Rows per tile of the portable and AVX2 micro-kernels, and the row padding of
/// [`QuantActivations`] (every kernel reads whole tiles of `MR` rows from padded storage; larger
/// tiles repeat the last valid row instead of reading past it).
pub const MR: usize = 4;
/// Output channels per packed panel (AVX2 computes one as two 8-channel halves).
pub const NR: usize = 16;
/// The largest tile any variant declares: rows and panels.
pub const MAX_TILE_ROWS: usize = 8;
/// See [`MAX_TILE_ROWS`].
pub const MAX_TILE_PANELS: usize = 4;

/// A micro-kernel's tile: `rows` activation rows x `panels` packed panels of [`NR`] channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileShape {
    /// Rows (`1..=MAX_TILE_ROWS`).
    pub rows: usize,
    /// Panels (`1..=MAX_TILE_PANELS`).
    pub panels: usize,
}

impl TileShape {
    /// Output channels of the tile.
    pub const fn channels(self) -> usize {
        self.panels * NR
    }
}
/// Reduction steps per group (4 bytes per channel: one dword in a vector register).
pub const KGROUP: usize = 4;

/// One contiguous run of a tile row's reduction: `groups` groups of [`KGROUP`] codes starting at
/// byte `off` of the row, multiplying the weight groups that follow the previous runs' groups.
/// A GEMM row is one run (`off` 0, all groups); a row of an implicit convolution is one run per
/// window row (the `KW·C` codes of the padded input under it), see [`crate::conv`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Seg {
    /// First byte of the run, from the row's start.
    pub off: usize,
    /// Groups of 4 codes in the run.
    pub groups: usize,
}

/// Total groups of `segs` and the row bytes they reach (`max(off + 4·groups)`): what a kernel
/// checks its slices against.
pub(crate) fn seg_extent(segs: &[Seg]) -> (usize, usize) {
    segs.iter().fold((0, 0), |(g, end), s| {
        (g + s.groups, end.max(s.off + s.groups * KGROUP))
    })
}
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
            if let Some(i) = first_non_finite(v) {
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

/// The index of the first NaN or infinity in `v`. Blocks of 64 are tested without an early
/// exit (a loop the compiler vectorizes); only a block that fails is searched.
pub(crate) fn first_non_finite(v: &[f32]) -> Option<usize> {
    let block = v
        .chunks(64)
        .position(|c| !c.iter().fold(true, |ok, x| ok & x.is_finite()))?;
    let start = block * 64;
    v[start..]
        .iter()
        .position(|x| !x.is_finite())
        .map(|i| start + i)
}

/// Problems smaller than this many multiply-adds run on one thread.
pub const PARALLEL_MIN_MACS: usize = 1 << 20;

thread_local! {
    static SERIAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every kernel it calls on the calling thread alone (no rayon tasks): for
/// callers that parallelise at a coarser grain themselves, e.g. an inference engine that gives
/// each thread whole images. Results are the same bits either way.
pub fn serial<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            SERIAL.with(|s| s.set(self.0));
        }
    }
    let _restore = Restore(SERIAL.with(|s| s.replace(true)));
    f()
}

/// Threads the kernels may use from here: 1 inside [`serial`], else rayon's pool size.
pub fn threads() -> usize {
    if SERIAL.with(|s| s.get()) {
        1
    } else {
        rayon::current_num_threads()
    }
}

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
    // `v > 0 ? v : 0`: NaN and -0.0 become +0.0, exactly as `vmaxps(v, 0)` of the SIMD epilogue.
    if relu && v.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
        0.0
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
    check_parts(a.rows(), a.cols(), a.range(), w, epi, out, isa)
}

/// [`check`] for `m` activation rows of `k` codes in `range`, however they are stored.
pub(crate) fn check_parts(
    m: usize,
    k: usize,
    range: QuantRange,
    w: &PackedWeights,
    epi: &Epilogue<'_>,
    out: &[f32],
    isa: Isa,
) -> Result<Plan> {
    if k != w.cols() {
        return Err(Error::Shape(format!(
            "activations have K = {k}, weights K = {}",
            w.cols()
        )));
    }
    if out.len() != m * w.rows() {
        return Err(Error::Shape(format!(
            "output has {} values, [{m}, {}] needs {}",
            out.len(),
            w.rows(),
            m * w.rows()
        )));
    }
    epi.validate(w.rows(), out.len())?;
    let max_a = range_max_abs(range);
    let bound = max_a as u64 * w.form().max_abs() as u64 * w.groups() as u64 * KGROUP as u64;
    if bound > i32::MAX as u64 {
        return Err(Error::Overflow(format!(
            "K = {k} with |a| <= {max_a} and |w| <= {} can exceed i32",
            w.form().max_abs()
        )));
    }
    Plan::new(isa, range, w)
}

/// The activation side of the blocked driver: `M` rows of `K` codes, each with its scale.
pub(crate) enum Rows<'a> {
    /// `[M, K]` codes in padded row storage (a GEMM, or an explicit im2col).
    Dense(&'a QuantActivations),
    /// The rows of an implicit im2col of a padded NHWC input: read in place (see
    /// [`crate::conv::ImplicitConv`]).
    Conv(&'a crate::conv::ImplicitConv),
}

impl Rows<'_> {
    fn rows(&self) -> usize {
        match self {
            Rows::Dense(a) => a.rows(),
            Rows::Conv(c) => c.rows(),
        }
    }

    /// The scale of row `m`.
    #[inline]
    fn scale(&self, m: usize) -> f32 {
        match self {
            Rows::Dense(a) => a.scales()[m],
            Rows::Conv(c) => c.scale(m),
        }
    }

    /// The tile that starts at row `m0` and may reach row `end` (exclusive) with at most `max`
    /// rows: (its codes from the first row on, the row stride, the rows it really covers).
    /// An implicit convolution's tile stays within one output row (its rows are then equally
    /// spaced in the padded input).
    #[inline]
    fn tile(&self, m0: usize, end: usize, max: usize) -> (&[u8], usize, usize) {
        match self {
            Rows::Dense(a) => {
                let lda = a.stride();
                (&a.codes()[m0 * lda..], lda, max.min(end - m0))
            }
            Rows::Conv(c) => c.tile(m0, end, max),
        }
    }
}

/// A raw output pointer shared by tasks that write disjoint columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint (row, column) blocks; see `gemm_planned`.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Runs the blocked GEMM with an already checked plan over the activation rows `rows`: `out`
/// (and the epilogue's residual) hold those rows only, `rows.len() · N` values from row
/// `rows.start` on.
pub(crate) fn gemm_planned(
    plan: &Plan,
    a: Rows<'_>,
    rows: std::ops::Range<usize>,
    w: &PackedWeights,
    epi: &Epilogue<'_>,
    out: &mut [f32],
) {
    debug_assert!(rows.end <= a.rows() && out.len() == rows.len() * w.rows());
    let panels = w.panels();
    let m = rows.len();
    let macs = m * w.rows() * w.cols();
    let threads = threads();
    // Several tasks per thread balance large problems; small ones (a batch-1 layer) get one
    // task per thread, as each task costs a rayon hand-off and its own panel expansion.
    // Under 4M multiply-adds (a batch-1 ResNet-20 layer is 1.8M) splitting costs more than it
    // saves: measured 0.96x at batch 1 with two threads against 1.0x serial (the engine splits
    // batch-1 layers itself, see asq-models' `IntModel`).
    let want = if macs < 4 * PARALLEL_MIN_MACS || threads == 1 {
        1
    } else if macs < 16 * PARALLEL_MIN_MACS {
        threads
    } else {
        threads * 4
    };
    // Split the channels first (no repeated expansion), in whole tiles of panels; when there are
    // too few (small C_out, e.g. the first convs of ResNet-20) split the rows too.
    let shape = plan.shape(m, w);
    let one;
    let segs: &[Seg] = match &a {
        Rows::Dense(x) => {
            one = [Seg {
                off: 0,
                groups: x.stride() / KGROUP,
            }];
            &one
        }
        Rows::Conv(c) => c.segs(),
    };
    let blocks = panels.div_ceil(shape.panels);
    let split_n = want.min(blocks);
    let tiles = m.div_ceil(shape.rows);
    let split_m = want.div_ceil(split_n).min(tiles);
    let ptr = OutPtr(out.as_mut_ptr());
    let run = |t: usize| {
        let (tn, tm) = (t % split_n, t / split_n);
        let (b0, b1) = (blocks * tn / split_n, blocks * (tn + 1) / split_n);
        let (t0, t1) = (tiles * tm / split_m, tiles * (tm + 1) / split_m);
        run_panels(
            plan,
            shape,
            &a,
            segs,
            w,
            epi,
            ptr,
            (b0 * shape.panels)..(b1 * shape.panels).min(panels),
            rows.start,
            rows.start + t0 * shape.rows..(rows.start + t1 * shape.rows).min(rows.end),
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

/// The epilogue of one run of outputs: row `m` of `out` and of the residual (the row within
/// the call's rows), columns `c0..c0 + acc.len()` (at most 16).
/// `odd` holds the odd-exponent sums of exact POST. The one place GEMM and GEMV form outputs.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn finish_run(
    simd: bool,
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
    #[cfg(target_arch = "x86_64")]
    if simd && cols == NR {
        fn full(s: &[i32]) -> &[i32; NR] {
            s.try_into().expect("16 values")
        }
        let ws: &[f32; NR] = w.scales()[c0..c0 + NR].try_into().expect("16 values");
        let bias = epi
            .bias
            .map(|b| -> &[f32; NR] { b[c0..c0 + NR].try_into().expect("16") });
        let res = epi
            .residual
            .map(|v| -> &[f32; NR] { v[base..base + NR].try_into().expect("16") });
        // SAFETY: `simd` is set only for native AVX-512 plans (the CPU has AVX-512 F); the 16
        // outputs at `base` lie inside `out` and belong to this task (see `store_run`).
        unsafe {
            crate::x86::avx512::finish16(
                full(acc),
                odd.map(full),
                a_scale,
                ws,
                bias,
                res,
                epi.relu,
                out.0.add(base),
            )
        };
        return;
    }
    let _ = simd;
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

/// One task of the blocked GEMM: panels `panels` x activation rows `rows` (global row numbers;
/// `out` starts at row `base`).
#[allow(clippy::too_many_arguments)]
fn run_panels(
    plan: &Plan,
    shape: TileShape,
    a: &Rows<'_>,
    segs: &[Seg],
    w: &PackedWeights,
    epi: &Epilogue<'_>,
    out: OutPtr,
    panels: std::ops::Range<usize>,
    base: usize,
    rows: std::ops::Range<usize>,
) {
    let groups = w.groups();
    let n = w.rows();
    let simd = plan.simd_epilogue();
    let two = matches!(w.form(), WeightForm::PostExact { .. });
    let panel_bytes = groups * GROUP_BYTES;
    let block_bytes = panel_bytes * shape.panels;
    let mut buf = vec![0i8; block_bytes * if two { 2 } else { 1 }];
    let (first, second) = match w.form() {
        WeightForm::Int8 { table } => (table.as_slice(), None),
        WeightForm::PostExact { even, odd } => (even.as_slice(), Some(odd.as_slice())),
    };
    const MAX_CH: usize = MAX_TILE_PANELS * NR;
    let mut acc = [0i32; MAX_TILE_ROWS * MAX_CH];
    let mut acc2 = [0i32; MAX_TILE_ROWS * MAX_CH];
    let mut corr1 = [0i32; MAX_CH];
    let mut corr2 = [0i32; MAX_CH];
    let mut p = panels.start;
    while p < panels.end {
        let np = shape.panels.min(panels.end - p);
        let nc = np * NR;
        let (b1, b2) = buf.split_at_mut(block_bytes);
        for q in 0..np {
            let dst = &mut b1[q * panel_bytes..(q + 1) * panel_bytes];
            plan.expand(w.panel(p + q), w.bits(), first, dst);
            corr1[q * NR..(q + 1) * NR].copy_from_slice(&plan.correction(dst, groups));
            if let Some(t) = second {
                let dst = &mut b2[q * panel_bytes..(q + 1) * panel_bytes];
                plan.expand(w.panel(p + q), w.bits(), t, dst);
                corr2[q * NR..(q + 1) * NR].copy_from_slice(&plan.correction(dst, groups));
            }
        }
        let mut m0 = rows.start;
        while m0 < rows.end {
            let (codes, lda, valid) = a.tile(m0, rows.end, shape.rows);
            let tile = TileShape {
                rows: shape.rows,
                panels: np,
            };
            if two {
                plan.tile2(
                    codes,
                    lda,
                    segs,
                    valid,
                    tile,
                    [&*b1, &*b2],
                    [&corr1[..nc], &corr2[..nc]],
                    [&mut acc, &mut acc2],
                );
            } else {
                plan.tile(codes, lda, segs, valid, tile, b1, &corr1[..nc], &mut acc);
            }
            for r in 0..valid {
                let m = m0 + r;
                for q in 0..np {
                    let c0 = (p + q) * NR;
                    if c0 >= n {
                        break;
                    }
                    let cols = NR.min(n - c0);
                    let at = r * nc + q * NR;
                    let odd = two.then(|| &acc2[at..at + cols]);
                    finish_run(
                        simd,
                        out,
                        w,
                        epi,
                        a.scale(m),
                        m - base,
                        c0,
                        &acc[at..at + cols],
                        odd,
                    );
                }
            }
            m0 += valid;
        }
        p += np;
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
    let threads = threads();
    let tasks = if n * w.cols() >= PARALLEL_MIN_MACS / 4 && threads > 1 {
        (threads * 2).min(panels)
    } else {
        1
    };
    let ptr = OutPtr(out.as_mut_ptr());
    let sa = a.scales()[0];
    let simd = plan.simd_epilogue();
    let two = matches!(w.form(), WeightForm::PostExact { .. });
    let per = plan.gemv_panels();
    for_tasks(tasks, |t| {
        let (p0, p1) = (panels * t / tasks, panels * (t + 1) / tasks);
        let mut acc = [0i32; 4 * NR];
        let mut acc2 = [0i32; 4 * NR];
        let mut p = p0;
        while p < p1 {
            let np = per.min(p1 - p);
            plan.gemv_block(a, w, p, np, &mut acc, &mut acc2);
            for q in 0..np {
                let c0 = (p + q) * NR;
                let cols = NR.min(n - c0);
                let at = q * NR;
                finish_run(
                    simd,
                    ptr,
                    w,
                    epi,
                    sa,
                    0,
                    c0,
                    &acc[at..at + cols],
                    two.then(|| &acc2[at..at + cols]),
                );
            }
            p += np;
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

#[cfg(test)]
mod tests {
    #[test]
    fn first_non_finite_finds_the_first() {
        let mut v = vec![1.0f32; 300];
        assert_eq!(super::first_non_finite(&v), None);
        assert_eq!(super::first_non_finite(&[]), None);
        for (i, bad) in [
            (0, f32::NAN),
            (63, f32::INFINITY),
            (64, f32::NEG_INFINITY),
            (299, f32::NAN),
        ] {
            v[i] = bad;
            assert_eq!(super::first_non_finite(&v), Some(i));
            v[i] = 1.0;
        }
        v[200] = f32::NAN;
        v[130] = f32::INFINITY;
        assert_eq!(super::first_non_finite(&v), Some(130));
    }
}
