//! Scalar math written so that loops over it vectorise (no branches, no
//! calls), and the macro that compiles such loops a second time for AVX2 and
//! FMA, picked at run time: the default build targets plain x86-64.

/// Defines `fn NAME(args)` that runs `body` compiled for AVX2 + FMA when the
/// CPU has them, and for the baseline target otherwise.
macro_rules! avx2_dispatch {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn generic($($arg: $ty),*) $body

            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    generic($($arg),*)
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `avx2` is compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
    // The same for an unsafe function: the caller keeps its contract.
    ($(#[$meta:meta])* $vis:vis unsafe fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        $vis unsafe fn $name($($arg: $ty),*) {
            #[inline(always)]
            unsafe fn generic($($arg: $ty),*) $body

            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    // SAFETY: the caller keeps `$name`'s contract.
                    unsafe { generic($($arg),*) }
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `avx2` is compiled
                    // for, and the caller keeps `$name`'s contract.
                    return unsafe { avx2($($arg),*) };
                }
            }
            // SAFETY: the caller keeps `$name`'s contract.
            unsafe { generic($($arg),*) }
        }
    };
}
pub(crate) use avx2_dispatch;

/// [`exp`]'s polynomial in the reduced argument, highest power first.
const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// [`erf`]'s Maclaurin series in x^2 (times x), highest power first.
// The coefficients keep the digits they were derived with.
#[allow(clippy::excessive_precision)]
const ERF_SERIES: [f32; 12] = [
    -1.089_222_1e-9,
    1.312_253_3e-8,
    -1.450_385_2e-7,
    1.458_916_9e-6,
    -1.322_751_3e-5,
    1.068_376_1e-4,
    -7.575_757_6e-4,
    4.629_629_6e-3,
    -2.380_952_4e-2,
    0.1,
    -0.333_333_34,
    1.0,
];

/// [`erf`]'s tail form's polynomial in t (Abramowitz & Stegun 7.1.26),
/// highest power first.
#[allow(clippy::excessive_precision)]
const ERF_TAIL: [f32; 5] = [
    1.061_405_4,
    -1.453_152,
    1.421_413_8,
    -0.284_496_74,
    0.254_829_6,
];

/// e^x within 2 ulp over the f32 range (Cody-Waite reduction and a degree-5
/// minimax polynomial, the classic single-precision method). Below -87 it
/// returns e^-87 (1.6e-38) rather than a denormal or zero.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = EXP_POLY[1..].iter().fold(EXP_POLY[0], |p, &c| p * r + c);
    let e = p * r * r + r + 1.0;
    // 2^n built in the exponent bits. n + 127 is an integer in 2..=254 here;
    // adding 2^23 puts it in the low mantissa bits, which avoids a
    // float-to-int conversion that would not vectorise.
    let biased = (n + 127.0 + 8_388_608.0).to_bits() - 0x4b00_0000;
    e * f32::from_bits(biased << 23)
}

/// `x * sigmoid(x)`.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// [`exp`] on eight lanes with AVX2 and FMA, the same steps.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn exp8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let set = |v: f32| _mm256_set1_ps(v);
    let x = _mm256_max_ps(_mm256_min_ps(x, set(88.0)), set(-87.0));
    let n = _mm256_floor_ps(_mm256_fmadd_ps(x, set(std::f32::consts::LOG2_E), set(0.5)));
    let r = _mm256_fnmadd_ps(n, set(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, set(-2.121_944_4e-4), r);
    let mut p = set(EXP_POLY[0]);
    for &c in &EXP_POLY[1..] {
        p = _mm256_fmadd_ps(p, r, set(c));
    }
    let e = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, set(1.0)));
    let biased = _mm256_castps_si256(_mm256_add_ps(n, set(127.0 + 8_388_608.0)));
    let scale = _mm256_slli_epi32::<23>(_mm256_sub_epi32(biased, _mm256_set1_epi32(0x4b00_0000)));
    _mm256_mul_ps(e, _mm256_castsi256_ps(scale))
}

/// [`silu`] on eight lanes with AVX2 and FMA: [`exp8`], and
/// `1 / (1 + e^-x)` from the CPU's 12-bit reciprocal refined by two Newton
/// steps instead of a division, which took as long as all the rest
/// (`perf`: half of EfficientNet's SiLU epilogues).
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn silu8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let one = _mm256_set1_ps(1.0);
    let d = _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x)));
    // Each Newton step squares the relative error and leaves the result
    // below 1/d; after one, that bias (up to 1.4e-7) is systematic, and
    // through a network's layers it showed (yolov5_tiny's scores moved from
    // 3.6e-5 to 1.7e-4 of scale). After two only the rounding is left.
    let mut r = _mm256_rcp_ps(d);
    for _ in 0..2 {
        r = _mm256_fmadd_ps(r, _mm256_fnmadd_ps(d, r, one), r);
    }
    _mm256_mul_ps(x, r)
}

