//! NumPy `.npy` files of little-endian `float32` in C order: what `numpy.save` writes for a
//! `float32` array, the exchange format of `asq predict`.
//!
//! Reading is strict and bounded: magic `\x93NUMPY`, version 1.0, 2.0 or 3.0, a header of at
//! most [`MAX_HEADER`] bytes holding a Python dict literal with exactly the keys `descr`
//! (`'<f4'`), `fortran_order` (`False`) and `shape` (a tuple of at most [`MAX_DIMS`]
//! dimensions), and a payload of exactly `4 · prod(shape)` bytes, at most [`MAX_VALUES`]
//! values. Anything else is a one-line error naming what is wrong; nothing
//! panics and nothing allocates before the sizes are checked.

use crate::error::{Error, Result};

/// Largest header accepted (NumPy pads headers to a multiple of 64; real ones are < 200 bytes).
pub const MAX_HEADER: usize = 1 << 16;
/// Most dimensions accepted.
pub const MAX_DIMS: usize = 8;
/// Most values accepted (1 GiB of f32).
pub const MAX_VALUES: usize = 1 << 28;

const MAGIC: &[u8] = b"\x93NUMPY";

/// An error message; [`parse_f32`] attaches the file name.
struct Bad(String);

fn bad(detail: impl Into<String>) -> Bad {
    Bad(detail.into())
}

/// Parses a `.npy` file of little-endian f32 in C order: `(shape, values)`; errors name `path`.
pub fn parse_f32(bytes: &[u8], path: &std::path::Path) -> Result<(Vec<usize>, Vec<f32>)> {
    parse(bytes).map_err(|Bad(detail)| Error::Format {
        path: path.to_path_buf(),
        detail,
    })
}

fn parse(bytes: &[u8]) -> std::result::Result<(Vec<usize>, Vec<f32>), Bad> {
    if bytes.len() < MAGIC.len() + 2 || &bytes[..MAGIC.len()] != MAGIC {
        return Err(bad("not a .npy file (no \\x93NUMPY magic)"));
    }
    let major = bytes[6];
    let (len_bytes, start) = match major {
        1 => (2, 10),
        2 | 3 => (4, 12),
        v => return Err(bad(format!("format version {v}.x is not 1, 2 or 3"))),
    };
    if bytes.len() < start {
        return Err(bad("truncated before the header length"));
    }
    let header_len = bytes[8..8 + len_bytes]
        .iter()
        .rev()
        .fold(0usize, |acc, &b| (acc << 8) | b as usize);
    if header_len > MAX_HEADER {
        return Err(bad(format!(
            "header of {header_len} bytes (more than {MAX_HEADER})"
        )));
    }
    let end = start + header_len;
    if bytes.len() < end {
        return Err(bad(format!(
            "truncated: header of {header_len} bytes, file of {}",
            bytes.len()
        )));
    }
    let header = std::str::from_utf8(&bytes[start..end])
        .map_err(|_| bad("header is not text"))?
        .trim_end_matches(['\n', ' ', '\0']);
    let shape = parse_header(header)?;
    let count = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&c| c <= MAX_VALUES)
        .ok_or_else(|| {
            bad(format!(
                "shape {shape:?} holds more than {MAX_VALUES} values"
            ))
        })?;
    let payload = &bytes[end..];
    if payload.len() != count * 4 {
        return Err(bad(format!(
            "shape {shape:?} needs {} bytes of data, the file has {}",
            count * 4,
            payload.len()
        )));
    }
    let values = payload
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok((shape, values))
}

