//! Instruction-set detection and the choice of integer path, made once per call from the
//! operand ranges (never from timing).

use std::sync::OnceLock;

use asq_core::{QuantRange, Signedness};

use crate::activations::{range_max_abs, QuantActivations};
use crate::error::{Error, Result};
use crate::frame::{seg_extent, Seg, TileShape, GROUP_BYTES, MR, NR};
use crate::generic;
use crate::weights::{PackedWeights, WeightForm};

/// An instruction set the kernels have a variant for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable Rust: builds and runs everywhere; the reference the SIMD paths are tested against.
    Scalar,
    /// x86-64 AVX2 (`vpmaddubsw`/`vpmaddwd`, `vpshufb` table expansion).
    Avx2,
    /// x86-64 AVX-512 with VNNI (`vpdpbusd` on 16 channels x 4 steps per instruction, 512-bit
    /// `vpshufb` table expansion); needs AVX-512 F, BW and VNNI (Ice Lake, Sapphire Rapids,
    /// Zen 4 and later).
    Avx512Vnni,
}

impl Isa {
    /// Every variant this build knows, portable first.
    pub const ALL: [Isa; 3] = [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni];

    /// Short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512-vnni",
        }
    }

    /// Whether this CPU runs the variant.
    pub fn available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 | Isa::Avx512Vnni => false,
        }
    }

    /// The variants this CPU runs.
    pub fn available_all() -> Vec<Isa> {
        Self::ALL.into_iter().filter(|i| i.available()).collect()
    }

    /// The fastest available variant, detected once per process.
    pub fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            *Self::available_all()
                .last()
                .expect("scalar is always available")
        })
    }
}

/// Largest number of `vpmaddubsw` results summed in i16 before widening.
pub const MAX_DEPTH: usize = 32;

/// The integer path of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Portable i32 loops.
    Scalar,
    /// `vpmaddubsw` (u8 x s8 pair sums in i16), `depth` of them added in i16 before one
    /// `vpmaddwd` widening. Legal only when `depth · 2 · max|a| · max|w| <= 32767`, so the
    /// saturating instruction provably never saturates and the i16 sums never wrap.
    Avx2Maddubs {
        /// i16 accumulation depth (>= 1).
        depth: usize,
    },
    /// Both operands widened to i16, `vpmaddwd`: exact for any int8 values, signed activations too.
    Avx2Widen,
    /// `vpdpbusd`: exact for any int8 weights; signed activations through the +128 offset.
    Avx512Vnni,
}

impl Path {
    /// Short name for reports.
    pub fn name(self) -> String {
        match self {
            Path::Scalar => "scalar".into(),
            Path::Avx2Maddubs { depth } => format!("avx2-maddubs-d{depth}"),
            Path::Avx2Widen => "avx2-widen".into(),
            Path::Avx512Vnni => "avx512-vnni".into(),
        }
    }
}

/// The AVX-512 VNNI tile for `rows` activation rows and a layer of `panels` panels: 8 rows x 2
/// panels (16 accumulator registers; the two panels' B block stays in L1 up to K = 1536), 8 x 1
/// for 16-channel layers, and 4 rows x up to 4 panels when the problem has at most 4 rows (its
/// storage holds 4). Wider tiles were measured slower or spilled registers (docs/kernels.md).
pub(crate) fn vnni_shape(rows: usize, panels: usize) -> TileShape {
    let panels = panels.min(4);
    if rows <= MR {
        // Storage holds 4 rows (`padded_rows`).
        return TileShape { rows: MR, panels };
    }
    match panels {
        1 => TileShape { rows: 8, panels: 1 },
        _ => TileShape { rows: 8, panels: 2 },
    }
}

/// The kernel choice for one (activations, weights) pair.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Instruction set.
    pub isa: Isa,
    /// Integer path.
    pub path: Path,
    signed_a: bool,
    identity8: bool,
    /// Test builds only: run the VNNI kernels on the portable model of the instructions.
    emulated: bool,
}

/// The i16 depth allowed by the operand ranges, if `vpmaddubsw` is exact at all.
pub fn maddubs_depth(max_a: u32, max_w: u32, signed_a: bool) -> Option<usize> {
    if signed_a {
        return None;
    }
    let pair = 2 * max_a as usize * max_w.max(1) as usize;
    let depth = 32767 / pair.max(1);
    (depth >= 1).then_some(depth.min(MAX_DEPTH))
}