/// [`exp`] on sixteen lanes with AVX-512F, the same steps but for 2^n,
/// which `vscalefps` applies (the same value: a power of two scales
/// exactly).
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn exp16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let set = |v: f32| _mm512_set1_ps(v);
    let x = _mm512_max_ps(_mm512_min_ps(x, set(88.0)), set(-87.0));
    let n = _mm512_fmadd_ps(x, set(std::f32::consts::LOG2_E), set(0.5));
    // Round toward minus infinity, exceptions suppressed: floor.
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(n);
    let r = _mm512_fnmadd_ps(n, set(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, set(-2.121_944_4e-4), r);
    let mut p = set(EXP_POLY[0]);
    for &c in &EXP_POLY[1..] {
        p = _mm512_fmadd_ps(p, r, set(c));
    }
    let e = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, set(1.0)));
    _mm512_scalef_ps(e, n)
}

/// [`silu`] on sixteen lanes with AVX-512F: [`exp16`], then `x * (1 / d)`
/// with a true division, the same two roundings as [`silu8`]'s (whose two
/// Newton steps give the rounded reciprocal in all but a few cases: 1.5% of
/// 16.6 million inputs differ from it, by one in the last bit): yolov5_tiny's
/// conformance is sensitive to that rounding (`x / d`, one rounding, moved
/// its scores from 6.0e-5 to 8.3e-5 of their scale). On this project's Zen
/// 4 machines a 512-bit operation issues as one instruction over two
/// cycles, and SiLU is bound by the instructions issued, not the
/// arithmetic: 0.34-0.39 ns per value against [`silu8`]'s 0.64, in runs of
/// a standalone loop over an L1-resident row.
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn silu16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let one = _mm512_set1_ps(1.0);
    let d = _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x)));
    _mm512_mul_ps(x, _mm512_div_ps(one, d))
}

/// [`gelu`] on eight lanes with AVX2 and FMA: [`erf`]'s two forms with
/// fused multiply-adds, one selected per lane. Written out because the
/// compiler left the scalar form unvectorised in the linear layers'
/// epilogue, whose rows are 16 values long (1.6 ms of ViT-B/16's 6.4 ms
/// fc1 layer at batch 1).
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn gelu8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let set = |v: f32| _mm256_set1_ps(v);
    let one = set(1.0);
    let sign = set(-0.0);
    let u = _mm256_mul_ps(x, set(std::f32::consts::FRAC_1_SQRT_2));
    let a = _mm256_andnot_ps(sign, u);
    let u2 = _mm256_mul_ps(u, u);
    let mut s = set(ERF_SERIES[0]);
    for &c in &ERF_SERIES[1..] {
        s = _mm256_fmadd_ps(s, u2, set(c));
    }
    let series = _mm256_mul_ps(_mm256_mul_ps(set(std::f32::consts::FRAC_2_SQRT_PI), u), s);
    let t = _mm256_div_ps(one, _mm256_fmadd_ps(set(0.327_591_1), a, one));
    let mut p = set(ERF_TAIL[0]);
    for &c in &ERF_TAIL[1..] {
        p = _mm256_fmadd_ps(p, t, set(c));
    }
    let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), u2));
    let tail = _mm256_fnmadd_ps(_mm256_mul_ps(p, t), e, one);
    let tail = _mm256_or_ps(tail, _mm256_and_ps(sign, u));
    let erf = _mm256_blendv_ps(tail, series, _mm256_cmp_ps::<_CMP_LT_OQ>(a, one));
    _mm256_mul_ps(_mm256_mul_ps(set(0.5), x), _mm256_add_ps(one, erf))
}

