//! Eval-time preprocessing: resize, centre crop, scale and normalise an RGB8
//! image into the CHW f32 tensor a classifier expects.
//!
//! The reference pipelines (torchvision, timm) run on PIL, so everything here
//! reproduces PIL and torchvision's arithmetic:
//! - the resize is PIL's antialiased convolution (`fast_image_resize`'s
//!   `Convolution` filters follow Pillow's: support scaled by the downscale
//!   factor, pixel centres at `(i + 0.5) * scale`, windows clamped to the image);
//! - `Resize(int)` gives the long side `int(N * long / short)`;
//! - `CenterCrop` puts the top-left corner at `int(round((size - crop) / 2.0))`
//!   with Python's round-half-to-even.
//!
//! Speed: the image is resized once, straight into the crop (two separable
//! passes, horizontal then vertical, like Pillow). Resizing the full
//! image and then cropping equals resizing only the source region that maps
//! onto the crop, because PIL's filter windows are clamped to the edges of the
//! whole source image, not to the region, and `fast_image_resize` does the
//! same with a source crop box. So only crop-sized output is ever computed
//! (which also keeps a 1x40000000 image from asking for a gigantic
//! intermediate), and the normalisation is a table lookup per sample written
//! straight into the planar output.

use std::cell::RefCell;

use candle_core::{DType, Device, Tensor};
use fast_image_resize::images::Image as FirImage;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;
use serde::{Deserialize, Serialize};

/// ImageNet channel means and standard deviations on the [0, 1] scale.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Largest output side accepted by [`Preprocess::validate`]: far above any
/// classifier's input, low enough that a bad config cannot allocate gigabytes.
pub const MAX_SIDE: u32 = 8192;

/// Resampling filter, both with PIL's antialiasing when downscaling.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Interpolation {
    /// PIL `BILINEAR` (triangle filter).
    Bilinear,
    /// PIL `BICUBIC` (cubic convolution, a = -0.5).
    Bicubic,
}

impl Interpolation {
    fn filter(self) -> FilterType {
        match self {
            Self::Bilinear => FilterType::Bilinear,
            Self::Bicubic => FilterType::CatmullRom,
        }
    }

    /// Filter radius in source pixels at scale 1 (as in Pillow).
    fn support(self) -> f64 {
        match self {
            Self::Bilinear => 1.0,
            Self::Bicubic => 2.0,
        }
    }
}

/// How the image is resized before the crop.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Resize {
    /// torchvision `Resize(int)`: the shorter side becomes this many pixels,
    /// the longer one `int(size * long / short)`.
    ShorterSide(u32),
    /// Both sides given: the aspect ratio is not kept.
    Exact { width: u32, height: u32 },
}

/// A width and a height in pixels.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Size {
    pub width: u32,
    pub height: u32,
}

/// An eval transform: resize, optional centre crop, then
/// `(value * scale - mean) / std` per channel, giving CHW f32.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Preprocess {
    pub resize: Resize,
    pub interpolation: Interpolation,
    /// Centre crop taken from the resized image; required with
    /// [`Resize::ShorterSide`], whose output size depends on the image.
    pub crop: Option<Size>,
    /// Multiplies the 0..255 samples first: 1/255 for models fed [0, 1],
    /// 1.0 for models fed 0..255.
    pub scale: f32,
    /// Per channel (R, G, B), on the scaled values.
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// Why a transform could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("invalid preprocessing: {0}")]
    InvalidConfig(String),
    #[error("the image has no pixels ({width}x{height})")]
    EmptyImage { width: u32, height: u32 },
    #[error("output buffer holds {got} values, the transform writes {expected}")]
    OutputLength { expected: usize, got: usize },
}

impl Preprocess {
    /// torchvision's classification weights' transforms (e.g.
    /// `ResNet50_Weights.IMAGENET1K_V1.transforms()`): resize 256 bilinear,
    /// centre crop 224, ImageNet mean/std.
    pub fn torchvision_imagenet() -> Self {
        Self::centre_crop(
            256,
            224,
            Interpolation::Bilinear,
            1.0 / 255.0,
            IMAGENET_MEAN,
            IMAGENET_STD,
        )
    }

