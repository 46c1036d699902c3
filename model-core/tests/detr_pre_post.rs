//! DETR preprocessing and postprocessing against transformers'
//! `DetrImageProcessor` (the class AutoImageProcessor gives for
//! facebook/detr-resnet-50), as recorded by
//! `tests/fixtures/make_detr_pre_post_fixtures.py`.
//!
//! `cargo test -p fovea-model-core --test detr_pre_post -- --nocapture`
//! prints the differences per case.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use fovea_model_core::detr_postprocess::{postprocess, DetrPostprocess};
use fovea_model_core::detr_preprocess::{pad_batch, DetrImage, DetrResize};
use fovea_model_core::image_input::{decode_image, DecodeLimits};
use image::RgbImage;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/detr_pre_post")
}

struct Reference {
    cases: Value,
    tensors: HashMap<String, Tensor>,
}

impl Reference {
    fn load() -> Self {
        let json = std::fs::read_to_string(fixtures().join("cases.json")).unwrap();
        let tensors =
            candle_core::safetensors::load(fixtures().join("reference.safetensors"), &Device::Cpu)
                .unwrap();
        Self {
            cases: serde_json::from_str(&json).unwrap(),
            tensors,
        }
    }

    fn f32s(&self, key: &str) -> Vec<f32> {
        let t = self.tensors.get(key).unwrap_or_else(|| panic!("no {key}"));
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn i64s(&self, key: &str) -> Vec<i64> {
        let t = self.tensors.get(key).unwrap_or_else(|| panic!("no {key}"));
        t.flatten_all().unwrap().to_vec1().unwrap()
    }
}

fn u32_pair(v: &Value) -> (u32, u32) {
    let n = |i: usize| v[i].as_u64().unwrap() as u32;
    (n(0), n(1))
}

/// splitmix64's output function.
fn splitmix64(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The generator's synthetic images: noise (the top byte of splitmix64 of
/// each HWC sample's index) for names starting with "noise", else
/// `((x*37 + y*91 + c*53) ^ (x*y*7 + c)) & 255`.
fn synthetic(name: &str, height: u32, width: u32) -> RgbImage {
    if name.starts_with("noise") {
        let n = 3 * height as u64 * width as u64;
        let raw = (0..n).map(|i| (splitmix64(i) >> 56) as u8).collect();
        return RgbImage::from_raw(width, height, raw).unwrap();
    }
    RgbImage::from_fn(width, height, |x, y| {
        let (x, y) = (u64::from(x), u64::from(y));
        image::Rgb([0, 1, 2].map(|c| (((x * 37 + y * 91 + c * 53) ^ (x * y * 7 + c)) & 255) as u8))
    })
}

/// Photos are decoded the way the server decodes them; the generator used
/// PIL, which agrees on PNGs but not exactly on JPEGs.
fn input(image: &str, (height, width): (u32, u32)) -> RgbImage {
    if image.contains('.') {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/images")
            .join(image);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let decoded = decode_image(&bytes, &DecodeLimits::default()).unwrap();
        assert_eq!(decoded.image.dimensions(), (width, height), "{image}");
        decoded.image
    } else {
        synthetic(image, height, width)
    }
}

fn settings(case: &Value) -> DetrResize {
    DetrResize {
        shortest_edge: case["shortest_edge"].as_u64().unwrap() as u32,
        longest_edge: case["longest_edge"].as_u64().unwrap() as u32,
        ..DetrResize::default()
    }
}

/// 255 * std per channel: one level in normalised units.
fn level_unit(p: &DetrResize, c: usize) -> f64 {
    f64::from(p.std[c]) * 255.0
}

/// Mean and max |a - b| in 0..255 levels, and how many values differ at
/// all, of two CHW tensors (or the same stride of both: `plane` is the
/// plane size of the full tensor, `stride` the step between the samples).
fn differences(
    p: &DetrResize,
    a: &[f32],
    b: &[f32],
    plane: usize,
    stride: usize,
) -> (f64, f64, usize) {
    assert_eq!(a.len(), b.len());
    let (mut sum, mut max, mut unequal) = (0.0f64, 0.0f64, 0);
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        let c = i * stride / plane;
        let d = (f64::from(x) - f64::from(y)).abs() * level_unit(p, c);
        sum += d;
        max = max.max(d);
        unequal += usize::from(x.to_bits() != y.to_bits());
    }
    (sum / a.len().max(1) as f64, max, unequal)
}

/// The 0..255 level behind each normalised value (CHW).
fn levels(p: &DetrResize, values: &[f32], plane: usize) -> Vec<u8> {
    values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let c = i / plane;
            let level = f64::from(v) * level_unit(p, c) + f64::from(p.mean[c]) * 255.0;
            level.round().clamp(0.0, 255.0) as u8
        })
        .collect()
}