/// [`gelu`] on sixteen lanes with AVX-512F: [`gelu8`]'s steps, with
/// [`exp16`].
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn gelu16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let set = |v: f32| _mm512_set1_ps(v);
    let one = set(1.0);
    let u = _mm512_mul_ps(x, set(std::f32::consts::FRAC_1_SQRT_2));
    let a = _mm512_abs_ps(u);
    let u2 = _mm512_mul_ps(u, u);
    let mut s = set(ERF_SERIES[0]);
    for &c in &ERF_SERIES[1..] {
        s = _mm512_fmadd_ps(s, u2, set(c));
    }
    let series = _mm512_mul_ps(_mm512_mul_ps(set(std::f32::consts::FRAC_2_SQRT_PI), u), s);
    let t = _mm512_div_ps(one, _mm512_fmadd_ps(set(0.327_591_1), a, one));
    let mut p = set(ERF_TAIL[0]);
    for &c in &ERF_TAIL[1..] {
        p = _mm512_fmadd_ps(p, t, set(c));
    }
    let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), u2));
    let tail = _mm512_fnmadd_ps(_mm512_mul_ps(p, t), e, one);
    // tail carries u's sign: the integer forms need only AVX-512F.
    let sign = _mm512_and_si512(_mm512_castps_si512(u), _mm512_set1_epi32(i32::MIN));
    let tail = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(tail), sign));
    let erf = _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_LT_OQ>(a, one), tail, series);
    _mm512_mul_ps(_mm512_mul_ps(set(0.5), x), _mm512_add_ps(one, erf))
}

/// erf(x) within 2e-7 (relative below |x| = 1, absolute above): its
/// Maclaurin series to x^23 below 1, where the series is exact to 1e-9 and
/// the next form would lose digits to cancellation, and Abramowitz & Stegun
/// 7.1.26 (1.5e-7 absolute, the form PyTorch's vectorised CPU `erf` uses)
/// above. Both are computed and one selected, so that loops vectorise.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let x2 = x * x;
    let s = ERF_SERIES[1..]
        .iter()
        .fold(ERF_SERIES[0], |s, &c| s * x2 + c);
    let series = std::f32::consts::FRAC_2_SQRT_PI * x * s;
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let p = ERF_TAIL[1..].iter().fold(ERF_TAIL[0], |p, &c| p * t + c);
    let tail = (1.0 - p * t * exp(-x2)).copysign(x);
    if a < 1.0 {
        series
    } else {
        tail
    }
}

