//! Checkpoints: parameters, buffers, optimizer state and training position in one file.
//!
//! Layout: magic `ASQCKPT1` (8 bytes), format version (u32 LE), payload length (u64 LE),
//! FNV-1a 64 checksum of the payload (u64 LE), then the payload: bincode 2 (standard config)
//! of [`Checkpoint`] via serde. Decoding is bounded: the file may not exceed
//! [`MAX_CHECKPOINT_BYTES`], and bincode's limit caps every allocation a length field can ask
//! for, so a hostile file cannot allocate gigabytes. Writes go to a temporary file in the same
//! directory, are synced, then renamed over the target: an interrupted save never destroys the
//! previous checkpoint.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
pub use crate::framed::fnv1a;
use crate::framed::Format;
use crate::optim::Optimizer;
use crate::params::ParamStore;
use crate::Tensor;

/// Largest checkpoint accepted (512 MiB: ResNet-34 with optimizer state fits).
pub const MAX_CHECKPOINT_BYTES: usize = 1 << 29;
/// The checkpoint container: magic, version, size limit.
pub const FORMAT: Format = Format {
    magic: b"ASQCKPT1",
    version: 1,
    limit: MAX_CHECKPOINT_BYTES,
    what: "checkpoint",
};
#[cfg(test)]
const HEADER: usize = crate::framed::HEADER_BYTES;

/// A tensor with its name and shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NamedTensor {
    /// Stable name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f32>,
}

/// Where training stands: enough to resume exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TrainState {
    /// Current epoch (0-based).
    pub epoch: u64,
    /// Next batch within the epoch.
    pub batch: u64,
    /// Optimizer steps taken (drives the learning-rate schedule).
    pub step: u64,
    /// Seed of data order and augmentation.
    pub seed: u64,
}

/// Everything saved in a checkpoint file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Trainable parameters.
    pub params: Vec<NamedTensor>,
    /// Buffers (batch-norm running statistics, quantizer flags).
    pub buffers: Vec<NamedTensor>,
    /// Optimizer state, if saved.
    pub optimizer: Option<Optimizer>,
    /// Training position.
    pub state: TrainState,
    /// Free-form metadata (model name, quantization, dataset...).
    pub meta: BTreeMap<String, String>,
}

fn named(name: &str, t: &Tensor) -> NamedTensor {
    NamedTensor {
        name: name.to_string(),
        shape: t.shape().to_vec(),
        data: t.iter().copied().collect(),
    }
}

impl Checkpoint {
    /// Captures the parameters and buffers of `ps`, with optimizer state and position.
    pub fn capture(
        ps: &ParamStore,
        optimizer: Option<&Optimizer>,
        state: TrainState,
        meta: BTreeMap<String, String>,
    ) -> Self {
        Self {
            params: ps
                .params()
                .iter()
                .map(|p| named(&p.name, &p.value))
                .collect(),
            buffers: ps.buffers().iter().map(|(n, t)| named(n, t)).collect(),
            optimizer: optimizer.cloned(),
            state,
            meta,
        }
    }

    /// Writes every saved parameter and buffer into `ps`. Every name in `ps` must be present
    /// with the same shape (a clear error names the first mismatch); nothing is changed on error.
    pub fn restore(&self, ps: &mut ParamStore) -> Result<()> {
        let find = |list: &[NamedTensor], name: &str, shape: &[usize]| -> Result<usize> {
            let i = list
                .iter()
                .position(|t| t.name == name)
                .ok_or_else(|| Error::Config(format!("checkpoint has no {name}")))?;
            if list[i].shape != shape || list[i].data.len() != shape.iter().product::<usize>() {
                return Err(Error::Config(format!(
                    "{name}: checkpoint shape {:?}, model shape {shape:?}",
                    list[i].shape
                )));
            }
            if let Some(v) = list[i].data.iter().find(|v| !v.is_finite()) {
                return Err(Error::NonFinite(format!("checkpoint tensor {name} ({v})")));
            }
            Ok(i)
        };
        let pidx = ps
            .params()
            .iter()
            .map(|p| find(&self.params, &p.name, p.value.shape()))
            .collect::<Result<Vec<_>>>()?;
        let bidx = ps
            .buffers()
            .iter()
            .map(|(n, t)| find(&self.buffers, n, t.shape()))
            .collect::<Result<Vec<_>>>()?;
        for (p, i) in ps.params_mut().iter_mut().zip(pidx) {
            p.value
                .iter_mut()
                .zip(&self.params[i].data)
                .for_each(|(a, b)| *a = *b);
        }
        for ((_, t), i) in ps.buffers_mut().iter_mut().zip(bidx) {
            t.iter_mut()
                .zip(&self.buffers[i].data)
                .for_each(|(a, b)| *a = *b);
        }
        Ok(())
    }

