//! Packed low-bit weights: codes in kernel tiles, a code -> integer table, per-channel scales.
//!
//! A `[N, K]` weight matrix (row = output channel) is cut into panels of [`NR`] channels and
//! tiles of 4 reduction steps ([`crate::tile`]); `N` and `K` are padded with code 0, which
//! every supported table maps to 0. Two integer forms:
//!
//! - [`WeightForm::Int8`]: levels on an integer grid (uniform int, POT up to 4 bits, the
//!   integer-grid POST, APoT): weight = `scale_c · table[code]`, one i32 accumulator, exact.
//! - [`WeightForm::PostExact`]: exact POST up to 4 bits: weight =
//!   `scale_c · (even[code] + odd[code] / √2)`, two i32 accumulators (even and odd exponents),
//!   combined once per output.
//!
//! [`PackedWeights::to_bytes`] / [`PackedWeights::from_bytes`] serialize them with a magic
//! number, a version and full validation (see docs/formats in the repository).

use asq_core::lut::{Int8Lut, PostSplit};
use asq_core::pack::packed_len;
use asq_core::quant::{IntGrid, Steps};
use asq_core::{BitWidth, LevelKind, LevelSet, QuantRange, Signedness};

use crate::error::{Error, Result};
use crate::frame::{KGROUP, NR};
use crate::tile::{pack_tile, tile_bytes, unpack_tile, TILE_CODES};

/// How codes become integers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightForm {
    /// One table: `value = table[code]`.
    Int8 {
        /// `2^b` entries.
        table: Vec<i8>,
    },
    /// Exact POST: `value = even[code] + odd[code] / √2`.
    PostExact {
        /// `2^b` entries, even exponents.
        even: Vec<i8>,
        /// `2^b` entries, odd exponents.
        odd: Vec<i8>,
    },
}

impl WeightForm {
    /// Largest `|entry|` over the table(s): decides which integer paths are exact.
    pub fn max_abs(&self) -> u32 {
        let m = |t: &[i8]| t.iter().map(|v| v.unsigned_abs() as u32).max().unwrap_or(0);
        match self {
            WeightForm::Int8 { table } => m(table),
            WeightForm::PostExact { even, odd } => m(even).max(m(odd)),
        }
    }
}

/// A `[N, K]` weight matrix in the kernels' packed layout.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedWeights {
    n: usize,
    k: usize,
    bits: BitWidth,
    form: WeightForm,
    scales: Vec<f32>,
    data: Vec<u8>,
}

const MAGIC: &[u8; 4] = b"ASQW";
const VERSION: u16 = 1;
/// Largest `N` or `K` accepted from a serialized buffer (guards allocations).
pub const MAX_DIM: usize = 1 << 24;

impl PackedWeights {
    /// Packs raw codes (`[n, k]`, row = output channel) quantized with a non-uniform level set
    /// and per-channel `alphas`. Sets on an integer grid use [`WeightForm::Int8`]; exact POST
    /// (up to 4 bits) uses [`WeightForm::PostExact`].
    pub fn from_level_codes(
        codes: &[u8],
        n: usize,
        k: usize,
        levels: &LevelSet,
        alphas: &[f32],
    ) -> Result<Self> {
        check_shape(codes.len(), n, k, alphas.len())?;
        asq_core::error::check_positive("alpha", alphas)?;
        let bits = levels.bits();
        let (form, scales) = match (levels.integer_grid(), levels.kind()) {
            (Some(_), _) => {
                let lut = Int8Lut::from_levels(levels)?;
                let g = lut.grid() as f32;
                (
                    WeightForm::Int8 {
                        table: lut.table().to_vec(),
                    },
                    alphas.iter().map(|a| a / g).collect(),
                )
            }
            (None, LevelKind::Post) => {
                let split = PostSplit::new(levels)?;
                let d = (1u32 << split.shift()) as f32;
                (
                    WeightForm::PostExact {
                        even: split.even().to_vec(),
                        odd: split.odd().to_vec(),
                    },
                    alphas.iter().map(|a| a / d).collect(),
                )
            }
            (None, kind) => {
                return Err(Error::Core(asq_core::Error::Unsupported(format!(
                    "{kind} levels at {bits} bits have no exact integer form"
                ))))
            }
        };
        for (i, &c) in codes.iter().enumerate() {
            if levels.decode(c).is_none() {
                return Err(Error::Core(asq_core::Error::Code {
                    code: c as u32,
                    bits: bits.get(),
                    index: i,
                }));
            }
        }
        Self::assemble(codes, n, k, bits, form, scales)
    }

