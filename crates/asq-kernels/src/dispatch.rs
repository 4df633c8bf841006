//! Instruction-set detection and the choice of integer path, made once per call from the
//! operand ranges (never from timing).

use std::sync::OnceLock;

use crate::activations::QuantActivations;
use crate::error::{Error, Result};
use crate::frame::{GROUP_BYTES, MR};
use crate::generic;
use crate::weights::{PackedWeights, WeightForm};

/// An instruction set the kernels have a variant for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable Rust: builds and runs everywhere; the reference the SIMD paths are tested against.
    Scalar,
    /// x86-64 AVX2 (`vpmaddubsw`/`vpmaddwd`, `vpshufb` table expansion).
    Avx2,
}

impl Isa {
    /// Every variant this build knows, portable first.
    pub const ALL: [Isa; 2] = [Isa::Scalar, Isa::Avx2];

    /// Short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
        }
    }

    /// Whether this CPU runs the variant.
    pub fn available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2"),
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 => false,
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
}

impl Path {
    /// Short name for reports.
    pub fn name(self) -> String {
        match self {
            Path::Scalar => "scalar".into(),
            Path::Avx2Maddubs { depth } => format!("avx2-maddubs-d{depth}"),
            Path::Avx2Widen => "avx2-widen".into(),
        }
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
    pub(crate) fn new(isa: Isa, a: &QuantActivations, w: &PackedWeights) -> Result<Self> {
        if !isa.available() {
            return Err(Error::UnsupportedIsa(isa.name()));
        }
        let path = match isa {
            Isa::Scalar => Path::Scalar,
            Isa::Avx2 => match maddubs_depth(a.max_abs(), w.form().max_abs(), a.is_signed()) {
                Some(depth) => Path::Avx2Maddubs { depth },
                None => Path::Avx2Widen,
            },
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
            signed_a: a.is_signed(),
            identity8,
        })
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
        if self.isa == Isa::Avx2
            && (matches!(bits.get(), 2..=4) || (bits.get() == 8 && self.identity8))
        {
            // SAFETY: Avx2 plans exist only when `Isa::Avx2.available()` (checked in `new`).
            unsafe { crate::x86::avx2::expand_panel(packed, bits, table, out) };
            return;
        }
        generic::expand_panel(packed, bits, table, out);
    }

    /// One tile: `acc[r][j] = sum_k a[m0 + r, k] · b[half·8 + j, k]`.
    pub(crate) fn tile(
        &self,
        a: &QuantActivations,
        m0: usize,
        panel: &[i8],
        half: usize,
        acc: &mut [[i32; 8]; MR],
    ) {
        let lda = a.stride();
        let groups = lda / 4;
        let rows = &a.codes()[m0 * lda..(m0 + MR) * lda];
        debug_assert!(panel.len() >= groups * GROUP_BYTES);
        match self.path {
            Path::Scalar => generic::tile(rows, lda, self.signed_a, panel, half, groups, acc),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: Avx2 paths are planned only when AVX2 was detected.
            Path::Avx2Maddubs { depth } => unsafe {
                crate::x86::avx2::tile_maddubs(rows, lda, panel, half, groups, depth, acc)
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Path::Avx2Widen => unsafe {
                crate::x86::avx2::tile_widen(rows, lda, self.signed_a, panel, half, groups, acc)
            },
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("x86 paths are never planned on other targets"),
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
