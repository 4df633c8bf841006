//! What a checkpoint of `asq train` records to rebuild its model, and the data and file helpers
//! the commands share.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use asq_models::{Model, QuantPolicy};
use asq_train::data::idx::load_mnist_dir;
use asq_train::data::{Dataset, Normalize};
use asq_train::nn::{Init, StepGradScale};
use asq_train::ParamStore;

use crate::common::{data_dir, Error};

/// What a checkpoint's metadata must say to rebuild its model.
pub struct Recipe {
    /// Architecture name.
    pub model: String,
    /// Quantization policy name.
    pub quant: String,
    /// Body bit width.
    pub bits: u32,
    /// First and last layers: "int8" or "fp32".
    pub ends: String,
    /// Image (C, H, W).
    pub chw: (usize, usize, usize),
    /// Classes.
    pub classes: usize,
    /// Training normalisation.
    pub normalize: Normalize,
    /// The activation steps' gradient scale.
    pub step_grad: StepGradScale,
}

impl Recipe {
    /// The checkpoint metadata recording this recipe.
    pub fn meta(&self) -> BTreeMap<String, String> {
        let list = |v: &[f32]| {
            v.iter()
                .map(|x| format!("{x:e}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let (c, h, w) = self.chw;
        BTreeMap::from([
            ("model".to_string(), self.model.clone()),
            ("quant".to_string(), self.quant.clone()),
            ("bits".to_string(), self.bits.to_string()),
            ("ends".to_string(), self.ends.clone()),
            ("input".to_string(), format!("{c}x{h}x{w}")),
            ("classes".to_string(), self.classes.to_string()),
            ("mean".to_string(), list(&self.normalize.mean)),
            ("std".to_string(), list(&self.normalize.std)),
            ("step_grad".to_string(), self.step_grad.name().to_string()),
        ])
    }

    pub(crate) fn from_meta(meta: &BTreeMap<String, String>, path: &Path) -> Result<Self, Error> {
        let get = |k: &str| {
            meta.get(k).ok_or_else(|| {
                format!(
                    "{}: no {k:?} in the checkpoint metadata (not written by `asq train`?)",
                    path.display()
                )
            })
        };
        let bad = |k: &str| {
            format!(
                "{}: malformed {k:?} in the checkpoint metadata",
                path.display()
            )
        };
        let floats = |k: &str| -> Result<Vec<f32>, Error> {
            get(k)?
                .split(',')
                .map(|v| v.parse::<f32>().map_err(|_| bad(k).into()))
                .collect()
        };
        let dims: Vec<usize> = get("input")?
            .split('x')
            .map(|v| v.parse().map_err(|_| bad("input")))
            .collect::<Result<_, _>>()?;
        let [c, h, w] = dims[..] else {
            return Err(bad("input").into());
        };
        Ok(Self {
            model: get("model")?.clone(),
            quant: get("quant")?.clone(),
            bits: get("bits")?.parse().map_err(|_| bad("bits"))?,
            ends: meta.get("ends").cloned().unwrap_or_else(|| "int8".into()),
            chw: (c, h, w),
            classes: get("classes")?.parse().map_err(|_| bad("classes"))?,
            normalize: Normalize {
                mean: floats("mean")?,
                std: floats("std")?,
            },
            // Checkpoints from before the option used the per-sample count.
            step_grad: match meta.get("step_grad") {
                Some(v) => StepGradScale::parse(v).map_err(|_| bad("step_grad"))?,
                None => StepGradScale::Sample,
            },
        })
    }

    pub(crate) fn build(&self, ps: &mut ParamStore, init: impl Into<Init>) -> Result<Model, Error> {
        let policy = match self.ends.as_str() {
            "int8" => QuantPolicy::named(&self.quant, self.bits)?,
            "fp32" => QuantPolicy::named(&self.quant, self.bits)?.float_ends(),
            e => return Err(format!("--ends {e:?}: int8 or fp32").into()),
        }
        .with_step_grad(self.step_grad);
        Ok(Model::build(
            &self.model,
            ps,
            self.chw,
            self.classes,
            &policy,
            init,
        )?)
    }

    pub(crate) fn label(&self) -> String {
        if self.quant == "fp32" {
            format!("{} fp32", self.model)
        } else {
            let ends = if self.ends == "fp32" {
                " (fp32 ends)"
            } else {
                ""
            };
            format!(
                "{} {} W{}A{}{ends}",
                self.model, self.quant, self.bits, self.bits
            )
        }
    }
}

pub(crate) fn load_split(
    data: &Option<PathBuf>,
    train: bool,
    take: Option<usize>,
) -> Result<Dataset, Error> {
    let dir = data_dir(data)?;
    let set = if asq_train::data::cifar::cifar_dir(&dir).is_some() {
        asq_train::data::cifar::load_cifar_dir(&dir, train)?
    } else {
        load_mnist_dir(&dir, train)?
    };
    Ok(match take {
        Some(0) => return Err("--train-images / --test-images must be positive".into()),
        Some(n) => set.take(n),
        None => set,
    })
}

pub(crate) fn is_model_file(path: &Path) -> Result<bool, Error> {
    use std::io::Read;
    let mut magic = [0u8; 8];
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let n = f
        .read(&mut magic)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(n == 8 && &magic == b"ASQMODL1")
}

/// Copies every parameter and buffer of `src` whose name and shape exist in `ps`; returns how
/// many tensors were copied. The quantizers' "initialised" flags are copied only with
/// `keep_quantizers` (a source of the same quantization); otherwise scales initialise on the
/// first batch from the loaded weights.
pub(crate) fn init_from(
    ps: &mut ParamStore,
    src: &asq_train::checkpoint::Checkpoint,
    keep_quantizers: bool,
) -> usize {
    let mut copied = 0;
    for t in &src.params {
        if let Some(id) = ps.find(&t.name) {
            let p = ps.get_mut(id);
            if p.value.shape() == t.shape.as_slice() {
                p.value.iter_mut().zip(&t.data).for_each(|(a, b)| *a = *b);
                copied += 1;
            }
        }
    }
    for t in &src.buffers {
        if t.name.ends_with("_ready") && !keep_quantizers {
            continue;
        }
        if let Some((_, v)) = ps.buffers_mut().iter_mut().find(|(n, _)| *n == t.name) {
            if v.shape() == t.shape.as_slice() {
                v.iter_mut().zip(&t.data).for_each(|(a, b)| *a = *b);
                copied += 1;
            }
        }
    }
    copied
}