    /// Packs raw codes of a signed uniform (LSQ or symmetric) quantizer with per-channel steps.
    pub fn from_uniform_codes(
        codes: &[u8],
        n: usize,
        k: usize,
        range: QuantRange,
        steps: &[f32],
    ) -> Result<Self> {
        check_shape(codes.len(), n, k, steps.len())?;
        asq_core::error::check_positive("step size", steps)?;
        if range.signedness() != Signedness::Signed {
            return Err(Error::Core(asq_core::Error::Unsupported(
                "uniform weights must be signed".into(),
            )));
        }
        let lut = Int8Lut::from_int_grid(&IntGrid::new(range))?;
        let bits = range.bits();
        if let Some(i) = codes.iter().position(|&c| c > bits.mask()) {
            return Err(Error::Core(asq_core::Error::Code {
                code: codes[i] as u32,
                bits: bits.get(),
                index: i,
            }));
        }
        Self::assemble(
            codes,
            n,
            k,
            bits,
            WeightForm::Int8 {
                table: lut.table().to_vec(),
            },
            steps.to_vec(),
        )
    }

    /// Quantizes float weights `[n, k]` with a level set and per-channel alphas, then packs.
    pub fn quantize_levels(
        w: &[f32],
        n: usize,
        k: usize,
        levels: &LevelSet,
        alphas: &[f32],
    ) -> Result<Self> {
        check_shape(w.len(), n, k, alphas.len())?;
        let mut codes = vec![0u8; w.len()];
        asq_core::quant::encode(levels, w, Steps::PerRow(alphas), &mut codes)?;
        Self::from_level_codes(&codes, n, k, levels, alphas)
    }

    fn assemble(
        codes: &[u8],
        n: usize,
        k: usize,
        bits: BitWidth,
        form: WeightForm,
        scales: Vec<f32>,
    ) -> Result<Self> {
        let panels = n.div_ceil(NR);
        let groups = k.div_ceil(KGROUP);
        let tb = tile_bytes(bits);
        let mut data = vec![0u8; panels * groups * tb];
        let mut tile = [0u8; TILE_CODES];
        for p in 0..panels {
            for g in 0..groups {
                for (j, t) in tile.iter_mut().enumerate() {
                    let (c, kk) = (p * NR + j / KGROUP, g * KGROUP + j % KGROUP);
                    *t = if c < n && kk < k {
                        codes[c * k + kk]
                    } else {
                        0
                    };
                }
                let off = (p * groups + g) * tb;
                pack_tile(&tile, bits, &mut data[off..off + tb]);
            }
        }
        Ok(Self {
            n,
            k,
            bits,
            form,
            scales,
            data,
        })
    }

    /// Output channels.
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Reduction length.
    pub fn cols(&self) -> usize {
        self.k
    }

    /// Code width.
    pub fn bits(&self) -> BitWidth {
        self.bits
    }

    /// Integer form.
    pub fn form(&self) -> &WeightForm {
        &self.form
    }

    /// Per-channel factors applied to the integer accumulator (`alpha / G`, `alpha / 2^shift`
    /// or the uniform step).
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// The same codes with new per-channel scales, for example with batch norm folded in
    /// (`scale · gamma / sqrt(var + eps)`). Any finite nonzero scale is accepted: a negative
    /// gamma legitimately flips a channel.
    pub fn with_scales(mut self, scales: Vec<f32>) -> Result<Self> {
        if scales.len() != self.n {
            return Err(Error::Shape(format!(
                "{} scales for {} channels",
                scales.len(),
                self.n
            )));
        }
        if let Some(i) = scales.iter().position(|s| !s.is_finite() || *s == 0.0) {
            return Err(Error::Core(asq_core::Error::Step {
                what: "weight scale",
                value: scales[i],
                index: i,
            }));
        }
        self.scales = scales;
        Ok(self)
    }

