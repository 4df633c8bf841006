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
}
