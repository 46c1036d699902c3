//! DETR input preprocessing, as Hugging Face transformers 5.x prepares images
//! for `facebook/detr-resnet-50`: resize so the shorter side is
//! `shortest_edge` unless the longer side would exceed `longest_edge`, rescale
//! by 1/255, normalise, and pad a batch to its largest height and width with a
//! `pixel_mask`.
//!
//! The reference is `DetrImageProcessor`, the class `AutoImageProcessor`
//! returns for that checkpoint in transformers 5 (the torchvision backend;
//! `DetrImageProcessorPil` is only used when asked for). What it does, and
//! what is reproduced here:
//!
//! - the output size is `get_size_with_aspect_ratio`'s, with its float64
//!   arithmetic, Python's round-half-to-even and `int()` truncation (so a
//!   capped long side can come out one pixel short, e.g. 1332);
//! - the resize is torchvision's antialiased bilinear on the uint8 image, which
//!   on x86 with AVX2 (and on ARM) is ATen's native uint8 kernel: Pillow's
//!   triangle filter with the support scaled by the downscale factor, weights
//!   quantised to i16 with a precision chosen from the largest weight,
//!   horizontal pass first with a uint8 intermediate. `fast_image_resize`'s
//!   convolution quantises the same way (both follow Pillow-SIMD), so two
//!   separate passes through it give ATen's bytes. Pillow itself keeps 22
//!   fractional bits, which is why the PIL backend can differ by 1 level (as
//!   can torchvision on x86 without AVX2, which resizes in f32 instead);
//! - rescale and normalise are fused as the processor fuses them, in f32:
//!   `(v - mean * 255) / (std * 255)`, each product and the quotient rounded to
//!   f32 once, so the values are the processor's to the last bit;
//! - padding adds zeros (after normalisation) at the bottom and right.
//!
//! `fast_image_resize` caps that precision at 21 fractional bits where ATen
//! allows 22. Only an axis downscaled by more than about 140 gets there
//! (largest weight under 1/128; the edge windows, cut by the image border,
//! hold the largest); such an axis is resampled here by a plain
//! implementation of ATen's arithmetic instead (a 60000-pixel-wide image
//! shrunk to 400 moved 1 sample in 3600 by 1 level otherwise).

use std::borrow::Cow;