    /// timm's eval transform (`create_transform(**resolve_data_config(...))`):
    /// resize the shorter side to `floor(input_size / crop_pct)`, centre crop
    /// `input_size`, inputs on [0, 1].
    pub fn timm(
        input_size: u32,
        crop_pct: f32,
        interpolation: Interpolation,
        mean: [f32; 3],
        std: [f32; 3],
    ) -> Self {
        let resize = timm_scale_size(input_size, crop_pct);
        Self::centre_crop(resize, input_size, interpolation, 1.0 / 255.0, mean, std)
    }

    /// The eval transform of TensorFlow's EfficientNet-Lite checkpoints (and
    /// their PyTorch ports): a centre crop with 32 pixels of crop padding,
    /// i.e. crop_pct = input / (input + 32), bicubic, then (x - 127) / 128 on
    /// 0..255 values.
    ///
    /// TF crops the padded centre window out of the original image and then
    /// resizes it; we do the timm-style resize of the shorter side to
    /// `input + 32` followed by a centre crop of `input`, the way the PyTorch
    /// ports evaluate them (`Resize(256, bicubic) + CenterCrop(224)` at 224).
    /// The two select the same region and differ only by resampling details.
    pub fn efficientnet_lite(input_size: u32) -> Self {
        Self::centre_crop(
            input_size.saturating_add(32),
            input_size,
            Interpolation::Bicubic,
            1.0,
            [127.0; 3],
            [128.0; 3],
        )
    }

    fn centre_crop(
        resize: u32,
        crop: u32,
        interpolation: Interpolation,
        scale: f32,
        mean: [f32; 3],
        std: [f32; 3],
    ) -> Self {
        Self {
            resize: Resize::ShorterSide(resize),
            interpolation,
            crop: Some(Size {
                width: crop,
                height: crop,
            }),
            scale,
            mean,
            std,
        }
    }

    /// The (height, width) of the output. For a transform that fails
    /// [`validate`](Self::validate) because its size depends on the image
    /// (shorter-side resize without a crop), the square of that side.
    pub fn input_size(&self) -> (u32, u32) {
        match (self.crop, self.resize) {
            (Some(crop), _) => (crop.height, crop.width),
            (None, Resize::Exact { width, height }) => (height, width),
            (None, Resize::ShorterSide(side)) => (side, side),
        }
    }

    /// Number of f32 values [`apply`](Self::apply) writes: 3 * h * w.
    pub fn output_len(&self) -> usize {
        let (h, w) = self.input_size();
        3 * h as usize * w as usize
    }

    /// Checks that the transform is usable; call it on deserialised configs.
    pub fn validate(&self) -> Result<(), PreprocessError> {
        let invalid = |msg: String| Err(PreprocessError::InvalidConfig(msg));
        let (max_w, max_h) = match self.resize {
            Resize::ShorterSide(side) => (side, side),
            Resize::Exact { width, height } => (width, height),
        };
        let Some(crop) = self.crop.or(match self.resize {
            Resize::Exact { width, height } => Some(Size { width, height }),
            Resize::ShorterSide(_) => None,
        }) else {
            return invalid("a shorter-side resize needs a crop to give a fixed size".into());
        };
        if [max_w, max_h, crop.width, crop.height]
            .iter()
            .any(|&s| s == 0 || s > MAX_SIDE)
        {
            return invalid(format!("sizes must be between 1 and {MAX_SIDE} pixels"));
        }
        if crop.width > max_w || crop.height > max_h {
            return invalid(format!(
                "the {}x{} crop does not fit in the {max_w}x{max_h} resize",
                crop.width, crop.height
            ));
        }
        let finite = |v: &[f32]| v.iter().all(|x| x.is_finite());
        if !finite(&self.mean) || !finite(&self.std) || !self.scale.is_finite() {
            return invalid("scale, mean and std must be finite".into());
        }
        if self.std.contains(&0.0) {
            return invalid("std must not be zero".into());
        }
        Ok(())
    }

