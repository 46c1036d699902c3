//! The activation functions the families use, as a layer's setting: the
//! CPU kernels apply them in their epilogues (the row functions here), other
//! devices through candle.

use candle_core::{Result, Tensor};

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

/// The bias of a row of values: one for all (a convolution's output
/// channel), or one per value (a linear layer's output features).
#[derive(Clone, Copy)]
enum Bias<'a> {
    Row(f32),
    Columns(&'a [f32]),
}

/// An activation with an eight-lane form (`vmath`'s AVX2 functions), which
/// the compiler does not find from the scalar one.
#[cfg(target_arch = "x86_64")]
trait Lanes {
    /// # Safety
    /// The CPU has AVX2 and FMA.
    unsafe fn apply8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256;
}

#[cfg(target_arch = "x86_64")]
impl Lanes for Silu {
    #[inline(always)]
    unsafe fn apply8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
        crate::vmath::silu8(x)
    }
}

#[cfg(target_arch = "x86_64")]
impl Lanes for Gelu {
    #[inline(always)]
    unsafe fn apply8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
        crate::vmath::gelu8(x)
    }
}

/// `row = F(row + bias + residual)` eight values at a time.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn lanes_row_avx2<F: Lanes>(row: &mut [f32], bias: Bias, residual: Option<&[f32]>) {
    use std::arch::x86_64::*;
    let len = row.len();
    let residual = residual.map(|r| &r[..len]);
    if let Bias::Columns(b) = bias {
        assert!(b.len() >= len, "a bias per value");
    }
    let whole = len / 8 * 8;
    for i in (0..whole).step_by(8) {
        let y = row.as_mut_ptr().add(i);
        let b = match bias {
            Bias::Row(b) => _mm256_set1_ps(b),
            Bias::Columns(b) => _mm256_loadu_ps(b.as_ptr().add(i)),
        };
        let mut v = _mm256_add_ps(_mm256_loadu_ps(y), b);
        if let Some(r) = residual {
            v = _mm256_add_ps(v, _mm256_loadu_ps(r.as_ptr().add(i)));
        }
        _mm256_storeu_ps(y, F::apply8(v));
    }
    // The rest through the same lanes, so that a value's result never
    // depends on where a row starts or ends (that is, on the tiling, which
    // depends on the batch).
    let rest = len - whole;
    if rest > 0 {
        let mut lanes = [0f32; 8];
        for (j, v) in lanes[..rest].iter_mut().enumerate() {
            *v = row[whole + j]
                + match bias {
                    Bias::Row(b) => b,
                    Bias::Columns(b) => b[whole + j],
                };
            if let Some(r) = residual {
                *v += r[whole + j];
            }
        }
        _mm256_storeu_ps(
            lanes.as_mut_ptr(),
            F::apply8(_mm256_loadu_ps(lanes.as_ptr())),
        );
        row[whole..].copy_from_slice(&lanes[..rest]);
    }
}

/// Runs `row = act(row + bias + residual)` through the eight-lane form
/// where `act` has one and the CPU has AVX2; false where it did nothing.
#[inline(always)]
fn finish_in_lanes(row: &mut [f32], bias: Bias, residual: Option<&[f32]>, act: Activation) -> bool {
    #[cfg(target_arch = "x86_64")]
    if matches!(act, Activation::Silu | Activation::Gelu)
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
    {
        // SAFETY: the CPU has AVX2 and FMA.
        unsafe {
            match act {
                Activation::Silu => lanes_row_avx2::<Silu>(row, bias, residual),
                _ => lanes_row_avx2::<Gelu>(row, bias, residual),
            }
        }
        return true;
    }
    let _ = (row, bias, residual, act);
    false
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
            if finish_in_lanes(row, Bias::Columns(bias), residual, act) {
                continue;
            }
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
/// SiLU and GELU go eight lanes at a time (`vmath::silu8`, `gelu8`) where
/// the CPU has AVX2, whichever kernel's epilogue asks.
#[inline(always)]
pub(crate) fn finish_row_inline(
    row: &mut [f32],
    bias: f32,
    residual: Option<&[f32]>,
    act: Activation,
) {
    if finish_in_lanes(row, Bias::Row(bias), residual, act) {
        return;
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
