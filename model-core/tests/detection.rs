//! Detection pre- and postprocessing against Ultralytics' references written
//! by `tests/fixtures/make_detection_fixtures.py`: `LetterBox` (OpenCV
//! resize), `non_max_suppression` (torchvision nms) and `scale_boxes`; and
//! the rendering of detections.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use fovea_model_core::detection::{postprocess, to_source, DetectOptions, Detection};
use fovea_model_core::letterbox::Letterbox;
use fovea_model_core::render::{class_color, encode_jpeg, render, text_color};
use image::{Rgb, RgbImage};
use serde_json::Value;

fn tests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests")
}

fn fixtures() -> PathBuf {
    tests_dir().join("fixtures/detection")
}

fn load_rgb(path: &Path) -> RgbImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
}

fn load_json(name: &str) -> Vec<Value> {
    let path = fixtures().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn u32_of(v: &Value, key: &str) -> u32 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}")) as u32
}

#[test]
fn letterbox_matches_ultralytics() {
    let mut total = 0usize;
    for case in load_json("letterbox.json") {
        let name = case["case"].as_str().unwrap();
        let source = load_rgb(&tests_dir().join(case["source"].as_str().unwrap()));
        let reference = load_rgb(&tests_dir().join(case["reference"].as_str().unwrap()));
        assert_eq!(
            (source.width(), source.height()),
            (
                u32_of(&case, "source_width"),
                u32_of(&case, "source_height")
            )
        );
        let lb = Letterbox {
            height: u32_of(&case, "height"),
            width: u32_of(&case, "width"),
            pad_value: 114,
        };
        let (out, t) = lb.apply(&source);
        assert_eq!(
            (t.resized_width, t.resized_height, t.pad_left, t.pad_top),
            (
                u32_of(&case, "resized_width"),
                u32_of(&case, "resized_height"),
                u32_of(&case, "left") as f32,
                u32_of(&case, "top") as f32
            ),
            "{name}: geometry"
        );
        assert_eq!(
            (reference.width(), reference.height()),
            (lb.width, lb.height)
        );
        let plane = (lb.width * lb.height) as usize;
        let (mut differing, mut max_diff) = (0usize, 0i32);
        for (i, px) in reference.pixels().enumerate() {
            for c in 0..3 {
                let ours = out[c * plane + i];
                let level = (ours * 255.0).round() as i32;
                // Exactly the f32 PyTorch gets from uint8 / 255.
                assert_eq!(ours, level as f32 / 255.0, "{name}: not a level");
                let diff = (level - i32::from(px[c])).abs();
                if diff != 0 {
                    differing += 1;
                    max_diff = max_diff.max(diff);
                }
            }
        }
        println!(
            "letterbox {name}: {}x{} -> {}x{}: {differing} of {} samples differ, max {max_diff} levels",
            source.width(),
            source.height(),
            lb.width,
            lb.height,
            3 * plane
        );
        assert_eq!(
            differing, 0,
            "{name}: {differing} samples differ (max {max_diff})"
        );
        total += 1;
    }
    assert_eq!(total, 11);
}

/// A measurement, not a check (speed is never asserted in tests):
/// `cargo test --release -p fovea-model-core --test detection -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement: run with --ignored --nocapture"]
fn letterbox_time_on_a_photo() {
    // A 1600x1200 (1.9 MP) photo-like gradient into 640x640.
    let img = RgbImage::from_fn(1600, 1200, |x, y| {
        Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 251) as u8])
    });
    let lb = Letterbox::new(640);
    let mut out = vec![0.0; lb.output_len()];
    lb.apply_into(&img, &mut out); // warm-up
    let runs = 10;
    let start = Instant::now();
    for _ in 0..runs {
        lb.apply_into(&img, &mut out);
    }
    let per_call = start.elapsed() / runs;
    println!("letterbox 1600x1200 -> 640x640: {per_call:?} per image");
}

