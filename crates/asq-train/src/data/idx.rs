//! IDX files (MNIST, Fashion-MNIST), plain or gzip-compressed, read with every length checked
//! before it is trusted.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;

use crate::data::Dataset;
use crate::error::{Error, Result};

/// Largest IDX payload accepted (256 MiB): a corrupt header cannot make us allocate more.
pub const MAX_PAYLOAD: usize = 1 << 28;

fn io(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn format(path: &Path, detail: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

/// Reads an IDX file of unsigned bytes; returns its dimensions and payload.
pub fn read_idx(path: &Path) -> Result<(Vec<usize>, Vec<u8>)> {
    let mut file = File::open(path).map_err(|e| io(path, e))?;
    let mut magic = [0u8; 2];
    file.read_exact(&mut magic)
        .map_err(|_| format(path, "empty or truncated file"))?;
    let file = File::open(path).map_err(|e| io(path, e))?;
    let mut reader: Box<dyn Read> = if magic == [0x1f, 0x8b] {
        Box::new(GzDecoder::new(BufReader::new(file)))
    } else {
        Box::new(BufReader::new(file))
    };
    let mut head = [0u8; 4];
    reader
        .read_exact(&mut head)
        .map_err(|e| format(path, format!("truncated IDX header ({e})")))?;
    if head[0] != 0 || head[1] != 0 {
        return Err(format(
            path,
            format!(
                "bad IDX magic {:02x}{:02x}{:02x}{:02x}",
                head[0], head[1], head[2], head[3]
            ),
        ));
    }
    if head[2] != 0x08 {
        return Err(format(
            path,
            format!(
                "IDX element type {:#04x} is not unsigned byte (0x08)",
                head[2]
            ),
        ));
    }
    let ndims = head[3] as usize;
    if !(1..=4).contains(&ndims) {
        return Err(format(path, format!("IDX with {ndims} dimensions")));
    }
    let mut dims = Vec::with_capacity(ndims);
    let mut total = 1usize;
    for _ in 0..ndims {
        let mut d = [0u8; 4];
        reader
            .read_exact(&mut d)
            .map_err(|e| format(path, format!("truncated IDX header ({e})")))?;
        let d = u32::from_be_bytes(d) as usize;
        total = total
            .checked_mul(d)
            .filter(|&t| t <= MAX_PAYLOAD)
            .ok_or_else(|| format(path, "IDX dimensions exceed the size limit"))?;
        dims.push(d);
    }
    let mut data = Vec::with_capacity(total);
    reader
        .by_ref()
        .take(total as u64)
        .read_to_end(&mut data)
        .map_err(|e| format(path, format!("corrupt data ({e})")))?;
    if data.len() != total {
        return Err(format(
            path,
            format!(
                "truncated: header promises {total} bytes, file has {}",
                data.len()
            ),
        ));
    }
    let mut extra = [0u8; 1];
    if reader
        .read(&mut extra)
        .map_err(|e| format(path, format!("corrupt data ({e})")))?
        != 0
    {
        return Err(format(path, "trailing bytes after the IDX payload"));
    }
    Ok((dims, data))
}

/// Loads an images file (`[n, h, w]`) and a labels file (`[n]`) as a one-channel dataset.
pub fn load_pair(images: &Path, labels: &Path, classes: usize) -> Result<Dataset> {
    let (dims, pixels) = read_idx(images)?;
    if dims.len() != 3 {
        return Err(format(
            images,
            format!("expected [n, h, w] images, got dimensions {dims:?}"),
        ));
    }
    let (ldims, labs) = read_idx(labels)?;
    if ldims.len() != 1 {
        return Err(format(
            labels,
            format!("expected [n] labels, got dimensions {ldims:?}"),
        ));
    }
    if ldims[0] != dims[0] {
        return Err(format(
            labels,
            format!(
                "{} labels for {} images in {}",
                ldims[0],
                dims[0],
                images.display()
            ),
        ));
    }
    if let Some(&bad) = labs.iter().find(|&&l| l as usize >= classes) {
        return Err(format(labels, format!("label {bad} outside 0..{classes}")));
    }
    Ok(Dataset {
        images: pixels,
        labels: labs,
        c: 1,
        h: dims[1],
        w: dims[2],
        classes,
    })
}

/// Where the Debian package `dataset-fashion-mnist` installs Fashion-MNIST.
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Loads the train or test split of an MNIST-layout directory (`train-images-idx3-ubyte[.gz]`,
/// `t10k-labels-idx1-ubyte[.gz]`, ...).
pub fn load_mnist_dir(dir: &Path, train: bool) -> Result<Dataset> {
    let prefix = if train { "train" } else { "t10k" };
    let find = |stem: &str| -> Result<PathBuf> {
        for name in [format!("{prefix}-{stem}.gz"), format!("{prefix}-{stem}")] {
            let p = dir.join(name);
            if p.exists() {
                return Ok(p);
            }
        }
        Err(io(
            &dir.join(format!("{prefix}-{stem}.gz")),
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ))
    };
    load_pair(&find("images-idx3-ubyte")?, &find("labels-idx1-ubyte")?, 10)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(path: &Path, bytes: &[u8], gz: bool) {
        let mut f = File::create(path).unwrap();
        if gz {
            let mut e = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
            e.write_all(bytes).unwrap();
            e.finish().unwrap();
        } else {
            f.write_all(bytes).unwrap();
        }
    }

    fn idx(dims: &[u32], payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn reads_plain_and_gzip_and_rejects_corruption() {
        let dir = std::env::temp_dir().join(format!("asq-idx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (img, lab) = (
            dir.join("train-images-idx3-ubyte.gz"),
            dir.join("train-labels-idx1-ubyte"),
        );
        write(
            &img,
            &idx(&[2, 2, 3], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]),
            true,
        );
        write(&lab, &idx(&[2], &[3, 9]), false);
        let d = load_mnist_dir(&dir, true).unwrap();
        assert_eq!((d.len(), d.h, d.w, d.image(1)[0]), (2, 2, 3, 7));
        // Truncated payload, wrong count, bad label, bad magic, trailing bytes, oversize header.
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (idx(&[2, 2, 3], &[1, 2, 3]), "truncated"),
            (idx(&[3], &[1, 2, 3]), "labels for"),
            (idx(&[2], &[1, 10]), "outside"),
            (vec![1, 2, 8, 1, 0, 0, 0, 1, 5], "magic"),
            (idx(&[2], &[1, 2, 3]), "trailing"),
            (idx(&[65535, 65535, 65535], &[]), "size limit"),
        ];
        for (bytes, want) in cases {
            let is_label = want != "size limit";
            let target = if is_label { &lab } else { &img };
            write(target, &bytes, false);
            let err = load_mnist_dir(&dir, true).unwrap_err().to_string();
            assert!(
                err.contains(want) && err.contains(target.file_name().unwrap().to_str().unwrap()),
                "{want}: {err}"
            );
            write(&lab, &idx(&[2], &[3, 9]), false);
            write(
                &img,
                &idx(&[2, 2, 3], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]),
                true,
            );
        }
        let missing = load_mnist_dir(&dir.join("nope"), true)
            .unwrap_err()
            .to_string();
        assert!(missing.contains("nope"), "{missing}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