/// The shape from a header dict; every other key and value must be the f32 C-order ones.
fn parse_header(h: &str) -> std::result::Result<Vec<usize>, Bad> {
    let body = h
        .trim()
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .ok_or_else(|| bad("header is not a dict"))?;
    let (mut descr, mut order, mut shape) = (None, None, None);
    let mut rest = body.trim();
    while !rest.is_empty() {
        let (key, after) = quoted(rest).ok_or_else(|| bad("header key is not a quoted string"))?;
        let after = after
            .trim_start()
            .strip_prefix(':')
            .ok_or_else(|| bad(format!("no ':' after '{key}'")))?
            .trim_start();
        rest = match key {
            "descr" => {
                let (v, after) = quoted(after).ok_or_else(|| bad("descr is not a string"))?;
                descr = Some(v);
                after
            }
            "fortran_order" => {
                let (v, after) = if let Some(a) = after.strip_prefix("False") {
                    (false, a)
                } else if let Some(a) = after.strip_prefix("True") {
                    (true, a)
                } else {
                    return Err(bad("fortran_order is not True or False"));
                };
                order = Some(v);
                after
            }
            "shape" => {
                let inner = after
                    .strip_prefix('(')
                    .ok_or_else(|| bad("shape is not a tuple"))?;
                let close = inner
                    .find(')')
                    .ok_or_else(|| bad("shape tuple not closed"))?;
                let dims: Vec<usize> = inner[..close]
                    .split(',')
                    .map(str::trim)
                    .filter(|d| !d.is_empty())
                    .map(|d| d.parse().map_err(|_| bad(format!("dimension {d:?}"))))
                    .collect::<std::result::Result<_, Bad>>()?;
                if dims.len() > MAX_DIMS {
                    return Err(bad(format!(
                        "{} dimensions (at most {MAX_DIMS})",
                        dims.len()
                    )));
                }
                shape = Some(dims);
                &inner[close + 1..]
            }
            k => return Err(bad(format!("unexpected header key '{k}'"))),
        }
        .trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
    match descr {
        Some("<f4") => {}
        Some(d) => {
            return Err(bad(format!(
                "dtype '{d}' is not little-endian float32 ('<f4'): convert with x.astype('<f4')"
            )))
        }
        None => return Err(bad("header has no descr")),
    }
    match order {
        Some(false) => {}
        Some(true) => {
            return Err(bad(
                "Fortran order: save a C-order array (numpy.ascontiguousarray)",
            ))
        }
        None => return Err(bad("header has no fortran_order")),
    }
    shape.ok_or_else(|| bad("header has no shape"))
}

/// `'text'` (or `"text"`) at the start of `s`: the text and what follows.
fn quoted(s: &str) -> Option<(&str, &str)> {
    let q = s.chars().next().filter(|c| *c == '\'' || *c == '"')?;
    let rest = &s[1..];
    let end = rest.find(q)?;
    Some((&rest[..end], &rest[end + 1..]))
}

/// A version-1.0 `.npy` file of `values` (little-endian f32, C order) with `shape`.
pub fn to_bytes_f32(shape: &[usize], values: &[f32]) -> Result<Vec<u8>> {
    let count: usize = shape.iter().product();
    if count != values.len() {
        return Err(Error::Config(format!(
            "npy: shape {shape:?} needs {count} values, got {}",
            values.len()
        )));
    }
    let dims = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {dims}, }}");
    // Magic (6) + version (2) + length (2) + header + '\n', padded to a multiple of 64.
    let total = (10 + header.len() + 1).div_ceil(64) * 64;
    header.push_str(&" ".repeat(total - 10 - header.len() - 1));
    header.push('\n');
    let mut out = Vec::with_capacity(total + 4 * values.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_numpy_headers() {
        for shape in [vec![3usize], vec![2, 3], vec![2, 1, 2, 2], vec![0, 4]] {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 1.0).collect();
            let bytes = to_bytes_f32(&shape, &v).unwrap();
            assert_eq!((bytes.len() - 4 * n) % 64, 0);
            assert_eq!(parse_f32(&bytes, "x.npy".as_ref()).unwrap(), (shape, v));
        }
        // The header numpy 1.24 writes for np.zeros((2, 3), np.float32), version 1.0.
        let mut f = b"\x93NUMPY\x01\x00v\x00".to_vec();
        let h = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
        f.extend_from_slice(format!("{h:<117}\n").as_bytes());
        f.extend_from_slice(&[0u8; 24]);
        assert_eq!(
            parse_f32(&f, "x.npy".as_ref()).unwrap(),
            (vec![2, 3], vec![0.0; 6])
        );
    }

    #[test]
    fn hostile_files_are_one_line_errors() {
        let good = to_bytes_f32(&[2, 2], &[1.0, 2.0, 3.0, 4.0]).unwrap();
        let header = |h: &str| {
            let mut f = b"\x93NUMPY\x01\x00".to_vec();
            f.extend_from_slice(&(h.len() as u16).to_le_bytes());
            f.extend_from_slice(h.as_bytes());
            f.extend_from_slice(&[0u8; 16]);
            f
        };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"PK\x03\x04".to_vec(), "magic"),
            (good[..good.len() - 1].to_vec(), "needs 16 bytes"),
            (good[..20].to_vec(), "truncated"),
            (
                [&good[..6], &[9, 0]].concat(),
                "version 9",
            ),
            (
                [&b"\x93NUMPY\x02\x00"[..], &0xffff_fff0u32.to_le_bytes()].concat(),
                "header of",
            ),
            (
                header("{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }"),
                "'<f8'",
            ),
            (
                header("{'descr': '>f4', 'fortran_order': False, 'shape': (4,), }"),
                "little-endian",
            ),
            (
                header("{'descr': '<f4', 'fortran_order': True, 'shape': (4,), }"),
                "Fortran",
            ),
            (
                header("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999, 99999999999), }"),
                "more than",
            ),
            (
                header("{'descr': '<f4', 'fortran_order': False, 'shape': (-4,), }"),
                "dimension",
            ),
            (header("{'descr': '<f4', 'fortran_order': False}"), "no shape"),
            (header("not a dict"), "not a dict"),
            (
                header("{'descr': '<f4', 'fortran_order': False, 'shape': (4,), 'x': 1}"),
                "unexpected header key",
            ),
        ];
        for (bytes, want) in cases {
            let e = parse_f32(&bytes, "x.npy".as_ref()).unwrap_err().to_string();
            assert!(
                e.starts_with("x.npy: ") && e.contains(want) && !e.contains('\n'),
                "{want}: {e}"
            );
        }
    }
}