/// The "generated" raw output: the same integer formula as the fixture
/// script's `generated_raw()`, [6, 32000] (cx, cy, w, h, class 0, class 1).
fn generated_raw() -> Vec<f32> {
    let n = 32_000usize;
    let mut out = vec![0.0f32; 6 * n];
    for i in 0..n {
        let h = (i as u32).wrapping_mul(2_654_435_761);
        out[i] = (h % 640) as f32 + 0.5;
        out[n + i] = ((h >> 10) % 640) as f32 + 0.25;
        out[2 * n + i] = 8.0 + ((h >> 20) % 64) as f32;
        out[3 * n + i] = 8.0 + ((h >> 26) % 32) as f32;
        let k0 = (i as u64 * 7919) % 32_000 + 500;
        let k1 = (i as u64 * 104_729) % 32_000 + 500;
        out[4 * n + i] = (2 * k0) as f32 / 65536.0;
        out[5 * n + i] = (2 * k1 + 1) as f32 / 65536.0;
    }
    out
}

fn raw_output(tensors: &HashMap<String, Tensor>, raw: &str) -> Vec<f32> {
    if raw == "generated" {
        return generated_raw();
    }
    let boxes = tensors[&format!("{raw}.boxes")].flatten_all().unwrap();
    let scores = &tensors[&format!("{raw}.scores")];
    let scores = match scores.dtype() {
        // Levels q meaning q / 256, exact in f32.
        DType::U8 => scores
            .flatten_all()
            .unwrap()
            .to_vec1::<u8>()
            .unwrap()
            .into_iter()
            .map(|q| f32::from(q) / 256.0)
            .collect(),
        _ => scores.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    };
    let mut out = boxes.to_vec1::<f32>().unwrap();
    out.extend(scores);
    out
}

fn rows(tensor: &Tensor) -> Vec<Vec<f32>> {
    if tensor.elem_count() == 0 {
        return Vec::new();
    }
    tensor
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
}

#[test]
fn nms_matches_ultralytics() {
    let path = fixtures().join("nms.safetensors");
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let (mut worst_box, mut worst_scaled, mut cases, mut scaled_sets) = (0.0f32, 0.0f32, 0, 0);
    for case in load_json("nms.json") {
        let name = case["case"].as_str().unwrap();
        let nc = case["num_classes"].as_u64().unwrap() as usize;
        let options = DetectOptions {
            confidence: case["confidence"].as_f64().unwrap() as f32,
            iou: case["iou"].as_f64().unwrap() as f32,
            max_detections: case["max_detections"].as_u64().unwrap() as usize,
            classes: case["classes"]
                .as_array()
                .map(|a| a.iter().map(|c| c.as_u64().unwrap() as usize).collect()),
            agnostic: case["agnostic"].as_bool().unwrap(),
        };
        let raw = raw_output(&tensors, case["raw"].as_str().unwrap());
        let start = Instant::now();
        let dets = postprocess(&raw, nc, &options);
        let took = start.elapsed();
        let expected = rows(&tensors[&format!("{name}.expected")]);
        assert_eq!(dets.len(), expected.len(), "{name}: number kept");
        let mut max_diff = 0.0f32;
        for (k, (d, e)) in dets.iter().zip(&expected).enumerate() {
            assert_eq!(d.class_id, e[5] as usize, "{name}[{k}]: class");
            assert_eq!(d.score, e[4], "{name}[{k}]: score");
            for (ours, theirs) in [d.x1, d.y1, d.x2, d.y2].into_iter().zip(&e[..4]) {
                max_diff = max_diff.max((ours - theirs).abs());
            }
        }
        assert!(max_diff <= 1e-4, "{name}: boxes differ by {max_diff}");
        worst_box = worst_box.max(max_diff);
        println!(
            "nms {name}: {} kept, max box diff {max_diff:e}, {took:?}",
            dets.len()
        );

        for shape in case["scaled"].as_array().unwrap() {
            let (h, w) = (
                shape[0].as_u64().unwrap() as u32,
                shape[1].as_u64().unwrap() as u32,
            );
            let mut mapped = dets.clone();
            to_source(&mut mapped, &Letterbox::new(640).transform(w, h));
            let expected = rows(&tensors[&format!("{name}.scaled.{h}x{w}")]);
            let mut max_diff = 0.0f32;
            for (d, e) in mapped.iter().zip(&expected) {
                for (ours, theirs) in [d.x1, d.y1, d.x2, d.y2].into_iter().zip(e) {
                    max_diff = max_diff.max((ours - theirs).abs());
                }
            }
            assert!(
                max_diff <= 1e-4,
                "{name} -> {h}x{w}: boxes differ by {max_diff}"
            );
            worst_scaled = worst_scaled.max(max_diff);
            scaled_sets += 1;
        }
        cases += 1;
    }
    println!("nms: {cases} cases, worst box diff {worst_box:e}; scale_boxes: {scaled_sets} sets, worst diff {worst_scaled:e}");
    assert_eq!((cases, scaled_sets), (12, 18));
}

