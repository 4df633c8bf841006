//! CIFAR-10 binary batches (`data_batch_1.bin` ... `test_batch.bin`): records of one label byte
//! and 3072 pixel bytes (3 x 32 x 32, channel-major).

use std::path::Path;

use crate::data::Dataset;
use crate::error::{Error, Result};

const RECORD: usize = 1 + 3 * 32 * 32;

/// Loads and concatenates CIFAR-10 binary batch files.
pub fn load_batches(paths: &[&Path]) -> Result<Dataset> {
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for &path in paths {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if bytes.is_empty() || bytes.len() % RECORD != 0 {
            return Err(Error::Format {
                path: path.to_path_buf(),
                detail: format!(
                    "{} bytes is not a whole number of {RECORD}-byte CIFAR-10 records",
                    bytes.len()
                ),
            });
        }
        for (i, rec) in bytes.chunks_exact(RECORD).enumerate() {
            if rec[0] >= 10 {
                return Err(Error::Format {
                    path: path.to_path_buf(),
                    detail: format!("record {i} has label {}", rec[0]),
                });
            }
            labels.push(rec[0]);
            images.extend_from_slice(&rec[1..]);
        }
    }
    Ok(Dataset {
        images,
        labels,
        c: 3,
        h: 32,
        w: 32,
        classes: 10,
    })
}

/// The directory holding the CIFAR-10 binary batches: `dir` itself or its
/// `cifar-10-batches-bin` (the layout of the official archive), if either has `data_batch_1.bin`
/// and `test_batch.bin`.
pub fn cifar_dir(dir: &Path) -> Option<std::path::PathBuf> {
    [dir.to_path_buf(), dir.join("cifar-10-batches-bin")]
        .into_iter()
        .find(|d| d.join("data_batch_1.bin").is_file() && d.join("test_batch.bin").is_file())
}

/// The train split (`data_batch_1.bin` ... `data_batch_5.bin`, those present) or the test split
/// (`test_batch.bin`) of a CIFAR-10 directory (see [`cifar_dir`]).
pub fn load_cifar_dir(dir: &Path, train: bool) -> Result<Dataset> {
    let d = cifar_dir(dir).ok_or_else(|| Error::Format {
        path: dir.to_path_buf(),
        detail: "no CIFAR-10 binary batches (data_batch_1.bin and test_batch.bin) here or in \
                 cifar-10-batches-bin/"
            .into(),
    })?;
    let files: Vec<std::path::PathBuf> = if train {
        (1..=5)
            .map(|i| d.join(format!("data_batch_{i}.bin")))
            .filter(|p| p.is_file())
            .collect()
    } else {
        vec![d.join("test_batch.bin")]
    };
    let refs: Vec<&Path> = files.iter().map(|p| p.as_path()).collect();
    load_batches(&refs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_records_and_rejects_bad_files() {
        let dir = std::env::temp_dir().join(format!("asq-cifar-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("data_batch_1.bin");
        let mut bytes = vec![0u8; 2 * RECORD];
        bytes[RECORD] = 7;
        bytes[RECORD + 1] = 200;
        std::fs::write(&p, &bytes).unwrap();
        let d = load_batches(&[&p]).unwrap();
        assert_eq!((d.len(), d.labels[1], d.image(1)[0]), (2, 7, 200));
        std::fs::write(&p, &bytes[..RECORD + 5]).unwrap();
        assert!(load_batches(&[&p])
            .unwrap_err()
            .to_string()
            .contains("data_batch_1.bin"));
        bytes[0] = 11;
        std::fs::write(&p, &bytes).unwrap();
        assert!(load_batches(&[&p])
            .unwrap_err()
            .to_string()
            .contains("label 11"));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn directories_in_both_layouts() {
        let root = std::env::temp_dir().join(format!("asq-cifar-dir-{}", std::process::id()));
        let inner = root.join("cifar-10-batches-bin");
        std::fs::create_dir_all(&inner).unwrap();
        assert!(cifar_dir(&root).is_none());
        assert!(load_cifar_dir(&root, true)
            .unwrap_err()
            .to_string()
            .contains("data_batch_1.bin"));
        let rec = |label: u8, n: usize| -> Vec<u8> {
            (0..n)
                .flat_map(|_| std::iter::once(label).chain(std::iter::repeat_n(9, RECORD - 1)))
                .collect()
        };
        std::fs::write(inner.join("data_batch_1.bin"), rec(1, 3)).unwrap();
        std::fs::write(inner.join("data_batch_2.bin"), rec(2, 2)).unwrap();
        std::fs::write(inner.join("test_batch.bin"), rec(5, 4)).unwrap();
        assert_eq!(cifar_dir(&root).as_deref(), Some(inner.as_path()));
        let train = load_cifar_dir(&root, true).unwrap();
        assert_eq!((train.len(), train.labels[4], train.c), (5, 2, 3));
        assert_eq!(load_cifar_dir(&inner, false).unwrap().len(), 4);
        std::fs::remove_dir_all(&root).ok();
    }
}
