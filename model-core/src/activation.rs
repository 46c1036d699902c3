//! The activation functions the families use, as a layer's setting: the
//! CPU kernels apply them in their epilogues, other devices through candle.

use candle_core::{Result, Tensor};

/// The activations the supported families use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    None,
    Relu,
    Relu6,
    Silu,
    /// The exact (erf) GELU.
    Gelu,
}

impl Activation {
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::None => Ok(x.clone()),
            Self::Relu => x.relu(),
            // clamp goes through two binary ops; relu + minimum keeps the
            // first one a cheap unary op.
            Self::Relu6 => x.relu()?.minimum(6.0),
            Self::Silu => x.silu(),
            Self::Gelu => x.gelu_erf(),
        }
    }
}