    /// Transforms one image into CHW f32 of [`output_len`](Self::output_len).
    pub fn apply(&self, image: &RgbImage) -> Result<Vec<f32>, PreprocessError> {
        let mut out = vec![0.0; self.output_len()];
        self.apply_into(image, &mut out)?;
        Ok(out)
    }

    /// Like [`apply`](Self::apply), writing into `out` (e.g. one slot of a
    /// batch buffer), which must hold exactly `output_len()` values.
    pub fn apply_into(&self, image: &RgbImage, out: &mut [f32]) -> Result<(), PreprocessError> {
        self.validate()?;
        let expected = self.output_len();
        if out.len() != expected {
            return Err(PreprocessError::OutputLength {
                expected,
                got: out.len(),
            });
        }
        let (width, height) = image.dimensions();
        if width == 0 || height == 0 {
            return Err(PreprocessError::EmptyImage { width, height });
        }
        let window = self.source_window(width, height);
        let lut = self.normalisation_table();
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let pixels = scratch.resize(image, &window, self.interpolation)?;
            write_planar(pixels, &lut, out);
            Ok(())
        })
    }

    /// The output size and the source rectangle that the resize-then-crop
    /// maps onto it, in source pixel coordinates.
    fn source_window(&self, width: u32, height: u32) -> SourceWindow {
        let (resized_w, resized_h) = self.resized_size(width, height);
        let (crop_w, crop_h) = match self.crop {
            Some(crop) => (crop.width, crop.height),
            // Validated: without a crop the resize is exact.
            None => (resized_w as u32, resized_h as u32),
        };
        let left = centre_crop_offset(resized_w, crop_w);
        let top = centre_crop_offset(resized_h, crop_h);
        let sx = f64::from(width) / resized_w as f64;
        let sy = f64::from(height) / resized_h as f64;
        let (left, top) = (left as f64 * sx, top as f64 * sy);
        SourceWindow {
            out_width: crop_w,
            out_height: crop_h,
            left,
            top,
            // Clamped so rounding can never push the window past the image.
            width: (f64::from(crop_w) * sx).min(f64::from(width) - left),
            height: (f64::from(crop_h) * sy).min(f64::from(height) - top),
        }
    }

    /// Size of the resized image before the crop, as torchvision computes it.
    /// u64: a 1-pixel-wide image would make the long side exceed u32.
    fn resized_size(&self, width: u32, height: u32) -> (u64, u64) {
        match self.resize {
            Resize::Exact { width, height } => (u64::from(width), u64::from(height)),
            Resize::ShorterSide(side) => {
                let (short, long) = (width.min(height), width.max(height));
                // Python's `int(side * long / short)`: the product is exact, the
                // division correctly rounded, then truncated.
                let new_long =
                    ((u64::from(side) * u64::from(long)) as f64 / f64::from(short)) as u64;
                if width <= height {
                    (u64::from(side), new_long)
                } else {
                    (new_long, u64::from(side))
                }
            }
        }
    }

    /// `(v * scale - mean) / std` for every 8-bit value of each channel,
    /// computed in f64 and rounded once.
    fn normalisation_table(&self) -> [[f32; 256]; 3] {
        let mut lut = [[0.0; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            let (mean, std) = (f64::from(self.mean[c]), f64::from(self.std[c]));
            for (v, slot) in table.iter_mut().enumerate() {
                *slot = ((v as f64 * f64::from(self.scale) - mean) / std) as f32;
            }
        }
        lut
    }
}

