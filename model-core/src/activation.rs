//! The activation functions the families use, as a layer's setting: the
//! CPU kernels apply them in their epilogues (the row functions here), other
//! devices through candle.

use candle_core::{Result, Tensor};

#[cfg(target_arch = "x86_64")]
use crate::vmath::silu8;
use crate::vmath::{avx2_dispatch, gelu, silu};

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

avx2_dispatch! {
    /// `row = act(row + bias + residual)`: one bias for the whole row (a
    /// convolution's output channel).
    pub(crate) fn finish_row(row: &mut [f32], bias: f32, residual: Option<&[f32]>, act: Activation) {
        finish_row_inline(row, bias, residual, act)
    }
}

/// [`finish_row`] for SiLU, eight values at a time by [`silu8`].
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_row_avx2(row: &mut [f32], bias: f32, residual: Option<&[f32]>) {
    use std::arch::x86_64::*;
    let b = _mm256_set1_ps(bias);
    let whole = row.len() / 8 * 8;
    let residual = residual.map(|r| &r[..row.len()]);
    for i in (0..whole).step_by(8) {
        let y = row.as_mut_ptr().add(i);
        let mut v = _mm256_add_ps(_mm256_loadu_ps(y), b);
        if let Some(r) = residual {
            v = _mm256_add_ps(v, _mm256_loadu_ps(r.as_ptr().add(i)));
        }
        _mm256_storeu_ps(y, silu8(v));
    }
    // The rest through the same lanes, so that a value's result never
    // depends on where a row starts or ends (that is, on the tiling, which
    // depends on the batch).
    let rest = row.len() - whole;
    if rest > 0 {
        let mut lanes = [0f32; 8];
        for (j, v) in lanes[..rest].iter_mut().enumerate() {
            *v = row[whole + j] + bias;
            if let Some(r) = residual {
                *v += r[whole + j];
            }
        }
        _mm256_storeu_ps(lanes.as_mut_ptr(), silu8(_mm256_loadu_ps(lanes.as_ptr())));
        row[whole..].copy_from_slice(&lanes[..rest]);
    }
}

avx2_dispatch! {
    /// `act(value + bias[column] + residual)` for each value of a block of
    /// `height` rows of `width` values, rows `stride` apart (a linear
    /// layer's outputs, a bias per output feature); `bias` and `residual`
    /// (with its own row stride) start at the block's first column.
    pub(crate) fn finish_block(
        block: &mut [f32],
        stride: usize,
        height: usize,
        width: usize,
        bias: &[f32],
        residual: Option<(&[f32], usize)>,
        act: Activation,
    ) {
        let bias = &bias[..width];
        for i in 0..height {
            let row = &mut block[i * stride..][..width];
            let residual = residual.map(|(r, s)| &r[i * s..][..width]);
            match act {
                Activation::None => map_columns::<Identity>(row, bias, residual),
                Activation::Relu => map_columns::<Relu>(row, bias, residual),
                Activation::Relu6 => map_columns::<Relu6>(row, bias, residual),
                Activation::Silu => map_columns::<Silu>(row, bias, residual),
                Activation::Gelu => map_columns::<Gelu>(row, bias, residual),
            }
        }
    }
}

/// [`finish_row`] inlined into a caller that is itself compiled for AVX2.
/// SiLU goes eight lanes at a time through [`silu8`] where the CPU has
/// AVX2, whichever kernel's epilogue asks.
#[inline(always)]
pub(crate) fn finish_row_inline(
    row: &mut [f32],
    bias: f32,
    residual: Option<&[f32]>,
    act: Activation,
) {
    #[cfg(target_arch = "x86_64")]
    if act == Activation::Silu
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
    {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { silu_row_avx2(row, bias, residual) };
    }
    match act {
        Activation::None => map_row::<Identity>(row, bias, residual),
        Activation::Relu => map_row::<Relu>(row, bias, residual),
        Activation::Relu6 => map_row::<Relu6>(row, bias, residual),
        Activation::Silu => map_row::<Silu>(row, bias, residual),
        Activation::Gelu => map_row::<Gelu>(row, bias, residual),
    }
}

/// An activation as a type whose function is always inlined: a closure or
/// function item as large as GELU can stay out of line, and the loop around
/// the call then does not vectorise.
trait Elementwise {
    fn apply(v: f32) -> f32;
}

macro_rules! elementwise {
    ($($name:ident: $v:ident => $body:expr;)*) => {$(
        struct $name;
        impl Elementwise for $name {
            #[inline(always)]
            fn apply($v: f32) -> f32 {
                $body
            }
        }
    )*};
}

elementwise! {
    Identity: v => v;
    Relu: v => v.max(0.0);
    Relu6: v => v.clamp(0.0, 6.0);
    Silu: v => silu(v);
    Gelu: v => gelu(v);
}

#[inline(always)]
fn map_row<F: Elementwise>(row: &mut [f32], bias: f32, residual: Option<&[f32]>) {
    match residual {
        Some(r) => {
            for (y, &r) in row.iter_mut().zip(r) {
                *y = F::apply(*y + bias + r);
            }
        }
        None => {
            for y in row.iter_mut() {
                *y = F::apply(*y + bias);
            }
        }
    }
}

#[inline(always)]
fn map_columns<F: Elementwise>(row: &mut [f32], bias: &[f32], residual: Option<&[f32]>) {
    match residual {
        Some(r) => {
            for ((y, &b), &r) in row.iter_mut().zip(bias).zip(r) {
                *y = F::apply(*y + b + r);
            }
        }
        None => {
            for (y, &b) in row.iter_mut().zip(bias) {
                *y = F::apply(*y + b);
            }
        }
    }
}
