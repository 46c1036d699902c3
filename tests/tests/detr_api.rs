//! DETR and ViT served end to end, on the tiny random-weight fixtures in the
//! Hugging Face layouts: `/v1/detect` with DETR reproduces transformers'
//! whole pipeline (DetrImageProcessor, the model, post_process_object_detection)
//! on photos; images of different sizes batch together without changing
//! each other's answers; `/v1/classify` serves a ViT; `fovea detect` runs DETR.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{alone_then_together, client, detections, fovea_bin, image, repo_root, Server};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    repo_root()
        .join("model-core/tests/fixtures/models")
        .join(name)
}

/// The sizes the reference used for photos.json (kept small).
const SHORTEST: u32 = 160;
const LONGEST: u32 = 240;

fn start() -> Server {
    let dir = std::env::temp_dir().join(format!("fovea-detr-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("fovea.toml");
    let toml = format!(
        r#"
        [[models]]
        name = "detr"
        spec = "{detr}"
        input_size = {SHORTEST}
        max_input_size = {LONGEST}
        max_batch_size = 8
        max_queue_delay_ms = 300
        [[models]]
        name = "vit"
        spec = "vit_tiny_patch16_224:{vit}"
        "#,
        detr = fixture("detr_tiny/model.safetensors").display(),
        vit = fixture("hf_vit_tiny/model.safetensors").display(),
    );
    std::fs::write(&config, toml).unwrap();
    Server::start(&["--config", config.to_str().unwrap()])
}

fn post(server: &Server, route: &str, name: &str) -> reqwest::blocking::Response {
    client()
        .post(server.url(route))
        .header("content-type", "image/png")
        .body(std::fs::read(image(name)).unwrap())
        .send()
        .unwrap()
}

fn detect(server: &Server, name: &str) -> Value {
    let r = post(server, "/v1/detect?model=detr&confidence=0", name);
    assert_eq!(r.status(), 200);
    r.json().unwrap()
}

/// Every expected detection has its own match in `got` (same class, score
/// and box within the tolerances), and nothing else is there.
fn assert_same(
    what: &str,
    got: &[(u64, f64, [f64; 4])],
    want: &[(u64, f64, [f64; 4])],
    score_tol: f64,
    px_tol: f64,
) {
    assert_eq!(got.len(), want.len(), "{what}: {got:?} vs {want:?}");
    let mut free = vec![true; got.len()];
    for w in want {
        let hit = got.iter().enumerate().position(|(i, g)| {
            free[i]
                && g.0 == w.0
                && (g.1 - w.1).abs() <= score_tol
                && g.2.iter().zip(&w.2).all(|(a, b)| (a - b).abs() <= px_tol)
        });
        match hit {
            Some(i) => free[i] = false,
            None => panic!("{what}: no match for {w:?} in {got:?}"),
        }
    }
}

#[test]
fn detr_reproduces_the_transformers_pipeline_on_photos() {
    let server = start();
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("detr_tiny/photos.json")).unwrap())
            .unwrap();
    assert_eq!(reference["size"]["shortest_edge"], SHORTEST);
    assert_eq!(reference["size"]["longest_edge"], LONGEST);
    for expected in reference["results"].as_array().unwrap() {
        let name = expected["image"].as_str().unwrap();
        let answer = detect(&server, name);
        let result = &answer["results"][0];
        assert_eq!(result["width"], expected["width"], "{name}");
        assert_eq!(result["height"], expected["height"], "{name}");
        let want: Vec<(u64, f64, [f64; 4])> = expected["detections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                let b: Vec<f64> = d["box"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect();
                (
                    d["class_id"].as_u64().unwrap(),
                    d["score"].as_f64().unwrap(),
                    [b[0], b[1], b[2], b[3]],
                )
            })
            .collect();
        let got = detections(result);
        assert_same(name, &got, &want, 1e-4, 0.05);
        // Best first, with COCO's names (class ids are COCO category ids).
        assert!(got.windows(2).all(|w| w[0].1 >= w[1].1), "{name}: sorted");
        let first = &result["detections"][0];
        let id = first["class_id"].as_u64().unwrap() as usize;
        assert_eq!(first["label"], fovea_coco91(id), "{name}");
    }
}

/// COCO's 91 category names, id 0 and the unused ids "N/A".
fn fovea_coco91(id: usize) -> String {
    let text =
        std::fs::read_to_string(repo_root().join("model-core/src/coco91_labels.txt")).unwrap();
    text.lines().nth(id).unwrap().to_string()
}

