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

/// A vector width the lane forms run at: eight lanes with AVX2 and FMA,
/// sixteen with AVX-512F.
#[cfg(target_arch = "x86_64")]
trait Width {
    const LANES: usize;
    type V: Copy;
    /// # Safety (each of these)
    /// The CPU has the width's features; pointers hold `LANES` values.
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
}

#[cfg(target_arch = "x86_64")]
struct Avx2;

#[cfg(target_arch = "x86_64")]
impl Width for Avx2 {
    const LANES: usize = 8;
    type V = std::arch::x86_64::__m256;
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::V {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self::V) {
        std::arch::x86_64::_mm256_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self::V {
        std::arch::x86_64::_mm256_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
        std::arch::x86_64::_mm256_add_ps(a, b)
    }
}

#[cfg(target_arch = "x86_64")]
struct Avx512;

#[cfg(target_arch = "x86_64")]
impl Width for Avx512 {
    const LANES: usize = 16;
    type V = std::arch::x86_64::__m512;
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::V {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self::V) {
        std::arch::x86_64::_mm512_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self::V {
        std::arch::x86_64::_mm512_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
        std::arch::x86_64::_mm512_add_ps(a, b)
    }
}

/// An activation with a form at width `W` (`vmath`'s lane functions), which
/// the compiler does not find from the scalar one.
#[cfg(target_arch = "x86_64")]
trait Lanes<W: Width> {
    /// # Safety
    /// The CPU has the width's features.
    unsafe fn apply(x: W::V) -> W::V;
}

#[cfg(target_arch = "x86_64")]
macro_rules! lanes {
    ($($act:ident at $width:ident: $f:path;)*) => {$(
        impl Lanes<$width> for $act {
            #[inline(always)]
            unsafe fn apply(x: <$width as Width>::V) -> <$width as Width>::V {
                $f(x)
            }
        }
    )*};
}

#[cfg(target_arch = "x86_64")]
lanes! {
    Silu at Avx2: crate::vmath::silu8;
    Gelu at Avx2: crate::vmath::gelu8;
    Silu at Avx512: crate::vmath::silu16;
    Gelu at Avx512: crate::vmath::gelu16;
}

/// `row = F(row + bias + residual)`, `W::LANES` values at a time.
///
/// # Safety
/// The CPU has the width's features (the caller is compiled for them).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn lanes_row<W: Width, F: Lanes<W>>(row: &mut [f32], bias: Bias, residual: Option<&[f32]>) {
    let (len, n) = (row.len(), W::LANES);
    let residual = residual.map(|r| &r[..len]);
    if let Bias::Columns(b) = bias {
        assert!(b.len() >= len, "a bias per value");
    }
    let whole = len / n * n;
    for i in (0..whole).step_by(n) {
        let y = row.as_mut_ptr().add(i);
        let b = match bias {
            Bias::Row(b) => W::splat(b),
            Bias::Columns(b) => W::load(b.as_ptr().add(i)),
        };
        let mut v = W::add(W::load(y), b);
        if let Some(r) = residual {
            v = W::add(v, W::load(r.as_ptr().add(i)));
        }
        W::store(y, F::apply(v));
    }
    // The rest through the same lanes, so that a value's result never
    // depends on where a row starts or ends (that is, on the tiling, which
    // depends on the batch).
    let rest = len - whole;
    if rest > 0 {
        // Room for the widest form's lanes.
        const { assert!(W::LANES <= 16) };
        let mut lanes = [0f32; 16];
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
        W::store(lanes.as_mut_ptr(), F::apply(W::load(lanes.as_ptr())));
        row[whole..].copy_from_slice(&lanes[..rest]);
    }
}

/// [`lanes_row`] eight values at a time.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn lanes_row_avx2<F: Lanes<Avx2>>(row: &mut [f32], bias: Bias, residual: Option<&[f32]>) {
    lanes_row::<Avx2, F>(row, bias, residual)
}

/// [`lanes_row`] sixteen values at a time: on Zen 4 about twice as fast per
/// value as eight (see `vmath::silu16`).
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn lanes_row_avx512<F: Lanes<Avx512>>(
    row: &mut [f32],
    bias: Bias,
    residual: Option<&[f32]>,
) {
    lanes_row::<Avx512, F>(row, bias, residual)
}