/// timm's `math.floor(input_size / crop_pct)`. timm configs write crop_pct as
/// a short decimal (0.875, 0.9, 0.95): going through that decimal recovers
/// the f64 Python divides by, where widening the f32 would not (224 / 0.95f32
/// and 224 / 0.95 can floor differently).
fn timm_scale_size(input_size: u32, crop_pct: f32) -> u32 {
    let crop_pct: f64 = crop_pct.to_string().parse().unwrap_or(f64::from(crop_pct));
    if crop_pct.is_nan() || crop_pct <= 0.0 {
        // Invalid; `validate` will then reject the crop as not fitting.
        return 0;
    }
    (f64::from(input_size) / crop_pct)
        .floor()
        .min(f64::from(u32::MAX)) as u32
}

/// torchvision `CenterCrop`: `int(round((size - crop) / 2.0))`, where Python
/// rounds halves to even.
fn centre_crop_offset(size: u64, crop: u32) -> u64 {
    let margin = size.saturating_sub(u64::from(crop));
    (margin as f64 / 2.0).round_ties_even() as u64
}

/// The source rectangle to resample into an `out_width` x `out_height` image.
#[derive(Clone, Copy, Debug, PartialEq)]
struct SourceWindow {
    out_width: u32,
    out_height: u32,
    left: f64,
    top: f64,
    width: f64,
    height: f64,
}

/// Per-thread resizer and buffers, reused across requests so the steady
/// state allocates nothing but the returned tensor.
#[derive(Default)]
struct Scratch {
    resizer: Resizer,
    /// Output of the horizontal pass: `out_width` x the rows the vertical
    /// pass reads.
    rows: Vec<u8>,
    pixels: Vec<u8>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

impl Scratch {
    /// Resamples `window` of `image` into the scratch buffer (interleaved RGB).
    ///
    /// Two separate passes, horizontal first, as Pillow does. Given both
    /// passes at once, `fast_image_resize` runs the vertical one first for
    /// u8 images; the 8-bit rounding and clipping between the passes then
    /// differ from Pillow's, which on sharp edges with bicubic overshoot
    /// moved some pixels by up to 6 levels. Each call below needs only one
    /// pass (integer offsets and equal sizes on the other axis), so the
    /// resizer does exactly that one.
    fn resize(
        &mut self,
        image: &RgbImage,
        window: &SourceWindow,
        interpolation: Interpolation,
    ) -> Result<&[u8], PreprocessError> {
        let algorithm = ResizeAlg::Convolution(interpolation.filter());
        let (first_row, row_count) = window.rows_read(image.height(), interpolation);
        let mut rows = fir_image(&mut self.rows, window.out_width, row_count)?;
        let horizontal = ResizeOptions::new().resize_alg(algorithm).crop(
            window.left,
            f64::from(first_row),
            window.width,
            f64::from(row_count),
        );
        self.resizer
            .resize(image, &mut rows, &horizontal)
            .map_err(resize_error)?;

        let mut out = fir_image(&mut self.pixels, window.out_width, window.out_height)?;
        let vertical = ResizeOptions::new().resize_alg(algorithm).crop(
            0.0,
            window.top - f64::from(first_row),
            f64::from(window.out_width),
            window.height,
        );
        self.resizer
            .resize(&rows, &mut out, &vertical)
            .map_err(resize_error)?;
        Ok(&self.pixels)
    }
}

impl SourceWindow {
    /// The source rows the vertical filter reads: its support around the
    /// window, plus a row of margin each side, clamped to the image. Rows
    /// beyond the support have zero weight, and the only clamping left is at
    /// the image's own edges, so the vertical pass over just these rows gives
    /// what Pillow computes over the whole image.
    fn rows_read(&self, image_height: u32, interpolation: Interpolation) -> (u32, u32) {
        let scale = (self.height / f64::from(self.out_height)).max(1.0);
        let radius = interpolation.support() * scale + 1.0;
        let first = (self.top - radius).floor().max(0.0) as u32;
        let end = ((self.top + self.height + radius).ceil() as u32).min(image_height);
        (first, end - first)
    }
}

/// A `fast_image_resize` RGB8 image over `buffer`, resized to fit.
fn fir_image(
    buffer: &mut Vec<u8>,
    width: u32,
    height: u32,
) -> Result<FirImage<'_>, PreprocessError> {
    buffer.resize(3 * width as usize * height as usize, 0);
    FirImage::from_slice_u8(width, height, buffer, PixelType::U8x3).map_err(resize_error)
}

