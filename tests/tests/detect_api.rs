//! `/v1/detect` end to end on a tiny random-weight YOLOv8 (imported from
//! its Ultralytics checkpoint): batching of images of different sizes,
//! boxes in the original images' pixels, drawn answers, options and their
//! errors, the task check between classifiers and detectors, metrics, and
//! `fovea detect`.

mod common;

use std::process::Command;

use common::{
    alone_then_together, client, detections, fovea_bin, image, shared_home, tiny_detector,
    tiny_model, Server,
};
use reqwest::blocking::multipart;
use serde_json::Value;

fn bytes_of(name: &str) -> Vec<u8> {
    std::fs::read(image(name)).unwrap()
}

/// Random weights give scores near 0.5 everywhere: with a low threshold
/// there are always boxes to check.
const LOW: &str = "confidence=0.3&max_detections=50";

fn start_both() -> Server {
    Server::start(&[
        "--model",
        &format!("det={}", tiny_detector()),
        "--model",
        &format!("cls={}", tiny_model()),
        "--max-batch-size",
        "8",
        "--max-queue-delay-ms",
        "300",
    ])
}

fn detect(server: &Server, query: &str, name: &str) -> Value {
    let r = client()
        .post(server.url(&format!("/v1/detect?{query}")))
        .header("content-type", content_type(name))
        .body(bytes_of(name))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().unwrap()
}

fn content_type(name: &str) -> &'static str {
    if name.ends_with(".jpg") {
        "image/jpeg"
    } else {
        "image/png"
    }
}

fn error_code(resp: reqwest::blocking::Response) -> (u16, String, String) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().expect("errors are JSON");
    (
        status,
        body["error"]["code"].as_str().unwrap().to_string(),
        body["error"]["message"].as_str().unwrap().to_string(),
    )
}

#[test]
fn images_of_different_sizes_are_batched_and_mapped_back() {
    let server = start_both();
    let names = [
        "chelsea.png",
        "coffee.png",
        "grace_hopper.jpg",
        "motorcycle_left.png",
    ];
    // Alone first (the reference answers), then all at once in shared batches.
    let (alone, together) = alone_then_together(&names, |n| detect(&server, LOW, n));

    for ((name, a), b) in names.iter().zip(&alone).zip(&together) {
        let img = image::open(image(name)).unwrap();
        let result = &a["results"][0];
        assert_eq!(result["width"], img.width(), "{name}");
        assert_eq!(result["height"], img.height(), "{name}");
        let found = detections(result);
        assert!(!found.is_empty(), "{name}: no boxes at a low threshold");
        assert!(found.len() <= 50);
        for (_, score, [x1, y1, x2, y2]) in &found {
            assert!(*score >= 0.3, "{name}: score {score}");
            assert!(
                0.0 <= *x1 && x1 <= x2 && *x2 <= img.width() as f64,
                "{name}"
            );
            assert!(
                0.0 <= *y1 && y1 <= y2 && *y2 <= img.height() as f64,
                "{name}"
            );
        }
        let scores: Vec<f64> = found.iter().map(|d| d.1).collect();
        assert!(scores.windows(2).all(|w| w[0] >= w[1]), "sorted by score");

        // What an image gets does not depend on what it was batched with.
        let other = detections(&b["results"][0]);
        assert_eq!(found.len(), other.len(), "{name}");
        for (x, y) in found.iter().zip(&other) {
            assert_eq!(x.0, y.0, "{name}");
            assert!((x.1 - y.1).abs() < 1e-4, "{name}");
            for k in 0..4 {
                assert!((x.2[k] - y.2[k]).abs() < 1e-2, "{name}: {x:?} vs {y:?}");
            }
        }
    }

    // Several images in one multipart request: one result each, in order.
    let mut form = multipart::Form::new();
    for (i, name) in names.iter().enumerate() {
        let part = multipart::Part::bytes(bytes_of(name))
            .file_name(name.to_string())
            .mime_str(content_type(name))
            .unwrap();
        form = form.part(format!("image{i}"), part);
    }
    let r = client()
        .post(server.url(&format!("/v1/detect?{LOW}")))
        .multipart(form)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let multi: Value = r.json().unwrap();
    assert_eq!(multi["model"], "det");
    for (i, a) in alone.iter().enumerate() {
        assert_eq!(multi["results"][i]["width"], a["results"][0]["width"]);
        assert_eq!(
            detections(&multi["results"][i]).len(),
            detections(&a["results"][0]).len()
        );
    }

    // Every image was counted, with its detections.
    let images = server
        .metric("fovea_images_total", &[("model", "det")])
        .unwrap();
    assert_eq!(images, 12.0);
    let counted = server
        .metric("fovea_detections_per_image_count", &[("model", "det")])
        .unwrap();
    assert_eq!(counted, 12.0);
}

