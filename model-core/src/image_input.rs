//! Image bytes in, an upright RGB8 image out, safely.
//!
//! Everything here sees untrusted request bodies, so:
//! - the format comes from the bytes (magic numbers), never from a
//!   `Content-Type` header;
//! - the pixel count is checked from the header before any pixel is decoded,
//!   and the decoder's allocations are capped, so a decompression bomb (a tiny
//!   file declaring 60000x60000) is refused at the cost of reading a header;
//! - every failure is an [`ImageInputError`] whose kind maps to an HTTP status,
//!   and a panic inside a third-party decoder is caught and reported as
//!   undecodable data instead of taking a worker down.
//!
//! The colour conversion reproduces PIL's `Image.open(..).convert("RGB")`, which
//! is what the reference (torchvision/timm) pipelines feed their models; see
//! [`to_rgb8`] for the one deliberate difference.

use std::io::Cursor;
use std::panic::{catch_unwind, AssertUnwindSafe};

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader, RgbImage};

/// Resource limits for [`decode_image`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest accepted width x height, checked from the header before decoding.
    pub max_pixels: u64,
    /// Cap on the decoder's own allocations (output buffer included), in bytes.
    /// The default leaves room for a `max_pixels` image at 16 bits per channel
    /// with alpha, the widest layout the decoders produce.
    pub max_alloc_bytes: u64,
}

impl DecodeLimits {
    /// 40 megapixels: above every phone camera in common use, small enough that
    /// one request cannot exhaust a server's memory.
    pub const DEFAULT_MAX_PIXELS: u64 = 40_000_000;

    /// Limits for images of at most `max_pixels` pixels, with an allocation cap
    /// derived from it (8 bytes per pixel plus 64 MiB for decoder internals).
    pub fn with_max_pixels(max_pixels: u64) -> Self {
        Self {
            max_pixels,
            max_alloc_bytes: max_pixels.saturating_mul(8).saturating_add(64 << 20),
        }
    }
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self::with_max_pixels(Self::DEFAULT_MAX_PIXELS)
    }
}

/// A decoded image, upright (EXIF orientation applied) and in RGB8.
#[derive(Clone, Debug)]
pub struct DecodedImage {
    pub image: RgbImage,
    /// The container format detected from the bytes.
    pub format: ImageFormat,
}

/// Why an image could not be decoded. Each kind has its own HTTP status:
/// `Unsupported` 415, `NotAnImage` 400, `Undecodable` 400, `TooLarge` 413,
/// `Empty` 400.
#[derive(Debug, thiserror::Error)]
pub enum ImageInputError {
    /// No bytes at all.
    #[error("the image is empty (0 bytes)")]
    Empty,
    /// Not one of the formats we decode (AVIF, HEIC, PDF, text, ...), or a
    /// feature of a known format that the decoder does not implement.
    #[error("unsupported image format: {0}")]
    Unsupported(String),
    /// Bytes that are no image format at all (text, noise): bad input rather
    /// than an unsupported format.
    #[error("the data is not an image: {0}")]
    NotAnImage(String),
    /// Corrupt or truncated data of a format we decode.
    #[error("cannot decode the {format:?} image: {reason}")]
    Undecodable { format: ImageFormat, reason: String },
    /// The image has more pixels than the limit allows.
    #[error("the image is {width}x{height} pixels, more than the limit of {max_pixels} pixels")]
    TooLarge {
        width: u32,
        height: u32,
        max_pixels: u64,
    },
}

/// The formats we decode, recognised by their magic numbers.
pub const SUPPORTED_FORMATS: [ImageFormat; 6] = [
    ImageFormat::Jpeg,
    ImageFormat::Png,
    ImageFormat::WebP,
    ImageFormat::Bmp,
    ImageFormat::Gif,
    ImageFormat::Tiff,
];

/// Decodes `bytes` (JPEG, PNG, WebP, BMP, GIF first frame, TIFF first page)
/// into an upright RGB8 image. Never panics.
pub fn decode_image(bytes: &[u8], limits: &DecodeLimits) -> Result<DecodedImage, ImageInputError> {
    if bytes.is_empty() {
        return Err(ImageInputError::Empty);
    }
    let format = detect_format(bytes)?;
    // The decoders are third-party code fed with hostile input: a panic in one
    // of them is a bug there, and must cost this request only.
    catch_unwind(AssertUnwindSafe(|| decode_known(bytes, format, limits))).unwrap_or_else(|_| {
        Err(ImageInputError::Undecodable {
            format,
            reason: "the decoder failed on malformed data".into(),
        })
    })
}