fn resize_error(e: impl std::fmt::Display) -> PreprocessError {
    // Only reachable with sizes that `validate` lets through but the resizer
    // refuses, i.e. a bug here rather than bad input.
    PreprocessError::InvalidConfig(format!("resize: {e}"))
}

/// Interleaved RGB8 to planar normalised f32 in one pass.
fn write_planar(pixels: &[u8], lut: &[[f32; 256]; 3], out: &mut [f32]) {
    let plane = out.len() / 3;
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    let planes = r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut());
    for (px, ((r, g), b)) in pixels.chunks_exact(3).zip(planes) {
        *r = lut[0][usize::from(px[0])];
        *g = lut[1][usize::from(px[1])];
        *b = lut[2][usize::from(px[2])];
    }
}

/// Stacks preprocessed images (each CHW, 3 * height * width values) into one
/// `[batch, 3, height, width]` tensor of `dtype` on `device`.
pub fn to_tensor(
    images: &[Vec<f32>],
    height: usize,
    width: usize,
    device: &Device,
    dtype: DType,
) -> candle_core::Result<Tensor> {
    let per_image = 3 * height * width;
    if let Some((i, bad)) = images
        .iter()
        .enumerate()
        .find(|(_, img)| img.len() != per_image)
    {
        candle_core::bail!(
            "image {i} has {} values, expected 3x{height}x{width} = {per_image}",
            bad.len()
        );
    }
    let data = images.concat();
    Tensor::from_vec(data, (images.len(), 3, height, width), device)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(p: &Preprocess, w: u32, h: u32) -> SourceWindow {
        p.source_window(w, h)
    }

    #[test]
    fn shorter_side_resize_truncates_the_long_side() {
        let p = Preprocess::torchvision_imagenet();
        // chelsea: 451x300 -> int(256 * 451 / 300) = int(384.85) = 384.
        assert_eq!(p.resized_size(451, 300), (384, 256));
        // rocket, portrait: 427x640 -> int(383.7) = 383.
        assert_eq!(p.resized_size(427, 640), (256, 383));
        assert_eq!(p.resized_size(512, 512), (256, 256));
        // Extreme aspect ratios do not overflow.
        assert_eq!(p.resized_size(1, 40_000_000), (256, 10_240_000_000));
    }

    #[test]
    fn centre_crop_rounds_halves_to_even() {
        assert_eq!(centre_crop_offset(383, 224), 80); // 79.5 -> 80
        assert_eq!(centre_crop_offset(385, 224), 80); // 80.5 -> 80
        assert_eq!(centre_crop_offset(384, 224), 80);
        assert_eq!(centre_crop_offset(224, 224), 0);
    }

    #[test]
    fn source_window_maps_the_crop_back() {
        let p = Preprocess::torchvision_imagenet();
        let w = window(&p, 451, 300);
        let sx = 451.0 / 384.0;
        assert_eq!((w.out_width, w.out_height), (224, 224));
        assert!((w.left - 80.0 * sx).abs() < 1e-9 && (w.width - 224.0 * sx).abs() < 1e-9);
        assert!((w.top - 16.0 * 300.0 / 256.0).abs() < 1e-9);
        // Exact resize without a crop: the whole image.
        let exact = Preprocess {
            resize: Resize::Exact {
                width: 64,
                height: 32,
            },
            crop: None,
            ..p
        };
        let w = window(&exact, 100, 50);
        assert_eq!((w.left, w.top, w.width, w.height), (0.0, 0.0, 100.0, 50.0));
        assert_eq!((w.out_width, w.out_height), (64, 32));
    }

    #[test]
    fn timm_scale_size_follows_python() {
        assert_eq!(timm_scale_size(224, 0.875), 256);
        assert_eq!(timm_scale_size(224, 0.95), 235);
        assert_eq!(timm_scale_size(288, 0.9), 320); // Python: 288 / 0.9 = 320.0
        assert_eq!(timm_scale_size(384, 0.96), 400);
        assert_eq!(timm_scale_size(224, 1.0), 224);
        let p = Preprocess::timm(
            240,
            0.875,
            Interpolation::Bicubic,
            IMAGENET_MEAN,
            IMAGENET_STD,
        );
        assert_eq!(p.resize, Resize::ShorterSide(274));
        assert_eq!(p.input_size(), (240, 240));
    }

    #[test]
    fn presets_are_valid() {
        for p in [
            Preprocess::torchvision_imagenet(),
            Preprocess::timm(
                224,
                0.875,
                Interpolation::Bicubic,
                IMAGENET_MEAN,
                IMAGENET_STD,
            ),
            Preprocess::efficientnet_lite(224),
            Preprocess::efficientnet_lite(280),
        ] {
            p.validate().unwrap();
        }
        assert_eq!(
            Preprocess::efficientnet_lite(224).resize,
            Resize::ShorterSide(256)
        );
    }

    #[test]
    fn invalid_configs_are_rejected() {
        let good = Preprocess::torchvision_imagenet();
        let no_crop = Preprocess {
            crop: None,
            ..good.clone()
        };
        let big_crop = Preprocess {
            crop: Some(Size {
                width: 300,
                height: 224,
            }),
            ..good.clone()
        };
        let zero_std = Preprocess {
            std: [0.2, 0.0, 0.2],
            ..good.clone()
        };
        let bad_pct = Preprocess::timm(
            224,
            0.0,
            Interpolation::Bilinear,
            IMAGENET_MEAN,
            IMAGENET_STD,
        );
        for p in [no_crop, big_crop, zero_std, bad_pct] {
            assert!(p.validate().is_err(), "{p:?}");
            assert!(p.apply(&RgbImage::new(8, 8)).is_err());
        }
        assert!(good.apply(&RgbImage::new(0, 8)).is_err());
        assert!(good
            .apply_into(&RgbImage::new(8, 8), &mut [0.0; 3])
            .is_err());
    }

    #[test]
    fn normalises_into_planes() {
        let p = Preprocess {
            resize: Resize::Exact {
                width: 2,
                height: 1,
            },
            interpolation: Interpolation::Bilinear,
            crop: None,
            scale: 1.0,
            mean: [127.0; 3],
            std: [128.0; 3],
        };
        let img = RgbImage::from_raw(2, 1, vec![255, 127, 0, 1, 2, 3]).unwrap();
        let out = p.apply(&img).unwrap();
        let expected = [255.0, 1.0, 127.0, 2.0, 0.0, 3.0].map(|v: f32| (v - 127.0) / 128.0);
        assert_eq!(out, expected);
    }

    #[test]
    fn tiny_and_extreme_images_do_not_fail() {
        let p = Preprocess::torchvision_imagenet();
        for (w, h) in [(1, 1), (1, 5000), (3000, 2), (224, 224)] {
            let img = RgbImage::from_pixel(w, h, image::Rgb([10, 200, 30]));
            let out = p.apply(&img).unwrap();
            assert_eq!(out.len(), 3 * 224 * 224);
            // A flat image stays flat whatever the geometry.
            let r = (10.0 / 255.0 - 0.485) / 0.229;
            assert!(out[..224 * 224].iter().all(|v| (v - r).abs() < 1e-5));
        }
    }

    #[test]
    fn stacks_a_batch() {
        let a = vec![0.5; 3 * 2 * 4];
        let t = to_tensor(&[a.clone(), a], 2, 4, &Device::Cpu, DType::F32).unwrap();
        assert_eq!(t.dims(), &[2, 3, 2, 4]);
        assert!(to_tensor(&[vec![0.0; 5]], 2, 4, &Device::Cpu, DType::F32).is_err());
    }

    #[test]
    fn serde_round_trip() {
        let p = Preprocess::efficientnet_lite(224);
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<Preprocess>(&json).unwrap(), p);
    }
}