#[test]
fn options_filter_and_are_checked() {
    let server = start_both();
    let all = detections(&detect(&server, "confidence=0.3", "chelsea.png")["results"][0]);
    let higher = detections(&detect(&server, "confidence=0.8", "chelsea.png")["results"][0]);
    assert!(
        higher.len() < all.len(),
        "{} vs {}",
        higher.len(),
        all.len()
    );
    assert!(higher.iter().all(|d| d.1 >= 0.8));

    let few = detections(
        &detect(&server, "confidence=0.3&max_detections=3", "chelsea.png")["results"][0],
    );
    assert_eq!(few.len(), 3);
    assert_eq!(few, all[..3].to_vec(), "max_detections keeps the best");

    // The class filter takes ids or names; the names are the checkpoint's
    // own (Ultralytics names a fresh model's classes `class0`, ...; Fovea's
    // fallback would be `class_0`).
    let first_class = all[0].0;
    let by_id = detect(
        &server,
        &format!("confidence=0.3&classes={first_class}"),
        "chelsea.png",
    );
    let only = detections(&by_id["results"][0]);
    assert!(!only.is_empty());
    assert!(only.iter().all(|d| d.0 == first_class));
    assert_eq!(
        by_id["results"][0]["detections"][0]["label"],
        format!("class{first_class}")
    );
    let by_name = detect(
        &server,
        &format!("confidence=0.3&classes=class{first_class}"),
        "chelsea.png",
    );
    assert_eq!(detections(&by_name["results"][0]), only);

    // A looser IoU keeps at least as many boxes; agnostic NMS at most as many.
    let loose = detections(&detect(&server, "confidence=0.3&iou=0.9", "chelsea.png")["results"][0]);
    assert!(loose.len() >= all.len());
    let agnostic =
        detections(&detect(&server, "confidence=0.3&agnostic=true", "chelsea.png")["results"][0]);
    assert!(agnostic.len() <= all.len());

    // JSON bodies carry options as fields.
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes_of("chelsea.png"));
    let r = client()
        .post(server.url("/v1/detect"))
        .json(&serde_json::json!({"images": [b64], "confidence": 0.3, "classes": [first_class], "model": "det"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let via_json: Value = r.json().unwrap();
    assert_eq!(detections(&via_json["results"][0]), only);

    for bad in [
        "confidence=2",
        "iou=-0.1",
        "max_detections=0",
        "classes=no_such_class",
        "classes=99999",
        "agnostic=maybe",
        "render=maybe",
        "top_k=3",
        "confidance=0.3",
    ] {
        let r = client()
            .post(server.url(&format!("/v1/detect?{bad}")))
            .header("content-type", "image/png")
            .body(bytes_of("chelsea.png"))
            .send()
            .unwrap();
        let (status, code, _) = error_code(r);
        assert_eq!((status, code.as_str()), (422, "invalid_option"), "{bad}");
    }
}

#[test]
fn each_task_goes_to_its_models() {
    let server = start_both();
    // Without `model`, each route takes the first model of its task.
    let d = detect(&server, LOW, "coffee.png");
    assert_eq!(d["model"], "det");
    let r = client()
        .post(server.url("/v1/classify"))
        .header("content-type", "image/png")
        .body(bytes_of("coffee.png"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().unwrap()["model"], "cls");

    // The wrong task is a 422 that names the models that do it.
    let r = client()
        .post(server.url("/v1/detect?model=cls"))
        .header("content-type", "image/png")
        .body(bytes_of("coffee.png"))
        .send()
        .unwrap();
    let (status, code, message) = error_code(r);
    assert_eq!((status, code.as_str()), (422, "invalid_option"));
    assert!(message.contains("det"), "{message}");
    let r = client()
        .post(server.url("/v1/classify?model=det"))
        .header("content-type", "image/png")
        .body(bytes_of("coffee.png"))
        .send()
        .unwrap();
    let (status, _, message) = error_code(r);
    assert_eq!(status, 422);
    assert!(message.contains("cls"), "{message}");
    let r = client()
        .post(server.url("/v1/detect?model=nope"))
        .header("content-type", "image/png")
        .body(bytes_of("coffee.png"))
        .send()
        .unwrap();
    assert_eq!(error_code(r).0, 404);

    let models: Value = client()
        .get(server.url("/v1/models/det"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(models["task"], "detection");
    assert_eq!(models["family"], "yolo");
    assert_eq!(models["input_size"], serde_json::json!([640, 640]));
}

#[test]
fn drawn_answers_are_jpegs_of_the_original_size() {
    let server = start_both();
    for (query, accept) in [
        ("confidence=0.3", "image/jpeg"),
        ("confidence=0.3&render=true", "application/json"),
    ] {
        let r = client()
            .post(server.url(&format!("/v1/detect?{query}")))
            .header("content-type", "image/jpeg")
            .header("accept", accept)
            .body(bytes_of("grace_hopper.jpg"))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "image/jpeg");
        let n: usize = r.headers()["x-fovea-detections"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(n > 0);
        let drawn = image::load_from_memory(&r.bytes().unwrap()).unwrap();
        assert_eq!((drawn.width(), drawn.height()), (512, 600));
        // Boxes were drawn: the picture differs from the original.
        let original = image::open(image("grace_hopper.jpg")).unwrap().to_rgb8();
        let changed = drawn
            .to_rgb8()
            .pixels()
            .zip(original.pixels())
            .filter(|(a, b)| a.0.iter().zip(b.0).any(|(x, y)| x.abs_diff(y) > 40))
            .count();
        assert!(changed > 1000, "{changed} pixels changed");
    }
    // render=false wins over the Accept header.
    let r = client()
        .post(server.url("/v1/detect?render=false"))
        .header("content-type", "image/jpeg")
        .header("accept", "image/jpeg")
        .body(bytes_of("grace_hopper.jpg"))
        .send()
        .unwrap();
    assert_eq!(r.headers()["content-type"], "application/json");

    // One drawn image per request.
    let mut form = multipart::Form::new();
    for i in 0..2 {
        form = form.part(
            format!("image{i}"),
            multipart::Part::bytes(bytes_of("coffee.png"))
                .mime_str("image/png")
                .unwrap(),
        );
    }
    let r = client()
        .post(server.url("/v1/detect?render=true"))
        .multipart(form)
        .send()
        .unwrap();
    assert_eq!(error_code(r).0, 422);
}

#[test]
fn detect_command_prints_json_and_saves_drawings() {
    let dir = std::env::temp_dir().join(format!("fovea-detect-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let save = dir.join("boxes.jpg");
    let out = Command::new(fovea_bin())
        .args([
            "detect",
            "--model",
            &tiny_detector(),
            "--json",
            "--confidence",
            "0.3",
        ])
        .arg("--save")
        .arg(&save)
        .arg(image("chelsea.png"))
        .arg(image("grace_hopper.jpg"))
        .env("FOVEA_HOME", shared_home())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["results"].as_array().unwrap().len(), 2);
    assert_eq!(answer["results"][1]["width"], 512);
    assert!(!detections(&answer["results"][0]).is_empty());
    for (i, size) in [(1, (451, 300)), (2, (512, 600))] {
        let drawn = image::open(dir.join(format!("boxes-{i}.jpg"))).unwrap();
        assert_eq!((drawn.width(), drawn.height()), size);
    }

    // The table form, and a classifier refused with a clear message.
    let out = Command::new(fovea_bin())
        .args(["detect", "--model", &tiny_detector(), "--confidence", "0.3"])
        .arg(image("coffee.png"))
        .env("FOVEA_HOME", shared_home())
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("coffee.png (600x400)"), "{text}");
    let out = Command::new(fovea_bin())
        .args(["detect", "--model", &tiny_model()])
        .arg(image("coffee.png"))
        .env("FOVEA_HOME", shared_home())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("classification"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_letterbox_size_is_configurable() {
    let dir = std::env::temp_dir().join(format!("fovea-detect-size-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("fovea.toml");
    std::fs::write(
        &config,
        format!(
            "[[models]]\nname = \"small\"\nspec = {:?}\ninput_size = 320\n",
            tiny_detector()
        ),
    )
    .unwrap();
    let server = Server::start(&["--config", config.to_str().unwrap()]);
    let model: Value = client()
        .get(server.url("/v1/models/small"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(model["input_size"], serde_json::json!([320, 320]));
    let answer = detect(&server, LOW, "motorcycle_left.png");
    assert_eq!(answer["results"][0]["width"], 741);
    assert!(!detections(&answer["results"][0]).is_empty());

    // Not a multiple of 32: refused before anything runs.
    let out = Command::new(fovea_bin())
        .args(["detect", "--model", &tiny_detector(), "--size", "100"])
        .arg(image("coffee.png"))
        .env("FOVEA_HOME", shared_home())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("32"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