/// Identifies the container from its first bytes. Anything that is not one of
/// [`SUPPORTED_FORMATS`] is `Unsupported`, named when we recognise it so the
/// client gets a useful message.
pub fn detect_format(bytes: &[u8]) -> Result<ImageFormat, ImageInputError> {
    const SIGNATURES: [(&[u8], ImageFormat); 9] = [
        (b"\x89PNG\r\n\x1a\n", ImageFormat::Png),
        (&[0xff, 0xd8, 0xff], ImageFormat::Jpeg),
        (b"GIF87a", ImageFormat::Gif),
        (b"GIF89a", ImageFormat::Gif),
        (b"II*\0", ImageFormat::Tiff),
        (b"MM\0*", ImageFormat::Tiff),
        (b"II+\0", ImageFormat::Tiff), // BigTIFF
        (b"MM\0+", ImageFormat::Tiff),
        (b"BM", ImageFormat::Bmp),
    ];
    if bytes.is_empty() {
        return Err(ImageInputError::Empty);
    }
    if let Some((_, format)) = SIGNATURES.iter().find(|(sig, _)| bytes.starts_with(sig)) {
        return Ok(*format);
    }
    if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        return Ok(ImageFormat::WebP);
    }
    match unsupported_format_name(bytes) {
        Some(name) => Err(ImageInputError::Unsupported(name.to_string())),
        None if looks_like_text(bytes) => Err(ImageInputError::NotAnImage(
            "text (SVG, HTML, JSON or base64 sent as the raw body?)".into(),
        )),
        None => Err(ImageInputError::NotAnImage(
            "unknown (not JPEG, PNG, WebP, BMP, GIF or TIFF)".into(),
        )),
    }
}

/// Names the common formats we do not decode, for the error message.
fn unsupported_format_name(bytes: &[u8]) -> Option<&'static str> {
    let starts = |sig: &[u8]| bytes.starts_with(sig);
    if bytes.len() >= 12 && &bytes[4..8] == b"ftyp" {
        return Some(match &bytes[8..12] {
            b"avif" | b"avis" => "AVIF",
            b"heic" | b"heix" | b"hevc" | b"heim" | b"heis" | b"mif1" | b"msf1" => "HEIF/HEIC",
            _ => "an ISO media file (MP4/MOV/HEIF family)",
        });
    }
    Some(if starts(b"%PDF") {
        "PDF"
    } else if starts(&[0xff, 0x0a]) || starts(b"\0\0\0\x0cJXL ") {
        "JPEG XL"
    } else if starts(b"\0\0\0\x0cjP  ") || starts(&[0xff, 0x4f, 0xff, 0x51]) {
        "JPEG 2000"
    } else if starts(b"8BPS") {
        "Photoshop (PSD)"
    } else if starts(&[0, 0, 1, 0]) {
        "ICO"
    } else if starts(b"qoif") {
        "QOI"
    } else {
        return None;
    })
}

fn looks_like_text(bytes: &[u8]) -> bool {
    let head = &bytes[..bytes.len().min(64)];
    head.iter()
        .all(|&b| b.is_ascii_graphic() || b.is_ascii_whitespace())
}

fn decode_known(
    bytes: &[u8],
    format: ImageFormat,
    limits: &DecodeLimits,
) -> Result<DecodedImage, ImageInputError> {
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(alloc_limits(limits));
    // Only the header is read here; no pixel buffer exists yet.
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| classify_error(e, format, None))?;
    let (width, height) = decoder.dimensions();
    check_dimensions(width, height, limits, format)?;

    // A damaged EXIF block should not reject an otherwise good image: PIL's
    // exif_transpose also leaves such images as they are.
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);

    // Count the output buffer against the allocation cap before decoding,
    // the way `ImageReader::decode` does.
    let mut budget = alloc_limits(limits);
    let after_header = |e| classify_error(e, format, Some((width, height, limits.max_pixels)));
    budget
        .reserve(decoder.total_bytes())
        .map_err(after_header)?;
    decoder.set_limits(budget).map_err(after_header)?;

    let decoded = DynamicImage::from_decoder(decoder).map_err(after_header)?;
    let mut upright = DynamicImage::ImageRgb8(to_rgb8(decoded));
    upright.apply_orientation(orientation);
    Ok(DecodedImage {
        image: upright.into_rgb8(),
        format,
    })
}

fn alloc_limits(limits: &DecodeLimits) -> image::Limits {
    // `image::Limits` is non-exhaustive: start from the defaults and override.
    let mut out = image::Limits::default();
    out.max_alloc = Some(limits.max_alloc_bytes);
    out
}

fn check_dimensions(
    width: u32,
    height: u32,
    limits: &DecodeLimits,
    format: ImageFormat,
) -> Result<(), ImageInputError> {
    if width == 0 || height == 0 {
        return Err(ImageInputError::Undecodable {
            format,
            reason: format!("the header declares a {width}x{height} image"),
        });
    }
    if u64::from(width) * u64::from(height) > limits.max_pixels {
        return Err(ImageInputError::TooLarge {
            width,
            height,
            max_pixels: limits.max_pixels,
        });
    }
    Ok(())
}