impl Plan {
    /// The plan of `isa` for activations of `range` times weights `w`.
    pub(crate) fn new(isa: Isa, range: QuantRange, w: &PackedWeights) -> Result<Self> {
        if !isa.available() {
            return Err(Error::UnsupportedIsa(isa.name()));
        }
        let signed_a = matches!(range.signedness(), Signedness::Signed);
        let path = match isa {
            Isa::Scalar => Path::Scalar,
            Isa::Avx2 => match maddubs_depth(range_max_abs(range), w.form().max_abs(), signed_a) {
                Some(depth) => Path::Avx2Maddubs { depth },
                None => Path::Avx2Widen,
            },
            Isa::Avx512Vnni => Path::Avx512Vnni,
        };
        let identity8 = match w.form() {
            WeightForm::Int8 { table } => {
                table.iter().enumerate().all(|(c, &v)| v == c as u8 as i8)
            }
            WeightForm::PostExact { .. } => false,
        };
        Ok(Self {
            isa,
            path,
            signed_a,
            identity8,
            emulated: false,
        })
    }

    /// The VNNI plan on the portable model of its instructions, on any CPU (tests only).
    #[cfg(all(test, target_arch = "x86_64"))]
    pub(crate) fn emulated_vnni(range: QuantRange, w: &PackedWeights) -> Result<Self> {
        let mut plan = Self::new(Isa::Scalar, range, w)?;
        plan.isa = Isa::Avx512Vnni;
        plan.path = Path::Avx512Vnni;
        plan.emulated = true;
        Ok(plan)
    }

    /// The per-channel term the micro-kernel subtracts for an expanded panel `b`: `128 · sum_k w`
    /// on the VNNI path with signed activations (their +128 offset), else zeros.
    pub(crate) fn correction(&self, b: &[i8], groups: usize) -> [i32; 16] {
        #[cfg(target_arch = "x86_64")]
        if self.path == Path::Avx512Vnni && self.signed_a {
            return crate::x86::avx512::offset_correction(b, groups);
        }
        let _ = (b, groups);
        [0; 16]
    }

    /// Whether the GEMV kernel with in-register expansion handles these weights.
    pub(crate) fn has_gemv(&self, w: &PackedWeights) -> bool {
        crate::frame::gemv_supported(self.path, w) && (w.bits().get() != 8 || self.identity8)
    }

    /// Expands one packed panel into `[groups][64]` int8 values through `table`.
    pub(crate) fn expand(
        &self,
        packed: &[u8],
        bits: asq_core::BitWidth,
        table: &[i8],
        out: &mut [i8],
    ) {
        #[cfg(target_arch = "x86_64")]
        if matches!(self.isa, Isa::Avx2 | Isa::Avx512Vnni)
            && !self.emulated
            && (matches!(bits.get(), 2..=4) || (bits.get() == 8 && self.identity8))
        {
            // SAFETY: Avx2 and Avx512Vnni plans exist only when the CPU has AVX2 (`new` checks
            // `available`, which for Avx512Vnni includes AVX2); emulated plans never get here.
            unsafe { crate::x86::avx2::expand_panel(packed, bits, table, out) };
            return;
        }
        generic::expand_panel(packed, bits, table, out);
    }

    /// Whether whole 16-channel runs of outputs go through the AVX-512 epilogue (the same
    /// operations as [`crate::frame::finish`], lane-wise: the same bits).
    pub(crate) fn simd_epilogue(&self) -> bool {
        self.path == Path::Avx512Vnni && !self.emulated
    }

    /// The micro-kernel tile of this plan for weights `w`: the variant's own shape (4 rows x 1
    /// panel for the portable and AVX2 kernels; for AVX-512 VNNI 8 rows x 2 panels (see `vnni_shape`), or 8 x 1 for
    /// exact POST on 16-channel layers, whose two products then run in one pass).
    pub fn shape(&self, rows: usize, w: &PackedWeights) -> TileShape {
        let two = matches!(w.form(), WeightForm::PostExact { .. });
        match self.path {
            // Exact POST on 16-channel layers runs both products in one kernel (8 rows x 1
            // panel x 2 = 16 accumulators); wider layers run the two products one after the
            // other on 8 x 2 tiles (measured faster than a fused 4 x 2 tile on the Xeon).
            Path::Avx512Vnni if two && w.panels() == 1 => TileShape {
                rows: if rows > MR { 8 } else { 4 },
                panels: 1,
            },
            Path::Avx512Vnni => vnni_shape(rows, w.panels()),
            _ => TileShape {
                rows: MR,
                panels: 1,
            },
        }
    }