/// The exact (erf) GELU: `x * (1 + erf(x / sqrt 2)) / 2`.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worst of `f(x)` against `want(x)` in f64 over `[lo, hi)`, as
    /// `|got - want| / max(|want|, floor)`.
    fn worst(lo: f32, hi: f32, f: fn(f32) -> f32, want: fn(f64) -> f64, floor: f64) -> f64 {
        let mut worst = 0f64;
        let mut x = lo;
        while x < hi {
            let w = want(x as f64);
            worst = worst.max((f(x) as f64 - w).abs() / w.abs().max(floor));
            x += 0.0137;
        }
        worst
    }

    #[test]
    fn exp_is_accurate_over_the_range() {
        // 2 ulp of f32 is 2.4e-7.
        let e = worst(-87.0, 88.0, exp, f64::exp, 0.0);
        assert!(e < 2.5e-7, "worst relative error {e:e}");
        assert_eq!(exp(0.0), 1.0);
        assert!(silu(-200.0).abs() < 1e-30);
        assert_eq!(silu(200.0), 200.0);
    }

    /// A lane function `f` (8 or 16 lanes, `lanes`) over `[lo, hi)`
    /// against `error(x, got)`: the worst |error| over all x, and the mean
    /// error over the x where `in_mean(x)`.
    #[cfg(target_arch = "x86_64")]
    fn sweep<const N: usize>(
        f: impl Fn([f32; N]) -> [f32; N],
        (lo, hi): (f32, f32),
        error: impl Fn(f64, f64) -> f64,
        in_mean: impl Fn(f32) -> bool,
    ) -> (f64, f64) {
        let (mut worst, mut sum, mut count) = (0f64, 0f64, 0);
        let mut x = lo;
        while x < hi {
            let lanes: [f32; N] = std::array::from_fn(|i| x + i as f32 * 0.0011);
            for (&g, &x) in f(lanes).iter().zip(&lanes) {
                let e = error(x as f64, g as f64);
                worst = worst.max(e.abs());
                if in_mean(x) {
                    sum += e;
                    count += 1;
                }
            }
            x += 0.0137;
        }
        (worst, sum / count as f64)
    }

    /// [`sweep`] of an eight-lane AVX2 function; None without AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    fn sweep8(
        f: unsafe fn(std::arch::x86_64::__m256) -> std::arch::x86_64::__m256,
        range: (f32, f32),
        error: impl Fn(f64, f64) -> f64,
        in_mean: impl Fn(f32) -> bool,
    ) -> Option<(f64, f64)> {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            return None;
        }
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        let f = |lanes: [f32; 8]| unsafe {
            use std::arch::x86_64::*;
            std::mem::transmute::<__m256, [f32; 8]>(f(_mm256_loadu_ps(lanes.as_ptr())))
        };
        Some(sweep(f, range, error, in_mean))
    }

    /// [`sweep`] of a sixteen-lane AVX-512F function; None without it.
    #[cfg(target_arch = "x86_64")]
    fn sweep16(
        f: unsafe fn(std::arch::x86_64::__m512) -> std::arch::x86_64::__m512,
        range: (f32, f32),
        error: impl Fn(f64, f64) -> f64,
        in_mean: impl Fn(f32) -> bool,
    ) -> Option<(f64, f64)> {
        if !is_x86_feature_detected!("avx512f") {
            return None;
        }
        // SAFETY: the CPU has AVX-512F (checked above).
        let f = |lanes: [f32; 16]| unsafe {
            use std::arch::x86_64::*;
            std::mem::transmute::<__m512, [f32; 16]>(f(_mm512_loadu_ps(lanes.as_ptr())))
        };
        Some(sweep(f, range, error, in_mean))
    }

    /// SiLU's error against f64: relative, but absolute where SiLU
    /// underflows towards 0 (below -87, where the reciprocal flushes it to 0).
    #[cfg(target_arch = "x86_64")]
    fn silu_error(x: f64, got: f64) -> f64 {
        let want = x / (1.0 + (-x).exp());
        (got - want) / want.abs().max(1e-25)
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn silu_lanes_are_accurate() {
        let results = [
            (
                "silu8",
                sweep8(silu8, (-100.0, 100.0), silu_error, |x| x.abs() < 80.0),
            ),
            (
                "silu16",
                sweep16(silu16, (-100.0, 100.0), silu_error, |x| x.abs() < 80.0),
            ),
        ];
        for (name, result) in results {
            let Some((worst, bias)) = result else {
                continue;
            };
            assert!(worst < 3e-7, "{name}: worst relative error {worst:e}");
            // A one-sided error adds up through a network's layers.
            assert!(bias.abs() < 2e-8, "{name}: mean relative error {bias:e}");
        }
    }

    /// erf in f64: Simpson's rule on `2/sqrt(pi) e^(-t^2)` over `[0, x]`,
    /// accurate to about 1e-15 with 20000 steps at |x| < 6.
    fn erf64(x: f64) -> f64 {
        if x.abs() >= 6.0 {
            return x.signum();
        }
        let n = 20_000;
        let h = x / n as f64;
        let f = |t: f64| (-t * t).exp();
        let mut s = f(0.0) + f(x);
        for i in 1..n {
            s += f(i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
        }
        s * h / 3.0 * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn erf_and_gelu_are_accurate() {
        // Relative below 1, absolute above.
        let e = worst(-7.0, 7.0, erf, erf64, 1.0);
        assert!(e < 2e-7, "erf worst error {e:e}");
        let e = worst(-1.0, 1.0, erf, erf64, 0.0);
        assert!(e < 2e-7, "erf worst relative error below 1: {e:e}");
        assert_eq!(erf(0.0), 0.0);
        assert_eq!(erf(-0.5), -erf(0.5));
        // Where GELU is near zero for negative x, 1 + erf cancels (in
        // PyTorch's formula too): the error is bounded relative to |x|, the
        // rounding of the input itself.
        let mut e = 0f64;
        let mut x = -8.0f32;
        while x < 8.0 {
            let want = 0.5 * x as f64 * (1.0 + erf64(x as f64 / std::f64::consts::SQRT_2));
            e = e.max((gelu(x) as f64 - want).abs() / want.abs().max(x.abs() as f64));
            x += 0.0137;
        }
        assert!(e < 3e-7, "gelu worst error {e:e}");
        // The lane forms, by the same measure.
        #[cfg(target_arch = "x86_64")]
        {
            let error = |x: f64, got: f64| {
                let want = 0.5 * x * (1.0 + erf64(x / std::f64::consts::SQRT_2));
                (got - want) / want.abs().max(x.abs())
            };
            let results = [
                ("gelu8", sweep8(gelu8, (-12.0, 12.0), error, |_| true)),
                ("gelu16", sweep16(gelu16, (-12.0, 12.0), error, |_| true)),
            ];
            for (name, result) in results {
                if let Some((worst, bias)) = result {
                    assert!(worst < 3e-7, "{name} worst error {worst:e}");
                    assert!(bias.abs() < 2e-8, "{name} mean error {bias:e}");
                }
            }
        }
        assert_eq!(gelu(0.0), 0.0);
        assert_eq!(gelu(20.0), 20.0);
        assert_eq!(gelu(-20.0), 0.0);
    }
}