/// The generator's checksum: sum(level[i] * splitmix64(i)) mod 2^64.
fn checksum(levels: &[u8]) -> u64 {
    levels.iter().enumerate().fold(0u64, |acc, (i, &l)| {
        acc.wrapping_add(u64::from(l).wrapping_mul(splitmix64(i as u64)))
    })
}

fn is_jpeg(case: &Value) -> bool {
    case["image"].as_str().unwrap().ends_with(".jpg")
}

#[test]
fn preprocessing_matches_the_reference() {
    let reference = Reference::load();
    let cases = reference.cases["preprocess"].as_array().unwrap();
    assert!(cases.len() >= 19, "{} cases", cases.len());
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let p = settings(case);
        let img = input(case["image"].as_str().unwrap(), u32_pair(&case["input"]));
        let ours = p.apply(&img).unwrap();
        // Sizes exactly, whatever the image.
        let expected_size = u32_pair(&case["size"]);
        assert_eq!((ours.height, ours.width), expected_size, "{name}: size");
        let (h, w) = u32_pair(&case["input"]);
        assert_eq!(p.output_size(h, w).unwrap(), expected_size, "{name}");

        let plane = (ours.height * ours.width) as usize;
        let stride = case["stride"].as_u64().unwrap() as usize;
        let refs = reference.f32s(&format!("{name}/values"));
        let sampled: Vec<f32> = ours.values.iter().step_by(stride).copied().collect();
        let (mean, max, unequal) = differences(&p, &sampled, &refs, plane, stride);
        print!(
            "{name:>24} {:>4}x{:<4} vs DetrImageProcessor: mean {mean:.4}, max {max:.3} levels, {unequal}/{} values not bit-equal",
            ours.height,
            ours.width,
            refs.len()
        );
        if stride == 1 {
            let pil = reference.f32s(&format!("{name}/pil_values"));
            let (pil_mean, pil_max, _) = differences(&p, &ours.values, &pil, plane, 1);
            print!("; vs DetrImageProcessorPil: mean {pil_mean:.4}, max {pil_max:.3}");
            // Pillow keeps 22 fractional bits in its weights, ATen ~15.
            assert!(pil_max < 1.0 + 1e-3, "{name}: {pil_max} levels from PIL");
        }
        println!();

        if is_jpeg(case) {
            // zune-jpeg's pixels are not libjpeg-turbo's (up to 4 levels in
            // the decode test); resizing averages that down.
            assert!(
                mean < 0.5 && max <= 4.0 + 1e-3,
                "{name}: mean {mean}, max {max}"
            );
            continue;
        }
        assert_eq!(unequal, 0, "{name}: max {max} levels");
        if stride > 1 {
            // The full tensor, through its levels.
            let lv = levels(&p, &ours.values, plane);
            for c in 0..3 {
                let channel = &lv[c * plane..(c + 1) * plane];
                let sum: u64 = channel.iter().map(|&l| u64::from(l)).sum();
                let squares: u64 = channel.iter().map(|&l| u64::from(l) * u64::from(l)).sum();
                assert_eq!(
                    sum,
                    case["level_sums"][c].as_u64().unwrap(),
                    "{name} channel {c}"
                );
                assert_eq!(
                    squares,
                    case["level_square_sums"][c].as_u64().unwrap(),
                    "{name} channel {c}"
                );
            }
            let expected: u64 = case["checksum"].as_str().unwrap().parse().unwrap();
            assert_eq!(checksum(&lv), expected, "{name}: checksum of all levels");
        }
    }
}