    /// One tile: `acc[r · C + j] = sum_k a_r[k] · b[j, k] - corr[j]` for rows `r < tile.rows`
    /// and the `C = tile.channels()` channels of the expanded panels `panels` (`[tile.panels]
    /// [groups][64]`), `corr` from [`Plan::correction`] per panel. Row `r`'s codes are the runs
    /// `segs` from byte `r · lda` of `rows` (one run of all groups for a GEMM; one per window row
    /// for an implicit convolution). Rows from `valid` on are padding (read, results unused).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn tile(
        &self,
        rows: &[u8],
        lda: usize,
        segs: &[Seg],
        valid: usize,
        tile: TileShape,
        panels: &[i8],
        corr: &[i32],
        acc: &mut [i32],
    ) {
        let (groups, _) = seg_extent(segs);
        let pb = groups * GROUP_BYTES;
        let nc = tile.channels();
        debug_assert!(panels.len() >= tile.panels * pb && corr.len() >= nc);
        debug_assert!(acc.len() >= tile.rows * nc && (1..=tile.rows).contains(&valid));
        if self.path == Path::Avx512Vnni {
            #[cfg(target_arch = "x86_64")]
            {
                #[cfg(test)]
                if self.emulated {
                    // SAFETY: the portable model has no CPU requirement.
                    unsafe {
                        crate::x86::avx512::emulated::tile_block(
                            rows,
                            lda,
                            self.signed_a,
                            tile,
                            panels,
                            segs,
                            corr,
                            acc,
                        )
                    };
                    return;
                }
                // SAFETY: VNNI paths are planned only when `Isa::Avx512Vnni.available()`.
                unsafe {
                    crate::x86::avx512::native::tile_block(
                        rows,
                        lda,
                        self.signed_a,
                        tile,
                        panels,
                        segs,
                        corr,
                        acc,
                    )
                };
                return;
            }
        }
        // 4-row, 1-panel kernels, run per panel.
        debug_assert_eq!(tile.rows, MR);
        let mut block = [[0i32; NR]; MR];
        for q in 0..tile.panels {
            let panel = &panels[q * pb..(q + 1) * pb];
            self.tile4(rows, lda, segs, panel, &mut block);
            for (r, row) in block.iter().enumerate() {
                acc[r * nc + q * NR..r * nc + (q + 1) * NR].copy_from_slice(row);
            }
        }
    }

    /// Both products of exact POST on one tile: [`Plan::tile`] for the even and the odd
    /// expansion of the same panels (`panels[0]`, `panels[1]`), into `acc[0]` and `acc[1]`.
    /// AVX-512 VNNI runs them in one pass on one-panel tiles, each activation broadcast feeding
    /// both.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn tile2(
        &self,
        rows: &[u8],
        lda: usize,
        segs: &[Seg],
        valid: usize,
        tile: TileShape,
        panels: [&[i8]; 2],
        corr: [&[i32]; 2],
        acc: [&mut [i32]; 2],
    ) {
        #[cfg(target_arch = "x86_64")]
        if self.path == Path::Avx512Vnni && tile.panels == 1 {
            #[cfg(test)]
            if self.emulated {
                // SAFETY: the portable model has no CPU requirement.
                unsafe {
                    crate::x86::avx512::emulated::tile_block2(
                        rows,
                        lda,
                        self.signed_a,
                        tile,
                        panels,
                        segs,
                        corr,
                        acc,
                    )
                };
                return;
            }
            // SAFETY: VNNI paths are planned only when `Isa::Avx512Vnni.available()`.
            unsafe {
                crate::x86::avx512::native::tile_block2(
                    rows,
                    lda,
                    self.signed_a,
                    tile,
                    panels,
                    segs,
                    corr,
                    acc,
                )
            };
            return;
        }
        let [acc1, acc2] = acc;
        self.tile(rows, lda, segs, valid, tile, panels[0], corr[0], acc1);
        self.tile(rows, lda, segs, valid, tile, panels[1], corr[1], acc2);
    }

    /// The portable and AVX2 micro-kernels: 4 rows x one panel of 16 channels.
    fn tile4(
        &self,
        rows: &[u8],
        lda: usize,
        segs: &[Seg],
        panel: &[i8],
        acc: &mut [[i32; NR]; MR],
    ) {
        match self.path {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: Avx2 paths are planned only when AVX2 was detected.
            Path::Avx2Maddubs { depth } => unsafe {
                for half in 0..2 {
                    crate::x86::avx2::tile_maddubs(rows, lda, panel, half, segs, depth, acc);
                }
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Path::Avx2Widen => unsafe {
                for half in 0..2 {
                    crate::x86::avx2::tile_widen(rows, lda, self.signed_a, panel, half, segs, acc);
                }
            },
            _ => {
                for half in 0..2 {
                    generic::tile(rows, lda, self.signed_a, panel, half, segs, acc);
                }
            }
        }
    }

    /// Panels per call of [`Plan::gemv_block`]: four for AVX-512 VNNI (one activation
    /// broadcast feeds four panels), one elsewhere.
    pub(crate) fn gemv_panels(&self) -> usize {
        if self.path == Path::Avx512Vnni {
            4
        } else {
            1
        }
    }

    /// GEMV of panels `p..p + np` (`np <= gemv_panels()`): `acc[16q + j]` (and `acc2` for exact
    /// POST) for panel `p + q`.
    pub(crate) fn gemv_block(
        &self,
        a: &QuantActivations,
        w: &PackedWeights,
        p: usize,
        np: usize,
        acc: &mut [i32; 64],
        acc2: &mut [i32; 64],
    ) {
        #[cfg(target_arch = "x86_64")]
        if self.path == Path::Avx512Vnni {
            let (t1, t2) = match w.form() {
                WeightForm::Int8 { table } => (table.as_slice(), None),
                WeightForm::PostExact { even, odd } => (even.as_slice(), Some(odd.as_slice())),
            };
            let row = &a.codes()[..a.stride()];
            // The panels are stored back to back.
            let len = w.panel(p).len();
            let first = p * len;
            let all = w.panels_data();
            let panels = &all[first..first + np * len];
            #[cfg(test)]
            if self.emulated {
                // SAFETY: the portable model has no CPU requirement.
                unsafe {
                    crate::x86::avx512::emulated::gemv_panels(
                        row,
                        self.signed_a,
                        panels,
                        np,
                        w.bits(),
                        t1,
                        t2,
                        w.groups(),
                        acc,
                        acc2,
                    )
                };
                return;
            }
            // SAFETY: VNNI paths are planned only when `Isa::Avx512Vnni.available()`.
            unsafe {
                crate::x86::avx512::native::gemv_panels(
                    row,
                    self.signed_a,
                    panels,
                    np,
                    w.bits(),
                    t1,
                    t2,
                    w.groups(),
                    acc,
                    acc2,
                )
            };
            return;
        }
        for q in 0..np {
            let (mut x, mut y) = ([0i32; NR], [0i32; NR]);
            self.gemv_panel(a, w, p + q, &mut x, &mut y);
            acc[q * NR..(q + 1) * NR].copy_from_slice(&x);
            acc2[q * NR..(q + 1) * NR].copy_from_slice(&y);
        }
    }

    /// GEMV of panel `p`: `acc[j]` (and `acc2[j]` for exact POST) for its 16 channels.
    pub(crate) fn gemv_panel(
        &self,
        a: &QuantActivations,
        w: &PackedWeights,
        p: usize,
        acc: &mut [i32; 16],
        acc2: &mut [i32; 16],
    ) {
        let row = &a.codes()[..a.stride()];
        let (t1, t2) = match w.form() {
            WeightForm::Int8 { table } => (table.as_slice(), None),
            WeightForm::PostExact { even, odd } => (even.as_slice(), Some(odd.as_slice())),
        };
        match self.path {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: Avx2 paths are planned only when AVX2 was detected.
            Path::Avx2Maddubs { depth } => unsafe {
                crate::x86::avx2::gemv(
                    row,
                    false,
                    w.panel(p),
                    w.bits(),
                    t1,
                    t2,
                    w.groups(),
                    Some(depth),
                    acc,
                    acc2,
                )
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Path::Avx2Widen => unsafe {
                crate::x86::avx2::gemv(
                    row,
                    self.signed_a,
                    w.panel(p),
                    w.bits(),
                    t1,
                    t2,
                    w.groups(),
                    None,
                    acc,
                    acc2,
                )
            },
            _ => unreachable!("GEMV is only planned for SIMD paths"),
        }
    }
}
