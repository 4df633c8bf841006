//! Named parameters and buffers: what optimizers update and checkpoints save.

use std::collections::HashMap;

use ndarray::ArrayD;

use crate::error::{Error, Result};
use crate::Tensor;

/// What a parameter is, so that optimizers can give each kind its own learning rate and weight
/// decay (for instance no decay on step sizes, alphas, biases and norms).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ParamKind {
    /// Conv / linear weights.
    Weight,
    /// Biases.
    Bias,
    /// Norm scale and shift.
    Norm,
    /// Quantizer step sizes (LSQ `s`) and scales (POST `alpha`).
    QuantScale,
    /// The ASQ adapter's weights and biases.
    Adapter,
}

/// Index of a parameter in its [`ParamStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ParamId(pub(crate) usize);

/// One parameter: stable name, value, accumulated gradient.
#[derive(Debug, Clone)]
pub struct Param {
    /// Stable dotted name (`layer1.0.conv1.weight`), the key in checkpoints and reports.
    pub name: String,
    /// Current value.
    pub value: Tensor,
    /// Gradient accumulated by [`crate::Graph::backward`].
    pub grad: Tensor,
    /// Kind, for parameter groups.
    pub kind: ParamKind,
}

/// All parameters and non-trainable buffers (BN running statistics) of a model.
#[derive(Debug, Clone, Default)]
pub struct ParamStore {
    params: Vec<Param>,
    by_name: HashMap<String, usize>,
    buffers: Vec<(String, Tensor)>,
    buffer_names: HashMap<String, usize>,
}

impl ParamStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a parameter; names must be unique.
    pub fn add(
        &mut self,
        name: impl Into<String>,
        value: Tensor,
        kind: ParamKind,
    ) -> Result<ParamId> {
        let name = name.into();
        if self.by_name.contains_key(&name) || self.buffer_names.contains_key(&name) {
            return Err(Error::Config(format!("duplicate parameter name {name}")));
        }
        let id = self.params.len();
        self.by_name.insert(name.clone(), id);
        let grad = ArrayD::zeros(value.raw_dim());
        self.params.push(Param {
            name,
            value,
            grad,
            kind,
        });
        Ok(ParamId(id))
    }

    /// Adds a buffer (saved and restored, never trained); returns its index.
    pub fn add_buffer(&mut self, name: impl Into<String>, value: Tensor) -> Result<usize> {
        let name = name.into();
        if self.by_name.contains_key(&name) || self.buffer_names.contains_key(&name) {
            return Err(Error::Config(format!("duplicate buffer name {name}")));
        }
        self.buffer_names.insert(name.clone(), self.buffers.len());
        self.buffers.push((name, value));
        Ok(self.buffers.len() - 1)
    }

    /// The parameter `id`.
    pub fn get(&self, id: ParamId) -> &Param {
        &self.params[id.0]
    }

    /// The parameter `id`, mutably.
    pub fn get_mut(&mut self, id: ParamId) -> &mut Param {
        &mut self.params[id.0]
    }

    /// A parameter by name.
    pub fn find(&self, name: &str) -> Option<ParamId> {
        self.by_name.get(name).map(|&i| ParamId(i))
    }

    /// All parameters in creation order.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// All parameters, mutably.
    pub fn params_mut(&mut self) -> &mut [Param] {
        &mut self.params
    }

    /// Buffer `i`.
    pub fn buffer(&self, i: usize) -> &Tensor {
        &self.buffers[i].1
    }

    /// Buffer `i`, mutably.
    pub fn buffer_mut(&mut self, i: usize) -> &mut Tensor {
        &mut self.buffers[i].1
    }

    /// All buffers with their names.
    pub fn buffers(&self) -> &[(String, Tensor)] {
        &self.buffers
    }

    /// All buffers, mutably.
    pub fn buffers_mut(&mut self) -> &mut [(String, Tensor)] {
        &mut self.buffers
    }

    /// Sets every gradient to zero.
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.grad.fill(0.0);
        }
    }

    /// Number of trainable scalars.
    pub fn numel(&self) -> usize {
        self.params.iter().map(|p| p.value.len()).sum()
    }
}