    /// Serializes to bytes (header + payload).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        FORMAT.encode::<_, MAX_CHECKPOINT_BYTES>(self)
    }

    /// Parses [`Checkpoint::to_bytes`] output; `path` names the source in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        FORMAT.decode::<_, MAX_CHECKPOINT_BYTES>(bytes, path)
    }

    /// Saves atomically: temporary file in the same directory, fsync, rename.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes()?;
        atomic_write(path, &bytes)
    }

    /// Loads from `path`, refusing files larger than [`MAX_CHECKPOINT_BYTES`] before reading.
    pub fn load(path: &Path) -> Result<Self> {
        Self::from_bytes(&FORMAT.read(path)?, path)
    }
}

/// Writes `bytes` to `path` through a temporary sibling and a rename, so that readers see the old
/// or the new content, never a partial file.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |p: &Path, source| Error::Io {
        path: p.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| Error::Config(format!("{} is not a file path", path.display())))?;
    let tmp: PathBuf = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| io(&tmp, e))?;
        f.sync_all().map_err(|e| io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| io(path, e))
    })();
    if result.is_err() {
        std::fs::remove_file(&tmp).ok();
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::ParamKind;
    use ndarray::IxDyn;

    fn store(v: f32) -> ParamStore {
        let mut ps = ParamStore::new();
        ps.add(
            "a.weight",
            Tensor::from_elem(IxDyn(&[2, 3]), v),
            ParamKind::Weight,
        )
        .unwrap();
        ps.add_buffer("a.running_mean", Tensor::from_elem(IxDyn(&[3]), v + 1.0))
            .unwrap();
        ps
    }

    #[test]
    fn round_trip_through_a_file() {
        let dir = std::env::temp_dir().join(format!("asq-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.ckpt");
        let state = TrainState {
            epoch: 2,
            batch: 5,
            step: 77,
            seed: 9,
        };
        let c = Checkpoint::capture(
            &store(0.5),
            None,
            state,
            BTreeMap::from([("model".into(), "test".into())]),
        );
        c.save(&path).unwrap();
        let back = Checkpoint::load(&path).unwrap();
        assert_eq!(back, c);
        let mut ps = store(0.0);
        back.restore(&mut ps).unwrap();
        assert!(ps.params()[0].value.iter().all(|&v| v == 0.5));
        assert!(ps.buffer(0).iter().all(|&v| v == 1.5));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn corruption_is_detected_with_the_file_named() {
        let c = Checkpoint::capture(&store(0.5), None, TrainState::default(), BTreeMap::new());
        let bytes = c.to_bytes().unwrap();
        let p = Path::new("model.ckpt");
        for cut in [0, 7, HEADER, bytes.len() - 1] {
            let e = Checkpoint::from_bytes(&bytes[..cut], p)
                .unwrap_err()
                .to_string();
            assert!(e.contains("model.ckpt"), "{e}");
        }
        let mut flipped = bytes.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 0x40;
        assert!(Checkpoint::from_bytes(&flipped, p)
            .unwrap_err()
            .to_string()
            .contains("checksum"));
        let mut magic = bytes.clone();
        magic[0] = b'X';
        assert!(Checkpoint::from_bytes(&magic, p)
            .unwrap_err()
            .to_string()
            .contains("magic"));
    }

    #[test]
    fn hostile_length_fields_are_bounded() {
        // A payload whose first vector claims 2^60 elements, with a valid header and checksum.
        let mut payload = Vec::new();
        payload.push(0xff); // bincode varint marker for u64
        payload.extend_from_slice(&(1u64 << 60).to_le_bytes());
        let bytes = FORMAT.seal(&payload);
        let e = Checkpoint::from_bytes(&bytes, Path::new("evil.ckpt"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("evil.ckpt") && e.contains("undecodable"), "{e}");
    }

    #[test]
    fn restore_checks_names_and_shapes_without_partial_writes() {
        let c = Checkpoint::capture(&store(0.5), None, TrainState::default(), BTreeMap::new());
        let mut other = ParamStore::new();
        other
            .add(
                "a.weight",
                Tensor::from_elem(IxDyn(&[3, 2]), 0.0),
                ParamKind::Weight,
            )
            .unwrap();
        assert!(c
            .restore(&mut other)
            .unwrap_err()
            .to_string()
            .contains("a.weight"));
        let mut missing = store(0.0);
        missing
            .add("b.weight", Tensor::zeros(IxDyn(&[1])), ParamKind::Weight)
            .unwrap();
        assert!(c.restore(&mut missing).is_err());
        assert!(missing.params()[0].value.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn atomic_write_keeps_the_old_file_when_the_target_is_unwritable() {
        let dir = std::env::temp_dir().join(format!("asq-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.bin");
        atomic_write(&path, b"old").unwrap();
        atomic_write(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert!(atomic_write(&dir.join("missing-dir").join("f.bin"), b"x").is_err());
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains("tmp"))
            .collect();
        assert!(leftovers.is_empty());
        std::fs::remove_dir_all(&dir).ok();
    }
}