use candle_core::{DType, Device, Tensor};
use fast_image_resize::images::{Image as FirImage, ImageRef as FirImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::preprocess::{IMAGENET_MEAN, IMAGENET_STD, MAX_SIDE};

/// `facebook/detr-resnet-50`'s `size.shortest_edge`.
pub const DETR_SHORTEST_EDGE: u32 = 800;
/// `facebook/detr-resnet-50`'s `size.longest_edge`.
pub const DETR_LONGEST_EDGE: u32 = 1333;

/// Resize and normalisation settings of DETR's image processor. Samples are
/// rescaled by 1/255 before `mean` and `std` apply (`do_rescale` with
/// `rescale_factor` 1/255, as every DETR checkpoint configures it).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DetrResize {
    /// Target of the shorter side.
    pub shortest_edge: u32,
    /// Cap on the longer side (give or take the reference's rounding).
    pub longest_edge: u32,
    /// Per channel (R, G, B), on the [0, 1] scale.
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for DetrResize {
    fn default() -> Self {
        Self {
            shortest_edge: DETR_SHORTEST_EDGE,
            longest_edge: DETR_LONGEST_EDGE,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }
}

/// Why an image or a batch could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum DetrPreprocessError {
    #[error("invalid DETR preprocessing: {0}")]
    InvalidConfig(String),
    #[error("the image has no pixels ({width}x{height})")]
    EmptyImage { width: u32, height: u32 },
    /// The reference rounds the shorter side to 0 for very elongated images
    /// (and then fails in torch's interpolate).
    #[error("a {width}x{height} image resizes to {out_width}x{out_height}")]
    EmptyOutput {
        width: u32,
        height: u32,
        out_width: u32,
        out_height: u32,
    },
    #[error("image {index} holds {got} values, 3x{height}x{width} needs {expected}")]
    BadImage {
        index: usize,
        height: u32,
        width: u32,
        expected: usize,
        got: usize,
    },
    #[error("an empty batch cannot be padded")]
    EmptyBatch,
    #[error("resize: {0}")]
    Resize(String),
}

/// One preprocessed image: CHW f32, `3 * height * width` values.
#[derive(Clone, Debug, PartialEq)]
pub struct DetrImage {
    pub values: Vec<f32>,
    pub height: u32,
    pub width: u32,
}

/// A padded batch: `pixel_values` is `[batch, 3, height, width]` and
/// `pixel_mask` `[batch, height, width]` (1 on image pixels, 0 on padding).
#[derive(Clone, Debug, PartialEq)]
pub struct DetrBatch {
    pub pixel_values: Vec<f32>,
    pub pixel_mask: Vec<u8>,
    pub batch: usize,
    pub height: u32,
    pub width: u32,
}

impl DetrBatch {
    /// `pixel_values` as a `[batch, 3, height, width]` tensor of `dtype` and
    /// `pixel_mask` as a `[batch, height, width]` u8 tensor, on `device`.
    pub fn to_tensors(
        &self,
        device: &Device,
        dtype: DType,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (h, w) = (self.height as usize, self.width as usize);
        let values = Tensor::from_slice(&self.pixel_values, (self.batch, 3, h, w), device)?
            .to_dtype(dtype)?;
        let mask = Tensor::from_slice(&self.pixel_mask, (self.batch, h, w), device)?;
        Ok((values, mask))
    }
}

impl DetrResize {
    /// Checks that the settings are usable; call it on deserialised configs.
    pub fn validate(&self) -> Result<(), DetrPreprocessError> {
        let invalid = |msg: String| Err(DetrPreprocessError::InvalidConfig(msg));
        for (name, side) in [
            ("shortest_edge", self.shortest_edge),
            ("longest_edge", self.longest_edge),
        ] {
            if side == 0 || side > MAX_SIDE {
                return invalid(format!("{name} {side} must be between 1 and {MAX_SIDE}"));
            }
        }
        let finite = |v: &[f32; 3]| v.iter().all(|x| x.is_finite());
        if !finite(&self.mean) || !finite(&self.std) {
            return invalid("mean and std must be finite".into());
        }
        if self.std.contains(&0.0) {
            return invalid("std must not be zero".into());
        }
        Ok(())
    }

    /// The (height, width) a `height` x `width` image is resized to:
    /// transformers' `get_size_with_aspect_ratio(image_size, shortest_edge,
    /// longest_edge)`, including its rounding.
    pub fn output_size(&self, height: u32, width: u32) -> Result<(u32, u32), DetrPreprocessError> {
        if height == 0 || width == 0 {
            return Err(DetrPreprocessError::EmptyImage { width, height });
        }
        let (h, w) = (f64::from(height), f64::from(width));
        let (short, long) = (h.min(w), h.max(w));
        let longest = f64::from(self.longest_edge);
        let mut size = u64::from(self.shortest_edge);
        // When the long side would pass the cap, the short side becomes
        // `round(cap * short / long)` and the long side is derived from the
        // unrounded value; Python evaluates both left to right in float64.
        let mut raw = None;
        if long / short * size as f64 > longest {
            let r = longest * short / long;
            size = r.round_ties_even() as u64;
            raw = Some(r);
        }
        let (height64, width64) = (u64::from(height), u64::from(width));
        // `int(x)` truncates; `size * side` is an exact integer product in
        // Python, exact in f64 too (both factors are far below 2^26).
        let other = |num: f64, den: f64| match raw {
            Some(r) => (r * num / den) as u64,
            None => (size as f64 * num / den) as u64,
        };
        let (oh, ow) =
            if (height <= width && height64 == size) || (width <= height && width64 == size) {
                (height64, width64)
            } else if width < height {
                (other(h, w), size)
            } else {
                (size, other(w, h))
            };
        // Both are at most max(height, width, longest_edge + 1) here.
        let (out_height, out_width) = (oh as u32, ow as u32);
        if out_height == 0 || out_width == 0 {
            return Err(DetrPreprocessError::EmptyOutput {
                width,
                height,
                out_width,
                out_height,
            });
        }
        Ok((out_height, out_width))
    }

    /// Resizes, rescales and normalises one image into CHW f32.
    pub fn apply(&self, image: &RgbImage) -> Result<DetrImage, DetrPreprocessError> {
        self.validate()?;
        let (width, height) = image.dimensions();
        let (out_height, out_width) = self.output_size(height, width)?;
        let resized;
        let pixels: &[u8] = if (out_height, out_width) == (height, width) {
            // The reference returns the image untouched (the filter would
            // copy it anyway: its weights are 1 and 0 at scale 1).
            image.as_raw()
        } else {
            resized = resize_bilinear(image, out_width, out_height)?;
            &resized
        };
        let lut = self.normalisation_table();
        let plane = out_height as usize * out_width as usize;
        let mut values = vec![0.0f32; 3 * plane];
        let (r, rest) = values.split_at_mut(plane);
        let (g, b) = rest.split_at_mut(plane);
        for (px, ((r, g), b)) in pixels
            .chunks_exact(3)
            .zip(r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()))
        {
            *r = lut[0][usize::from(px[0])];
            *g = lut[1][usize::from(px[1])];
            *b = lut[2][usize::from(px[2])];
        }
        Ok(DetrImage {
            values,
            height: out_height,
            width: out_width,
        })
    }

    /// The fused rescale + normalise of the processor, per 8-bit value:
    /// `mean * (1 / rescale_factor)` and `std * (1 / rescale_factor)` are
    /// f32 products (1 / (1/255) is exactly 255.0 in float64), then
    /// `(v - mean255) / std255` in f32.
    fn normalisation_table(&self) -> [[f32; 256]; 3] {
        let mut lut = [[0.0; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            let mean = self.mean[c] * 255.0;
            let std = self.std[c] * 255.0;
            for (v, slot) in table.iter_mut().enumerate() {
                *slot = (v as f32 - mean) / std;
            }
        }
        lut
    }
}

/// Antialiased bilinear resize of an RGB8 image, horizontal pass first with
/// a uint8 intermediate, as ATen's uint8 kernel does it. Given both axes at
/// once `fast_image_resize` would run the vertical pass first, whose rounding
/// between the passes differs; each call below changes one axis only, so it
/// runs exactly one pass.
fn resize_bilinear(
    image: &RgbImage,
    out_width: u32,
    out_height: u32,
) -> Result<Vec<u8>, DetrPreprocessError> {
    let (width, height) = image.dimensions();
    let mut resizer = Resizer::new();
    let rows = if out_width == width {
        Cow::Borrowed(image.as_raw().as_slice())
    } else {
        let weights = AxisWeights::new(width as usize, out_width as usize);
        Cow::Owned(if weights.precision > FIR_MAX_PRECISION {
            weights.horizontal(image.as_raw(), height as usize)
        } else {
            fir_pass(
                &mut resizer,
                image.as_raw(),
                (width, height),
                (out_width, height),
            )?
        })
    };
    if out_height == height {
        return Ok(rows.into_owned());
    }
    let weights = AxisWeights::new(height as usize, out_height as usize);
    if weights.precision > FIR_MAX_PRECISION {
        Ok(weights.vertical(&rows, out_width as usize))
    } else {
        fir_pass(
            &mut resizer,
            &rows,
            (out_width, height),
            (out_width, out_height),
        )
    }
}

/// The most fractional bits `fast_image_resize` gives its i16 weights.
const FIR_MAX_PRECISION: u32 = 21;

/// One `fast_image_resize` convolution pass between interleaved RGB8 buffers.
fn fir_pass(
    resizer: &mut Resizer,
    src: &[u8],
    (width, height): (u32, u32),
    (out_width, out_height): (u32, u32),
) -> Result<Vec<u8>, DetrPreprocessError> {
    let err = |e: &dyn std::fmt::Display| DetrPreprocessError::Resize(e.to_string());
    let src = FirImageRef::new(width, height, src, PixelType::U8x3).map_err(|e| err(&e))?;
    let mut out = FirImage::new(out_width, out_height, PixelType::U8x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    resizer
        .resize(&src, &mut out, &options)
        .map_err(|e| err(&e))?;
    Ok(out.into_vec())
}

/// ATen's quantised antialiased bilinear weights along one axis: Pillow's
/// windows and triangle filter in f64, normalised per output sample, then
/// scaled by `2^precision` and rounded half away from zero to i16, where
/// `precision` (at most 22) is the largest that keeps the biggest weight
/// doubled under 2^15.
struct AxisWeights {
    /// First source index of each output sample's window.
    starts: Vec<usize>,
    /// `window` weights per output sample, zero beyond its own length.
    weights: Vec<i16>,
    window: usize,
    precision: u32,
}

impl AxisWeights {
    fn new(in_size: usize, out_size: usize) -> Self {
        let scale = in_size as f64 / out_size as f64;
        let (support, inv_scale) = if scale >= 1.0 {
            (scale, 1.0 / scale)
        } else {
            (1.0, 1.0)
        };
        let window = support.ceil() as usize * 2 + 1;
        let mut starts = Vec::with_capacity(out_size);
        let mut real = vec![0.0f64; out_size * window];
        let mut max_weight = 0.0f64;
        for (i, w) in real.chunks_exact_mut(window).enumerate() {
            let centre = scale * (i as f64 + 0.5);
            // Truncating casts, as C++'s int64 conversions.
            let start = ((centre - support + 0.5) as i64).max(0) as usize;
            let end = ((centre + support + 0.5) as i64).min(in_size as i64) as usize;
            let len = end.saturating_sub(start).min(window);
            let mut total = 0.0;
            for (j, slot) in w[..len].iter_mut().enumerate() {
                let x = (((start + j) as f64 - centre) + 0.5) * inv_scale;
                *slot = (1.0 - x.abs()).max(0.0);
                total += *slot;
            }
            if total != 0.0 {
                for slot in &mut w[..len] {
                    *slot /= total;
                    max_weight = max_weight.max(*slot);
                }
            }
            starts.push(start);
        }
        let mut precision = 0;
        while precision < 22 {
            let next = (0.5 + max_weight * f64::from(1u32 << (precision + 1))) as i32;
            if next >= 1 << 15 {
                break;
            }
            precision += 1;
        }
        let unit = f64::from(1u32 << precision);
        let weights = real
            .iter()
            .map(|&w| (w * unit + 0.5f64.copysign(w)) as i16)
            .collect();
        Self {
            starts,
            weights,
            window,
            precision,
        }
    }

    fn out_size(&self) -> usize {
        self.starts.len()
    }

    /// Rounds the fixed-point sum back to 8 bits.
    fn finish(&self, acc: i32) -> u8 {
        (acc >> self.precision).clamp(0, 255) as u8
    }

    /// The samples of one output position: (first source index, weights).
    fn taps(&self, i: usize) -> (usize, &[i16]) {
        (
            self.starts[i],
            &self.weights[i * self.window..(i + 1) * self.window],
        )
    }

    /// Resamples each row of an RGB8 image of `rows` rows.
    fn horizontal(&self, src: &[u8], rows: usize) -> Vec<u8> {
        let (in_row, out_w) = (src.len() / rows, self.out_size());
        let mut out = vec![0u8; 3 * out_w * rows];
        for (src_row, dst_row) in src
            .chunks_exact(in_row)
            .zip(out.chunks_exact_mut(3 * out_w))
        {
            for (i, dst) in dst_row.chunks_exact_mut(3).enumerate() {
                let (start, w) = self.taps(i);
                let mut acc = [1i32 << (self.precision - 1); 3];
                for (px, &k) in src_row[3 * start..].chunks_exact(3).zip(w) {
                    for c in 0..3 {
                        acc[c] += i32::from(px[c]) * i32::from(k);
                    }
                }
                for c in 0..3 {
                    dst[c] = self.finish(acc[c]);
                }
            }
        }
        out
    }

    /// Resamples each column of an RGB8 image `width` pixels wide.
    fn vertical(&self, src: &[u8], width: usize) -> Vec<u8> {
        let row = 3 * width;
        let mut out = vec![0u8; row * self.out_size()];
        let mut acc = vec![0i32; row];
        for (i, dst_row) in out.chunks_exact_mut(row).enumerate() {
            let (start, w) = self.taps(i);
            acc.fill(1 << (self.precision - 1));
            for (src_row, &k) in src[row * start..].chunks_exact(row).zip(w) {
                for (a, &v) in acc.iter_mut().zip(src_row) {
                    *a += i32::from(v) * i32::from(k);
                }
            }
            for (d, &a) in dst_row.iter_mut().zip(&acc) {
                *d = self.finish(a);
            }
        }
        out
    }
}

/// Pads CHW images to the batch's largest height and width (zeros at the
/// bottom and right) and builds the pixel mask, like the processor's `pad`
/// with `do_pad` and no `pad_size`. Images keep their order.
pub fn pad_batch(images: &[DetrImage]) -> Result<DetrBatch, DetrPreprocessError> {
    for (index, img) in images.iter().enumerate() {
        let expected = 3 * img.height as usize * img.width as usize;
        if img.values.len() != expected || expected == 0 {
            return Err(DetrPreprocessError::BadImage {
                index,
                height: img.height,
                width: img.width,
                expected,
                got: img.values.len(),
            });
        }
    }
    let height = images
        .iter()
        .map(|i| i.height)
        .max()
        .ok_or(DetrPreprocessError::EmptyBatch)?;
    let width = images.iter().map(|i| i.width).max().unwrap_or(0);
    let (ph, pw) = (height as usize, width as usize);
    let mut pixel_values = vec![0.0f32; images.len() * 3 * ph * pw];
    let mut pixel_mask = vec![0u8; images.len() * ph * pw];
    for (img, (dst, mask)) in images.iter().zip(
        pixel_values
            .chunks_exact_mut(3 * ph * pw)
            .zip(pixel_mask.chunks_exact_mut(ph * pw)),
    ) {
        let (h, w) = (img.height as usize, img.width as usize);
        for (src_plane, dst_plane) in img
            .values
            .chunks_exact(h * w)
            .zip(dst.chunks_exact_mut(ph * pw))
        {
            for (src_row, dst_row) in src_plane
                .chunks_exact(w)
                .zip(dst_plane.chunks_exact_mut(pw))
            {
                dst_row[..w].copy_from_slice(src_row);
            }
        }
        for row in mask.chunks_exact_mut(pw).take(h) {
            row[..w].fill(1);
        }
    }
    Ok(DetrBatch {
        pixel_values,
        pixel_mask,
        batch: images.len(),
        height,
        width,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(
        shortest: u32,
        longest: u32,
        h: u32,
        w: u32,
    ) -> Result<(u32, u32), DetrPreprocessError> {
        DetrResize {
            shortest_edge: shortest,
            longest_edge: longest,
            ..DetrResize::default()
        }
        .output_size(h, w)
    }

    // Expected values from transformers' get_size_with_aspect_ratio.
    #[test]
    fn output_size_follows_the_reference() {
        let d = |h, w| size(800, 1333, h, w).unwrap();
        assert_eq!(d(300, 451), (800, 1202)); // chelsea: int(1202.67)
        assert_eq!(d(600, 512), (937, 800)); // grace_hopper, portrait
        assert_eq!(d(512, 512), (800, 800));
        assert_eq!(d(800, 1200), (800, 1200)); // already there: unchanged
        assert_eq!(d(1, 1), (800, 800)); // upscaled
        assert_eq!(d(4000, 6000), (800, 1200));
    }

    #[test]
    fn capped_long_side_uses_the_unrounded_short_side() {
        let d = |h, w| size(800, 1333, h, w).unwrap();
        assert_eq!(d(1080, 1920), (750, 1333));
        assert_eq!(d(3000, 1000), (1333, 444));
        // raw = 1333 * 300 / 1435 = 278.67 -> 279, but int(278.67 * 1435 /
        // 300) = int(1332.99...) = 1332.
        assert_eq!(d(300, 1435), (279, 1332));
        assert_eq!(d(1435, 300), (1332, 279));
        // raw = 444.5 exactly: Python rounds half to even.
        assert_eq!(d(889, 2666), (444, 1333));
        // The capped short side rounds back to the image's own: unchanged,
        // although the long side exceeds the cap.
        assert_eq!(d(300, 1334), (300, 1334));
        assert_eq!(size(30, 133, 30, 134).unwrap(), (30, 134));
        assert_eq!(size(64, 100, 20, 300).unwrap(), (7, 100));
        assert_eq!(d(2, 1000), (3, 1333));
    }

    #[test]
    fn degenerate_sizes_are_errors() {
        // round(1333 / 10000) = 0: the reference fails in interpolate.
        assert!(matches!(
            size(800, 1333, 1, 10_000),
            Err(DetrPreprocessError::EmptyOutput {
                out_height: 0,
                out_width: 1333,
                ..
            })
        ));
        assert_eq!(size(800, 1333, 10, 10_000).unwrap(), (1, 1333));
        assert!(matches!(
            size(64, 100, 7, 2000),
            Err(DetrPreprocessError::EmptyOutput { .. })
        ));
        assert!(matches!(
            size(800, 1333, 0, 5),
            Err(DetrPreprocessError::EmptyImage { .. })
        ));
    }

    #[test]
    fn invalid_settings_are_rejected() {
        let good = DetrResize::default();
        good.validate().unwrap();
        for bad in [
            DetrResize {
                shortest_edge: 0,
                ..good.clone()
            },
            DetrResize {
                longest_edge: MAX_SIDE + 1,
                ..good.clone()
            },
            DetrResize {
                std: [0.2, 0.0, 0.2],
                ..good.clone()
            },
            DetrResize {
                mean: [f32::NAN, 0.0, 0.0],
                ..good.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
            assert!(bad.apply(&RgbImage::new(4, 4)).is_err());
        }
        assert!(good.apply(&RgbImage::new(0, 4)).is_err());
    }

    #[test]
    fn serde_fills_defaults_and_round_trips() {
        let small: DetrResize = serde_json::from_str(r#"{"shortest_edge": 64}"#).unwrap();
        assert_eq!(
            small,
            DetrResize {
                shortest_edge: 64,
                ..DetrResize::default()
            }
        );
        let json = serde_json::to_string(&small).unwrap();
        assert_eq!(serde_json::from_str::<DetrResize>(&json).unwrap(), small);
        assert!(serde_json::from_str::<DetrResize>(r#"{"size": 3}"#).is_err());
    }

    #[test]
    fn normalises_into_planes() {
        let p = DetrResize {
            shortest_edge: 1,
            longest_edge: 2,
            ..DetrResize::default()
        };
        let img = RgbImage::from_raw(2, 1, vec![255, 127, 0, 1, 2, 3]).unwrap();
        let out = p.apply(&img).unwrap();
        assert_eq!((out.height, out.width), (1, 2));
        let f = |v: f32, c: usize| (v - IMAGENET_MEAN[c] * 255.0) / (IMAGENET_STD[c] * 255.0);
        let expected = [
            f(255.0, 0),
            f(1.0, 0),
            f(127.0, 1),
            f(2.0, 1),
            f(0.0, 2),
            f(3.0, 2),
        ];
        assert_eq!(out.values, expected);
    }

    #[test]
    fn flat_images_stay_flat() {
        let p = DetrResize {
            shortest_edge: 16,
            longest_edge: 40,
            ..DetrResize::default()
        };
        for (w, h) in [(1, 1), (3, 2), (200, 9), (9, 300), (57, 31)] {
            let img = RgbImage::from_pixel(w, h, image::Rgb([10, 200, 30]));
            let out = p.apply(&img).unwrap();
            let (oh, ow) = p.output_size(h, w).unwrap();
            assert_eq!((out.height, out.width), (oh, ow));
            let r = (10.0 - IMAGENET_MEAN[0] * 255.0) / (IMAGENET_STD[0] * 255.0);
            let plane = (oh * ow) as usize;
            assert!(out.values[..plane].iter().all(|&v| v == r), "{w}x{h}");
        }
    }

    /// xorshift64*: deterministic noise without a dependency.
    fn noise(n: usize, mut state: u64) -> Vec<u8> {
        (0..n)
            .map(|_| {
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
            })
            .collect()
    }

    #[test]
    fn plain_passes_equal_fast_image_resize() {
        // Where both use the same precision, the fallback's arithmetic must
        // give fast_image_resize's (i.e. ATen's) bytes, up and down.
        let mut resizer = Resizer::new();
        let (w, h) = (37u32, 23u32);
        let src = noise(3 * (w * h) as usize, 0x9e37_79b9_7f4a_7c15);
        for out in [1u32, 5, 11, 36, 37, 50, 96] {
            let weights = AxisWeights::new(w as usize, out as usize);
            assert!(weights.precision <= FIR_MAX_PRECISION);
            let fir = fir_pass(&mut resizer, &src, (w, h), (out, h)).unwrap();
            assert_eq!(
                weights.horizontal(&src, h as usize),
                fir,
                "width {w} -> {out}"
            );
            let weights = AxisWeights::new(h as usize, out as usize);
            let fir = fir_pass(&mut resizer, &src, (w, h), (w, out)).unwrap();
            assert_eq!(
                weights.vertical(&src, w as usize),
                fir,
                "height {h} -> {out}"
            );
        }
    }

    #[test]
    fn weight_precision_reaches_22_bits_only_past_128x() {
        // Largest weight about 1 / scale, 22 bits once it is under 2^-7; but
        // the first and last windows, cut by the image's edges, are lighter
        // and so have larger weights: 133x still stops at 21 bits.
        assert_eq!(AxisWeights::new(60_000, 400).precision, 22);
        assert_eq!(AxisWeights::new(1200, 8).precision, 22);
        assert_eq!(AxisWeights::new(40_000, 300).precision, 21);
        assert!(AxisWeights::new(12_000, 100).precision <= FIR_MAX_PRECISION);
        assert!(AxisWeights::new(451, 96).precision <= FIR_MAX_PRECISION);
        assert!(AxisWeights::new(3, 800).precision <= FIR_MAX_PRECISION);
    }

    #[test]
    fn pads_bottom_right_with_a_mask() {
        let img = |h: u32, w: u32, v: f32| DetrImage {
            values: vec![v; 3 * (h * w) as usize],
            height: h,
            width: w,
        };
        let batch = pad_batch(&[img(2, 3, 1.0), img(3, 1, 2.0)]).unwrap();
        assert_eq!((batch.batch, batch.height, batch.width), (2, 3, 3));
        let first_plane = &batch.pixel_values[..9];
        assert_eq!(first_plane, [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]);
        let second_plane = &batch.pixel_values[27..36];
        assert_eq!(second_plane, [2.0, 0.0, 0.0, 2.0, 0.0, 0.0, 2.0, 0.0, 0.0]);
        assert_eq!(
            batch.pixel_mask,
            [1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0]
        );
        let (values, mask) = batch.to_tensors(&Device::Cpu, DType::F32).unwrap();
        assert_eq!(
            (values.dims(), mask.dims()),
            (&[2, 3, 3, 3][..], &[2, 3, 3][..])
        );
        assert!(matches!(
            pad_batch(&[]),
            Err(DetrPreprocessError::EmptyBatch)
        ));
        let mut bad = img(2, 2, 0.0);
        bad.values.pop();
        assert!(matches!(
            pad_batch(&[bad]),
            Err(DetrPreprocessError::BadImage { index: 0, .. })
        ));
    }
}