/// Whether SiLU, GELU and the gemm's register tile use AVX-512F: where the
/// CPU has it, unless `FOVEA_AVX512=off` (read once), which keeps their
/// AVX2 forms, to compare the two.
#[cfg(target_arch = "x86_64")]
pub(crate) fn use_avx512() -> bool {
    static USE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *USE.get_or_init(|| {
        is_x86_feature_detected!("avx512f")
            && std::env::var("FOVEA_AVX512").map_or(true, |v| v != "off")
    })
}

/// Runs `row = act(row + bias + residual)` through a lane form where `act`
/// has one and the CPU has AVX2 (or AVX-512F); false where it did nothing.
#[inline(always)]
fn finish_in_lanes(row: &mut [f32], bias: Bias, residual: Option<&[f32]>, act: Activation) -> bool {
    #[cfg(target_arch = "x86_64")]
    if matches!(act, Activation::Silu | Activation::Gelu) && use_avx512() {
        // SAFETY: the CPU has AVX-512F.
        unsafe {
            match act {
                Activation::Silu => lanes_row_avx512::<Silu>(row, bias, residual),
                _ => lanes_row_avx512::<Gelu>(row, bias, residual),
            }
        }
        return true;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len as u32)
            .map(|i| ((i * 7919 + seed * 104_729) % 2000) as f32 / 150.0 - 6.5)
            .collect()
    }

    /// Every lane form (eight and sixteen lanes, where the CPU has them)
    /// gives each value the same bits however its row is cut (the tiling,
    /// which depends on the batch), and stays within 3e-7 of the scalar form.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn lane_forms_do_not_depend_on_where_a_row_is_cut() {
        type RowFn = unsafe fn(&mut [f32], Bias, Option<&[f32]>);
        type Form = (&'static str, RowFn, fn(f32) -> f32);
        let mut forms: Vec<Form> = Vec::new();
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            forms.push(("silu8", lanes_row_avx2::<Silu>, silu));
            forms.push(("gelu8", lanes_row_avx2::<Gelu>, gelu));
        }
        if is_x86_feature_detected!("avx512f") {
            forms.push(("silu16", lanes_row_avx512::<Silu>, silu));
            forms.push(("gelu16", lanes_row_avx512::<Gelu>, gelu));
        }
        let len = 53;
        let (row, bias, residual) = (values(len, 1), values(len, 2), values(len, 3));
        for (name, form, scalar) in forms {
            let mut whole = row.clone();
            // SAFETY: the CPU has the form's features (checked above).
            unsafe { form(&mut whole, Bias::Columns(&bias), Some(&residual)) };
            for (i, &got) in whole.iter().enumerate() {
                let want = scalar(row[i] + bias[i] + residual[i]);
                let tol = 3e-7 * want.abs().max(1.0);
                assert!((got - want).abs() <= tol, "{name}[{i}]: {got} vs {want}");
            }
            for cut in [1, 7, 8, 9, 15, 16, 17, 31, 40] {
                let mut parts = row.clone();
                let (a, b) = parts.split_at_mut(cut);
                // SAFETY: as above.
                unsafe {
                    form(a, Bias::Columns(&bias[..cut]), Some(&residual[..cut]));
                    form(b, Bias::Columns(&bias[cut..]), Some(&residual[cut..]));
                }
                for (i, (p, w)) in parts.iter().zip(&whole).enumerate() {
                    assert_eq!(p.to_bits(), w.to_bits(), "{name} cut at {cut}: [{i}]");
                }
            }
            // One bias for the whole row, as a convolution's channel has.
            let mut by_row = row.clone();
            let mut by_column = row.clone();
            let same = vec![0.25f32; len];
            // SAFETY: as above.
            unsafe {
                form(&mut by_row, Bias::Row(0.25), None);
                form(&mut by_column, Bias::Columns(&same), None);
            }
            assert_eq!(by_row, by_column, "{name}: a row's bias and a column's");
        }
    }
}