// ------------------------------------------------------------------ render

fn det(class_id: usize, score: f32, x1: f32, y1: f32, x2: f32, y2: f32) -> Detection {
    Detection {
        class_id,
        score,
        x1,
        y1,
        x2,
        y2,
    }
}

fn labels() -> Vec<String> {
    ["person", "bicycle", "car"].map(String::from).to_vec()
}

fn count(img: &RgbImage, x0: u32, y0: u32, x1: u32, y1: u32, color: [u8; 3]) -> usize {
    let mut n = 0;
    for y in y0..y1.min(img.height()) {
        for x in x0..x1.min(img.width()) {
            n += usize::from(img.get_pixel(x, y).0 == color);
        }
    }
    n
}

#[test]
fn render_draws_boxes_and_labels_on_light_and_dark_images() {
    for background in [[0u8, 0, 0], [255, 255, 255], [128, 128, 128]] {
        let img = RgbImage::from_pixel(640, 480, Rgb(background));
        let dets = [
            det(0, 0.87, 100.0, 150.0, 300.0, 400.0),
            det(2, 0.5, 400.0, 10.0, 600.0, 200.0),
        ];
        let out = render(&img, &dets, &labels());
        assert_eq!(out.dimensions(), img.dimensions());
        for d in &dets {
            let color = class_color(d.class_id);
            let (x1, y1, x2, y2) = (d.x1 as u32, d.y1 as u32, d.x2 as u32, d.y2 as u32);
            // Outline on all four edges, inside untouched, outside untouched.
            assert_eq!(out.get_pixel(x1, (y1 + y2) / 2).0, color);
            assert_eq!(out.get_pixel(x2 - 1, (y1 + y2) / 2).0, color);
            assert_eq!(out.get_pixel((x1 + x2) / 2, y2 - 1).0, color);
            assert_eq!(out.get_pixel((x1 + x2) / 2, (y1 + y2) / 2).0, background);
            assert_eq!(out.get_pixel(x2 + 2, (y1 + y2) / 2).0, background);
            // A filled label with text in the contrasting colour: at this
            // size the label is 10 pixels tall (8-pixel glyphs, 1 pixel of
            // padding) and ends on the box's top edge; "car 0.50" is 49 wide.
            let ink = text_color(color);
            let (lx, ly) = (x1, y1 - 10);
            let area = (49 * 10) as usize;
            let label_ink = count(&out, lx, ly, lx + 49, ly + 10, ink);
            let label_fill = count(&out, lx, ly, lx + 49, ly + 10, color);
            assert_eq!(label_ink + label_fill, area, "label has other colours");
            assert!(label_ink > 60, "too little text: {label_ink}");
            assert!(
                label_fill > label_ink,
                "label fill {label_fill} vs text {label_ink}"
            );
            assert_ne!(ink, color);
        }
        // Only the two boxes' surroundings changed.
        assert_eq!(count(&out, 0, 420, 640, 480, background), 640 * 60);
    }
}

#[test]
fn label_text_matches_its_string() {
    // Different text gives different pixels; non-ASCII shows as '?'.
    let img = RgbImage::from_pixel(320, 240, Rgb([40, 90, 40]));
    let render_label = |name: &str| {
        render(
            &img,
            &[det(0, 0.5, 50.0, 100.0, 200.0, 200.0)],
            &[name.to_string()],
        )
    };
    assert_ne!(render_label("cat"), render_label("dog"));
    assert_eq!(render_label("caf\u{e9}"), render_label("caf?"));
    assert_eq!(render_label("\u{732b}"), render_label("?"));
    // A class without a label shows its number.
    let unnamed = render(&img, &[det(7, 0.5, 50.0, 100.0, 200.0, 200.0)], &[]);
    assert_eq!(unnamed, {
        let seven = vec![String::new(); 7]
            .into_iter()
            .chain(["7".to_string()])
            .collect::<Vec<_>>();
        render(&img, &[det(7, 0.5, 50.0, 100.0, 200.0, 200.0)], &seven)
    });
}