#[test]
fn detr_answers_do_not_depend_on_batchmates() {
    let server = start();
    let names = [
        "chelsea.png",
        "coffee.png",
        "motorcycle_left.png",
        "astronaut.png",
    ];
    let (alone, together) = alone_then_together(&names, |n| detect(&server, n));
    for ((name, a), b) in names.iter().zip(&alone).zip(&together) {
        let (a, b) = (detections(&a["results"][0]), detections(&b["results"][0]));
        assert_eq!(a.len(), 12, "{name}: confidence 0 keeps every query");
        assert_same(name, &b, &a, 1e-5, 1e-3);
    }
    // A threshold and a class filter apply to DETR as to YOLO.
    let r = post(
        &server,
        "/v1/detect?model=detr&confidence=0.99",
        "chelsea.png",
    );
    assert_eq!(r.status(), 200);
    let v: Value = r.json().unwrap();
    assert!(v["results"][0]["detections"].as_array().unwrap().is_empty());
    let r = post(
        &server,
        "/v1/detect?model=detr&confidence=0&classes=person",
        "chelsea.png",
    );
    let v: Value = r.json().unwrap();
    for d in v["results"][0]["detections"].as_array().unwrap() {
        assert_eq!(d["label"], "person");
    }
    let r = post(
        &server,
        "/v1/detect?model=detr&classes=giraffe-ish",
        "chelsea.png",
    );
    assert_eq!(r.status(), 422);
}

#[test]
fn models_describe_detr_and_vit_and_vit_classifies() {
    let server = start();
    let models: Value = client()
        .get(server.url("/v1/models"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let by_name = |n: &str| {
        models["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == n)
            .cloned()
            .unwrap_or_else(|| panic!("{n} in {models}"))
    };
    let detr = by_name("detr");
    assert_eq!(detr["task"], "detection");
    assert_eq!(detr["family"], "detr");
    assert_eq!(detr["layout"], "huggingface");
    assert_eq!(detr["num_classes"], 91);
    assert!(detr["input_size"].is_null(), "{detr}");
    assert_eq!(detr["preprocess"]["kind"], "detr");
    assert_eq!(detr["preprocess"]["shortest_edge"], SHORTEST);
    assert_eq!(detr["preprocess"]["longest_edge"], LONGEST);
    let vit = by_name("vit");
    assert_eq!(vit["task"], "classification");
    assert_eq!(vit["family"], "vit");
    assert_eq!(vit["layout"], "huggingface");
    assert_eq!(vit["input_size"], serde_json::json!([64, 64]));
    assert_eq!(vit["preprocess"]["kind"], "classify");

    let r = post(&server, "/v1/classify?model=vit&top_k=3", "chelsea.png");
    assert_eq!(r.status(), 200);
    let v: Value = r.json().unwrap();
    let predictions = v["results"][0]["predictions"].as_array().unwrap();
    assert_eq!(predictions.len(), 3);
    let total: f64 = predictions
        .iter()
        .map(|p| p["score"].as_f64().unwrap())
        .sum();
    assert!(total > 0.0 && total <= 1.0 + 1e-6, "{v}");
    // Each model answers its own task only.
    assert_eq!(
        post(&server, "/v1/detect?model=vit", "chelsea.png").status(),
        422
    );
    assert_eq!(
        post(&server, "/v1/classify?model=detr", "chelsea.png").status(),
        422
    );
}

#[test]
fn fovea_detect_runs_detr_like_the_server() {
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("detr_tiny/photos.json")).unwrap())
            .unwrap();
    let expected = &reference["results"][0];
    let name = expected["image"].as_str().unwrap();
    let weights = fixture("detr_tiny/model.safetensors");
    let out = Command::new(fovea_bin())
        .args(["detect", "--model", weights.to_str().unwrap()])
        .args([
            "--size",
            &SHORTEST.to_string(),
            "--max-size",
            &LONGEST.to_string(),
        ])
        .args(["--confidence", "0", "--json"])
        .arg(image(name))
        .env(
            "FOVEA_HOME",
            std::env::temp_dir().join("fovea-detr-cli-home"),
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let got = detections(&v["results"][0]);
    let want = expected["detections"].as_array().unwrap();
    assert_eq!(got.len(), want.len());
    let best = want
        .iter()
        .map(|d| d["score"].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert!((got[0].1 - best).abs() < 1e-3, "{} vs {best}", got[0].1);
}
