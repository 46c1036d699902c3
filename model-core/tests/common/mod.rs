//! Helpers shared by the conformance tests.

use anyhow::Result;
use candle_core::{DType, Tensor};

/// Max |got - want| over max |want|: a difference relative to the
/// reference's scale, in any dtype `got` comes in.
pub fn rel_diff(got: &Tensor, want: &Tensor) -> Result<f32> {
    let got = got.to_dtype(DType::F32)?;
    let diff = (&got - want)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    let scale = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    Ok(diff / scale.max(f32::MIN_POSITIVE))
}