    /// Number of 4-step groups per panel (`ceil(K / 4)`).
    pub fn groups(&self) -> usize {
        self.k.div_ceil(KGROUP)
    }

    /// Packed bytes of panel `p` (all its tiles, in reduction order).
    pub fn panel(&self, p: usize) -> &[u8] {
        let len = self.groups() * tile_bytes(self.bits);
        &self.data[p * len..(p + 1) * len]
    }

    /// Every panel's packed tiles, back to back (panel `p` at `p · panel(0).len()`).
    pub(crate) fn panels_data(&self) -> &[u8] {
        &self.data[..self.panels() * self.groups() * tile_bytes(self.bits)]
    }

    /// Number of panels.
    pub fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }

    /// Bytes of packed codes (what a GEMV streams from memory).
    pub fn code_bytes(&self) -> usize {
        self.data.len()
    }

    /// Raw code of channel `c`, reduction index `kk`.
    pub fn code(&self, c: usize, kk: usize) -> u8 {
        let (p, g) = (c / NR, kk / KGROUP);
        let tb = tile_bytes(self.bits);
        let off = (p * self.groups() + g) * tb;
        let mut tile = [0u8; TILE_CODES];
        unpack_tile(&self.data[off..off + tb], self.bits, &mut tile);
        tile[(c % NR) * KGROUP + kk % KGROUP]
    }

    /// All raw codes, `[n, k]` row-major (the inverse of packing; one pass over the tiles).
    pub fn codes(&self) -> Vec<u8> {
        let (n, k, groups) = (self.n, self.k, self.groups());
        let tb = tile_bytes(self.bits);
        let mut out = vec![0u8; n * k];
        let mut tile = [0u8; TILE_CODES];
        for p in 0..self.panels() {
            for g in 0..groups {
                let off = (p * groups + g) * tb;
                unpack_tile(&self.data[off..off + tb], self.bits, &mut tile);
                for (j, &code) in tile.iter().enumerate() {
                    let (c, kk) = (p * NR + j / KGROUP, g * KGROUP + j % KGROUP);
                    if c < n && kk < k {
                        out[c * k + kk] = code;
                    }
                }
            }
        }
        out
    }

    /// Serializes: magic `ASQW`, version, form, bits, N, K, tables, scales, packed codes; all
    /// integers little-endian.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.data.len() + 4 * self.n);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        let (tag, tables): (u8, Vec<&[i8]>) = match &self.form {
            WeightForm::Int8 { table } => (0, vec![table]),
            WeightForm::PostExact { even, odd } => (1, vec![even, odd]),
        };
        out.push(tag);
        out.push(self.bits.get() as u8);
        out.extend_from_slice(&(self.n as u64).to_le_bytes());
        out.extend_from_slice(&(self.k as u64).to_le_bytes());
        for t in tables {
            out.extend(t.iter().map(|&v| v as u8));
        }
        for s in &self.scales {
            out.extend_from_slice(&s.to_le_bytes());
        }
        out.extend_from_slice(&(self.data.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.data);
        out
    }

    /// Parses [`PackedWeights::to_bytes`] output, rejecting anything truncated, oversized or
    /// inconsistent before allocating from a length field.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader { bytes, pos: 0 };
        if r.take(4)? != MAGIC {
            return Err(Error::Format(
                "bad magic number (not an asq packed weight buffer)".into(),
            ));
        }
        let version = u16::from_le_bytes(r.take(2)?.try_into().expect("2 bytes"));
        if version != VERSION {
            return Err(Error::Format(format!(
                "unsupported version {version} (this build reads {VERSION})"
            )));
        }
        let tag = r.take(1)?[0];
        let bits = BitWidth::new(r.take(1)?[0] as u32).map_err(|e| Error::Format(e.to_string()))?;
        let n = r.u64()? as usize;
        let k = r.u64()? as usize;
        if n == 0 || k == 0 || n > MAX_DIM || k > MAX_DIM {
            return Err(Error::Format(format!(
                "shape [{n}, {k}] outside 1..={MAX_DIM}"
            )));
        }
        let codes = bits.code_count();
        let mut table =
            || -> Result<Vec<i8>> { Ok(r.take(codes)?.iter().map(|&b| b as i8).collect()) };
        let form = match tag {
            0 => WeightForm::Int8 { table: table()? },
            1 => {
                if bits.get() > 4 {
                    return Err(Error::Format(format!(
                        "exact POST form with {bits} bits (at most 4)"
                    )));
                }
                let even = table()?;
                let odd = table()?;
                if even.iter().zip(&odd).any(|(e, o)| *e != 0 && *o != 0) {
                    return Err(Error::Format("exact POST tables overlap".into()));
                }
                WeightForm::PostExact { even, odd }
            }
            t => return Err(Error::Format(format!("unknown weight form {t}"))),
        };
        let scale_bytes = r.take(
            n.checked_mul(4)
                .ok_or_else(|| Error::Format("scale count overflows".into()))?,
        )?;
        let scales: Vec<f32> = scale_bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4")))
            .collect();
        if let Some(i) = scales.iter().position(|s| !s.is_finite() || *s == 0.0) {
            return Err(Error::Format(format!(
                "weight scale {} of channel {i} is not finite and nonzero",
                scales[i]
            )));
        }
        let expect = n.div_ceil(NR) * k.div_ceil(KGROUP) * tile_bytes(bits);
        let len = r.u64()?;
        if len != expect as u64 {
            return Err(Error::Format(format!(
                "code section is {len} bytes, shape [{n}, {k}] at {bits} bits needs {expect}"
            )));
        }
        let data = r.take(expect)?.to_vec();
        if r.pos != bytes.len() {
            return Err(Error::Format(format!(
                "{} trailing bytes",
                bytes.len() - r.pos
            )));
        }
        let w = Self {
            n,
            k,
            bits,
            form,
            scales,
            data,
        };
        w.check_padding()?;
        Ok(w)
    }

    /// Padded positions must hold code 0 (they are summed by the kernels).
    fn check_padding(&self) -> Result<()> {
        let groups = self.groups();
        let tb = tile_bytes(self.bits);
        let mut tile = [0u8; TILE_CODES];
        for p in 0..self.panels() {
            for g in 0..groups {
                let edge_c = (p + 1) * NR > self.n;
                let edge_k = (g + 1) * KGROUP > self.k;
                if !(edge_c || edge_k) {
                    continue;
                }
                let off = (p * groups + g) * tb;
                unpack_tile(&self.data[off..off + tb], self.bits, &mut tile);
                for (j, &t) in tile.iter().enumerate() {
                    let (c, kk) = (p * NR + j / KGROUP, g * KGROUP + j % KGROUP);
                    if (c >= self.n || kk >= self.k) && t != 0 {
                        return Err(Error::Format(format!(
                            "nonzero code in padding (channel {c}, index {kk})"
                        )));
                    }
                }
            }
        }
        Ok(())
    }
}