/// Maps a decoder error to our kinds. `size` is known once the header is read:
/// a limit hit after that point means the image is too large to decode here.
fn classify_error(
    error: ImageError,
    format: ImageFormat,
    size: Option<(u32, u32, u64)>,
) -> ImageInputError {
    match (error, size) {
        (ImageError::Limits(_), Some((width, height, max_pixels))) => ImageInputError::TooLarge {
            width,
            height,
            max_pixels,
        },
        (ImageError::Unsupported(e), _) => ImageInputError::Unsupported(format!("{format:?}: {e}")),
        (e, _) => ImageInputError::Undecodable {
            format,
            reason: e.to_string(),
        },
    }
}

/// Converts any decoded layout to RGB8 the way PIL's `convert("RGB")` does:
/// alpha is dropped (not composited), grey is replicated, and 16-bit samples
/// keep their high byte (PIL reads 16-bit RGB PNGs with the `RGB;16B` raw
/// mode, which truncates; `image`'s own conversion rounds instead).
///
/// One deliberate difference: PIL opens 16-bit greyscale as mode `I;16`, and
/// its `I;16` -> `RGB` conversion clips values above 255 to white, which ruins
/// such images. We take the high byte, as for 16-bit RGB.
pub fn to_rgb8(image: DynamicImage) -> RgbImage {
    match image {
        DynamicImage::ImageRgb8(rgb) => rgb,
        DynamicImage::ImageRgb16(rgb) => from_high_bytes(&rgb, 3, |px| [px[0], px[1], px[2]]),
        DynamicImage::ImageRgba16(rgba) => from_high_bytes(&rgba, 4, |px| [px[0], px[1], px[2]]),
        DynamicImage::ImageLuma16(luma) => from_high_bytes(&luma, 1, |px| [px[0]; 3]),
        DynamicImage::ImageLumaA16(luma) => from_high_bytes(&luma, 2, |px| [px[0]; 3]),
        // 8-bit layouts (alpha dropped, grey replicated) and floats (clamped).
        other => other.into_rgb8(),
    }
}

/// Builds an RGB8 image from 16-bit samples, `channels` per pixel, picking
/// the three colour samples with `rgb` and keeping their high bytes.
fn from_high_bytes<P>(
    src: &image::ImageBuffer<P, Vec<u16>>,
    channels: usize,
    rgb: impl Fn(&[u16]) -> [u16; 3],
) -> RgbImage
where
    P: image::Pixel<Subpixel = u16>,
{
    let (width, height) = src.dimensions();
    let mut out = Vec::with_capacity(width as usize * height as usize * 3);
    for px in src.as_raw().chunks_exact(channels) {
        out.extend(rgb(px).map(|v| (v >> 8) as u8));
    }
    // The length is exactly width * height * 3 by construction.
    RgbImage::from_raw(width, height, out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_formats_from_magic_numbers() {
        assert_eq!(
            detect_format(b"\x89PNG\r\n\x1a\n....").unwrap(),
            ImageFormat::Png
        );
        assert_eq!(
            detect_format(b"RIFF\0\0\0\0WEBPVP8L").unwrap(),
            ImageFormat::WebP
        );
        assert_eq!(detect_format(b"II+\0").unwrap(), ImageFormat::Tiff);
        assert!(matches!(detect_format(b""), Err(ImageInputError::Empty)));
    }

    #[test]
    fn names_unsupported_formats() {
        let avif = b"\0\0\0\x1cftypavif\0\0\0\0";
        let heic = b"\0\0\0\x18ftypheic\0\0\0\0";
        let cases: [(&[u8], &str); 5] = [
            (avif, "AVIF"),
            (heic, "HEIF/HEIC"),
            (b"%PDF-1.7\n", "PDF"),
            (b"<svg xmlns=\"http://www.w3.org/2000/svg\"/>", "text"),
            (&[0x00, 0x01, 0xfe, 0x80], "unknown"),
        ];
        for (bytes, name) in cases {
            match detect_format(bytes) {
                Err(ImageInputError::Unsupported(msg) | ImageInputError::NotAnImage(msg)) => {
                    assert!(msg.starts_with(name), "{msg}")
                }
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn sixteen_bit_keeps_the_high_byte() {
        let rgb16 = image::ImageBuffer::<image::Rgb<u16>, _>::from_raw(
            1,
            1,
            vec![0xffff_u16, 0x80ff, 0x00ff],
        )
        .unwrap();
        let out = to_rgb8(DynamicImage::ImageRgb16(rgb16));
        assert_eq!(out.as_raw(), &[0xff, 0x80, 0x00]);
        let la16 = image::ImageBuffer::<image::LumaA<u16>, _>::from_raw(1, 1, vec![0x1234_u16, 0])
            .unwrap();
        let out = to_rgb8(DynamicImage::ImageLumaA16(la16));
        assert_eq!(out.as_raw(), &[0x12, 0x12, 0x12]);
    }

    #[test]
    fn default_limits_fit_the_widest_layout() {
        let limits = DecodeLimits::default();
        assert!(limits.max_alloc_bytes >= limits.max_pixels * 8);
    }
}