#[test]
fn padded_batch_matches_the_reference() {
    let reference = Reference::load();
    let spec = &reference.cases["batch"];
    let p = DetrResize {
        shortest_edge: spec["shortest_edge"].as_u64().unwrap() as u32,
        longest_edge: spec["longest_edge"].as_u64().unwrap() as u32,
        ..DetrResize::default()
    };
    let sizes: HashMap<&str, (u32, u32)> = reference.cases["preprocess"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["image"].as_str().unwrap(), u32_pair(&c["input"])))
        .collect();
    let images: Vec<DetrImage> = spec["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let n = n.as_str().unwrap();
            p.apply(&input(n, sizes[n])).unwrap()
        })
        .collect();
    let batch = pad_batch(&images).unwrap();
    assert_eq!((batch.height, batch.width), u32_pair(&spec["size"]));
    assert_eq!(batch.batch, images.len());
    let values = reference.f32s("batch/pixel_values");
    let mask = reference.i64s("batch/pixel_mask");
    assert_eq!(
        reference.tensors["batch/pixel_values"].dims()[..2],
        [images.len(), 3]
    );
    assert_eq!(batch.pixel_values.len(), values.len());
    let unequal = batch
        .pixel_values
        .iter()
        .zip(&values)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert_eq!(unequal, 0, "padded pixel_values");
    let ours: Vec<i64> = batch.pixel_mask.iter().map(|&m| i64::from(m)).collect();
    assert_eq!(ours, mask, "pixel_mask");
    // Not trivially full or empty.
    let valid = ours.iter().filter(|&&m| m == 1).count();
    assert!(valid > 0 && valid < ours.len());
    println!(
        "batch of {} padded to {}x{}: values and mask identical",
        batch.batch, batch.height, batch.width
    );
}

#[test]
fn postprocessing_matches_the_reference() {
    let reference = Reference::load();
    for case in reference.cases["postprocess"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let threshold = case["threshold"].as_f64().unwrap() as f32;
        let target = u32_pair(&case["target"]);
        let logits = reference.f32s(&format!("{name}/logits"));
        let boxes = reference.f32s(&format!("{name}/boxes"));
        let scores = reference.f32s(&format!("{name}/scores"));
        let labels = reference.i64s(&format!("{name}/labels"));
        let out_boxes = reference.f32s(&format!("{name}/out_boxes"));
        let options = DetrPostprocess {
            threshold,
            ..DetrPostprocess::default()
        };
        let found = postprocess(&logits, &boxes, target, &options).unwrap();
        assert_eq!(found.len(), scores.len(), "{name}: count");
        assert_eq!(found.len(), case["count"].as_u64().unwrap() as usize);
        let mut worst_score = 0.0f32;
        let mut worst_box = 0.0f32;
        for (i, d) in found.iter().enumerate() {
            assert_eq!(d.class_id as i64, labels[i], "{name} #{i}: label");
            let score_diff = (d.score - scores[i]).abs();
            assert!(
                score_diff <= 1e-6,
                "{name} #{i}: score {} vs {}",
                d.score,
                scores[i]
            );
            worst_score = worst_score.max(score_diff);
            let ours = [d.x1, d.y1, d.x2, d.y2];
            for (a, b) in ours.iter().zip(&out_boxes[4 * i..4 * i + 4]) {
                worst_box = worst_box.max((a - b).abs());
            }
            // Same f32 operations in the same order: the same bits.
            assert_eq!(ours, out_boxes[4 * i..4 * i + 4], "{name} #{i}: box");
        }
        println!(
            "{name}: {} detections, labels and boxes identical, max score difference {worst_score:e}, box {worst_box}",
            found.len()
        );

        // The server's options, against the reference's list filtered and
        // cut the same way: class filter on the reference labels, then the
        // best `max` scores, in query order.
        let keep: Vec<usize> = {
            let mut l: Vec<usize> = labels.iter().map(|&l| l as usize).collect();
            l.sort_unstable();
            l.dedup();
            l.into_iter().step_by(2).collect()
        };
        let max = 3;
        let filtered: Vec<usize> = (0..labels.len())
            .filter(|&i| keep.contains(&(labels[i] as usize)))
            .collect();
        let mut best = filtered.clone();
        best.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        best.truncate(max);
        best.sort_unstable();
        let options = DetrPostprocess {
            threshold,
            classes: Some(keep),
            max_detections: Some(max),
        };
        let cut = postprocess(&logits, &boxes, target, &options).unwrap();
        let expected: Vec<(i64, [f32; 4])> = best
            .iter()
            .map(|&i| (labels[i], out_boxes[4 * i..4 * i + 4].try_into().unwrap()))
            .collect();
        let got: Vec<(i64, [f32; 4])> = cut
            .iter()
            .map(|d| (d.class_id as i64, [d.x1, d.y1, d.x2, d.y2]))
            .collect();
        assert_eq!(got, expected, "{name}: classes + max_detections");
    }
}