fn check_shape(len: usize, n: usize, k: usize, scales: usize) -> Result<()> {
    if n == 0 || k == 0 || len != n * k || scales != n {
        return Err(Error::Shape(format!(
            "weights: {len} codes and {scales} scales for [{n}, {k}]"
        )));
    }
    Ok(())
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(len)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                Error::Format(format!(
                    "truncated: need {len} bytes at offset {}, have {}",
                    self.pos,
                    self.bytes.len() - self.pos
                ))
            })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
}

/// Bytes a `[n, k]` matrix of `bits`-bit codes takes when plainly bit-packed (for reports).
pub fn plain_packed_bytes(n: usize, k: usize, bits: BitWidth) -> usize {
    packed_len(n * k, bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> PackedWeights {
        let levels = LevelSet::post(BitWidth::new(4).unwrap()).unwrap();
        let (n, k) = (19, 13);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7) % 23) as f32 / 11.0 - 1.0)
            .collect();
        PackedWeights::quantize_levels(&w, n, k, &levels, &vec![0.8; n]).unwrap()
    }

    #[test]
    fn codes_survive_packing() {
        let levels = LevelSet::post_int(BitWidth::new(3).unwrap(), 64).unwrap();
        let (n, k) = (17, 9);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 5) % 17) as f32 / 8.0 - 1.0)
            .collect();
        let mut codes = vec![0u8; n * k];
        asq_core::quant::encode(&levels, &w, Steps::PerRow(&vec![1.0; n]), &mut codes).unwrap();
        let p = PackedWeights::from_level_codes(&codes, n, k, &levels, &vec![1.0; n]).unwrap();
        for c in 0..n {
            for kk in 0..k {
                assert_eq!(p.code(c, kk), codes[c * k + kk]);
            }
        }
        assert_eq!(p.codes(), codes);
        assert!(matches!(p.form(), WeightForm::Int8 { .. }));
        assert_eq!(p.scales()[0], 1.0 / 64.0);
    }

    #[test]
    fn serialization_round_trips_and_rejects_corruption() {
        let p = sample();
        assert!(matches!(p.form(), WeightForm::PostExact { .. }));
        let bytes = p.to_bytes();
        assert_eq!(PackedWeights::from_bytes(&bytes).unwrap(), p);
        for cut in [0, 3, 5, 20, bytes.len() - 1] {
            assert!(
                matches!(
                    PackedWeights::from_bytes(&bytes[..cut]),
                    Err(Error::Format(_))
                ),
                "cut {cut}"
            );
        }
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(PackedWeights::from_bytes(&bad).is_err());
        let mut bad = bytes.clone();
        bad[7] = 9; // bits
        assert!(PackedWeights::from_bytes(&bad).is_err());
        let mut bad = bytes.clone();
        bad[8..16].copy_from_slice(&u64::MAX.to_le_bytes()); // hostile N
        assert!(PackedWeights::from_bytes(&bad).is_err());
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(PackedWeights::from_bytes(&extra).is_err());
        let mut bad = bytes.clone();
        let last = bad.len() - 1; // last tile holds padding of channels 19..32
        bad[last] = 0xff;
        assert!(
            matches!(PackedWeights::from_bytes(&bad), Err(Error::Format(m)) if m.contains("padding"))
        );
        let mut bad = bytes;
        let scale_at = 4 + 2 + 2 + 16 + 32;
        bad[scale_at..scale_at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(PackedWeights::from_bytes(&bad).is_err());
    }

    #[test]
    fn bad_shapes_and_codes_are_errors() {
        let levels = LevelSet::post(BitWidth::new(3).unwrap()).unwrap();
        assert!(PackedWeights::from_level_codes(&[0; 6], 2, 3, &levels, &[1.0]).is_err());
        assert!(PackedWeights::from_level_codes(&[0; 6], 2, 4, &levels, &[1.0; 2]).is_err());
        assert!(PackedWeights::from_level_codes(&[9; 6], 2, 3, &levels, &[1.0; 2]).is_err());
        assert!(PackedWeights::from_level_codes(&[0; 6], 2, 3, &levels, &[1.0, -1.0]).is_err());
        let post8 = LevelSet::post(BitWidth::new(8).unwrap()).unwrap();
        assert!(PackedWeights::from_level_codes(&[0; 6], 2, 3, &post8, &[1.0; 2]).is_err());
        let u = QuantRange::unsigned(4).unwrap();
        assert!(PackedWeights::from_uniform_codes(&[0; 6], 2, 3, u, &[1.0; 2]).is_err());
    }
}
