//! The real weights of the default models, pulled from the package registry
//! by the server itself, on real photographs: EfficientNet-Lite0 (ImageNet)
//! classifies, YOLOv5s (COCO) detects.

mod common;

use common::{client, fovea_bin, image, shared_home, Server};
use serde_json::Value;

/// ImageNet-1k ids of the cat classes (tabby .. Egyptian cat, and the big cats' neighbours
/// that a domestic cat photo commonly lands on are not counted).
const CAT_CLASSES: std::ops::RangeInclusive<u64> = 281..=285;

/// The tests share one model store: one at a time, so one pulls and the other reuses.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn top(answer: &Value, i: usize) -> Vec<(u64, String, f64)> {
    answer["results"][i]["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["class_id"].as_u64().unwrap(),
                p["label"].as_str().unwrap().to_string(),
                p["score"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn default_server_pulls_lite0_and_recognises_espresso_and_a_cat() {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // No --model: the default, pulled into the store if missing.
    let server = Server::start(&[]);
    let models: Value = client()
        .get(server.url("/v1/models"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(models["models"][0]["name"], "efficientnet-lite0");
    assert_eq!(models["models"][1]["name"], "yolov5s");
    assert_eq!(models["models"][1]["task"], "detection");

    // As the README's curl does: PUT with the raw PNG.
    let r = client()
        .put(server.url("/v1/classify"))
        .header("content-type", "image/png")
        .body(std::fs::read(image("coffee.png")).unwrap())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let coffee: Value = r.json().unwrap();
    let preds = top(&coffee, 0);
    assert_eq!(preds[0].1, "espresso", "{preds:?}");
    assert_eq!(preds[0].0, 967);

    let r = client()
        .post(server.url("/v1/classify?top_k=3"))
        .header("content-type", "image/png")
        .body(std::fs::read(image("chelsea.png")).unwrap())
        .send()
        .unwrap();
    let chelsea: Value = r.json().unwrap();
    let preds = top(&chelsea, 0);
    assert_eq!(preds.len(), 3);
    assert!(
        preds.iter().any(|p| CAT_CLASSES.contains(&p.0)),
        "{preds:?}"
    );
    let scores: Vec<f64> = preds.iter().map(|p| p.2).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "sorted by score");
}

#[test]
fn classify_command_prints_a_table_and_json() {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // The store is shared: the server test or this one pulls it first.
    let out = std::process::Command::new(fovea_bin())
        .args(["classify", "--json", "--top-k", "3"])
        .arg(image("coffee.png"))
        .arg(image("chelsea.png"))
        .env("FOVEA_HOME", shared_home())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["results"][0]["predictions"][0]["label"], "espresso");
    assert_eq!(v["results"][1]["predictions"].as_array().unwrap().len(), 3);

    let out = std::process::Command::new(fovea_bin())
        .args(["classify"])
        .arg(image("coffee.png"))
        .env("FOVEA_HOME", shared_home())
        .output()
        .unwrap();
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.contains("espresso") && table.contains("rank"),
        "{table}"
    );
}

/// The best-scored detection of `label` in an image: (score, box).
fn best(answer: &Value, label: &str) -> Option<(f64, [f64; 4])> {
    answer["results"][0]["detections"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["label"] == label)
        .map(|d| {
            let b = &d["box"];
            (
                d["score"].as_f64().unwrap(),
                ["x1", "y1", "x2", "y2"].map(|k| b[k].as_f64().unwrap()),
            )
        })
        .max_by(|a, b| a.0.total_cmp(&b.0))
}

#[test]
fn default_server_detects_objects_in_photographs() {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let server = Server::start(&[]);
    // The reference: Ultralytics' LetterBox, the original YOLOv5 code on the
    // same checkpoint, Ultralytics' NMS and scale_boxes, at the defaults
    // (`tests/reference/yolov5s_photos.py`). The PNGs match to 1e-4; the
    // JPEG differs by up to 0.007 because its decoder's IDCT is not PIL's.
    let cases = [
        (
            "motorcycle_left.png",
            "motorcycle",
            0.7545,
            [83.3, 28.4, 689.1, 454.6],
        ),
        (
            "grace_hopper.jpg",
            "person",
            0.7283,
            [8.1, 22.3, 512.0, 591.2],
        ),
        (
            "grace_hopper.jpg",
            "tie",
            0.6227,
            [216.6, 412.4, 294.5, 531.8],
        ),
        ("chelsea.png", "cat", 0.5692, [11.5, 0.0, 420.5, 297.1]),
        ("coffee.png", "cup", 0.5287, [170.3, 12.1, 422.4, 303.2]),
    ];
    for (name, label, expected, expected_box) in cases {
        let content_type = if name.ends_with(".jpg") {
            "image/jpeg"
        } else {
            "image/png"
        };
        // No `model`: /v1/detect takes the default detector.
        let r = client()
            .post(server.url("/v1/detect"))
            .header("content-type", content_type)
            .body(std::fs::read(image(name)).unwrap())
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        let answer: Value = r.json().unwrap();
        assert_eq!(answer["model"], "yolov5s");
        let (score, found_box) =
            best(&answer, label).unwrap_or_else(|| panic!("{name}: no {label}: {answer}"));
        eprintln!("{name}: {label} {score:.4} {found_box:?} (reference {expected})");
        assert!(
            (score - expected).abs() < 0.01,
            "{name}: {label} scored {score}, the reference {expected}"
        );
        for (got, want) in found_box.iter().zip(expected_box) {
            assert!(
                (got - want).abs() < 2.0,
                "{name}: {label} box {found_box:?}"
            );
        }
        // Nothing else is found at the default thresholds.
        let count = answer["results"][0]["detections"].as_array().unwrap().len();
        let expected_count = cases.iter().filter(|c| c.0 == name).count();
        assert_eq!(count, expected_count, "{name}: {answer}");
    }
}