#[test]
fn render_survives_degenerate_inputs() {
    let dets = [
        det(0, 0.9, -50.0, -50.0, 20.0, 20.0),
        det(1, 0.9, 600.0, 400.0, 9000.0, 9000.0),
        det(2, 0.9, 5000.0, 5000.0, 6000.0, 6000.0),
        det(3, 0.9, f32::NAN, 0.0, 10.0, 10.0),
        det(4, 0.9, 0.0, f32::INFINITY, 10.0, 10.0),
        det(5, 0.9, 30.0, 30.0, 10.0, 10.0), // corners swapped
        det(6, 0.9, 40.0, 40.0, 40.0, 40.0), // zero size
        det(usize::MAX, f32::NAN, 1.0, 1.0, 2.0, 2.0),
        det(0, 0.5, 0.0, 0.0, 640.0, 480.0), // the whole image
    ];
    let long = vec!["a very long label that does not fit anywhere at all".to_string(); 7];
    for (w, h) in [
        (640, 480),
        (1, 1),
        (3, 100),
        (100, 2),
        (0, 0),
        (0, 10),
        (10, 0),
    ] {
        let img = RgbImage::from_pixel(w, h, Rgb([9, 9, 9]));
        let out = render(&img, &dets, &long);
        assert_eq!(out.dimensions(), (w, h));
        assert_eq!(render(&img, &[], &[]), img);
    }
}

#[test]
fn jpeg_round_trip() {
    let img = RgbImage::from_fn(97, 61, |x, y| Rgb([x as u8 * 2, y as u8 * 4, 128]));
    let out = render(&img, &[det(1, 0.7, 10.0, 20.0, 60.0, 50.0)], &labels());
    for quality in [0, 50, 90, 255] {
        let bytes = encode_jpeg(&out, quality);
        assert_eq!(&bytes[..2], &[0xFF, 0xD8], "JPEG SOI marker");
        let decoded = image::load_from_memory_with_format(&bytes, image::ImageFormat::Jpeg)
            .unwrap()
            .to_rgb8();
        assert_eq!(decoded.dimensions(), (97, 61));
    }
    let worse = encode_jpeg(&out, 10).len();
    let better = encode_jpeg(&out, 95).len();
    assert!(worse < better);
    assert!(encode_jpeg(&RgbImage::new(0, 0), 90).is_empty());
}

#[test]
fn full_pipeline_on_a_sample_image() {
    // Letterbox a real photo, make up a raw output with one box in input
    // pixels, postprocess, map back, render: the box lands where expected.
    let img = load_rgb(&tests_dir().join("../../tests/images/coffee.png"));
    let lb = Letterbox::new(640);
    let (_, t) = lb.apply(&img);
    let (gx, gy) = t.gains();
    assert_eq!(
        (t.resized_width, t.resized_height, t.pad_left, t.pad_top),
        (640, 427, 0.0, 106.0)
    );
    // Source box (100, 50)-(300, 250) in input pixels.
    let (x1, y1) = (100.0 * gx, 50.0 * gy + t.pad_top);
    let (x2, y2) = (300.0 * gx, 250.0 * gy + t.pad_top);
    let raw = vec![(x1 + x2) / 2.0, (y1 + y2) / 2.0, x2 - x1, y2 - y1, 0.1, 0.9];
    let mut dets = postprocess(&raw, 2, &DetectOptions::default());
    to_source(&mut dets, &t);
    assert_eq!(dets.len(), 1);
    let d = &dets[0];
    for (ours, want) in [(d.x1, 100.0), (d.y1, 50.0), (d.x2, 300.0), (d.y2, 250.0)] {
        assert!((ours - want).abs() < 1e-3, "{ours} vs {want}");
    }
    let names: Vec<String> = fovea_model_core::labels::coco80()
        .iter()
        .map(|s| s.to_string())
        .collect();
    let out = render(&img, &dets, &names);
    assert_eq!(out.get_pixel(100, 150).0, class_color(1));
}
