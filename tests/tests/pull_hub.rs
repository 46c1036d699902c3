//! `fovea pull hf:...` and `fovea pull http://...` end to end: the real
//! binary against a stand-in hub on loopback (no internet), then `fovea
//! models` and `fovea classify` on what it stored.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{fovea_bin, image, repo_root};
use fovea_weights::standin::{sha256_hex, StandinHub};
use serde_json::{json, Value};

const COMMIT: &str = "4f6c2b1a9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b";
const REPO: &str = "timm/resnet50.tiny_in64";
const TOKEN: &str = "hf_e2e_token";

struct Env<'a> {
    hub: &'a StandinHub,
    dir: &'a Path,
}

impl Env<'_> {
    fn fovea(&self, args: &[&str], token: Option<&str>) -> Output {
        let mut cmd = Command::new(fovea_bin());
        cmd.args(args)
            .env("HF_ENDPOINT", &self.hub.endpoint)
            .env("HF_HOME", self.dir.join("hf"))
            .env("FOVEA_HOME", self.dir.join("fovea"))
            .env_remove("HF_HUB_CACHE")
            .env_remove("HF_HUB_OFFLINE")
            .env_remove("HF_TOKEN_PATH")
            .env_remove("HF_TOKEN")
            .env_remove("FOVEA_MODEL")
            .stdin(Stdio::null());
        if let Some(token) = token {
            cmd.env("HF_TOKEN", token);
        }
        cmd.output().expect("run fovea")
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn pull_from_a_hub_then_list_and_classify() {
    let weights = std::fs::read(
        repo_root().join("model-core/tests/fixtures/models/timm_resnet50_tiny/model.safetensors"),
    )
    .unwrap();
    let names: Vec<String> = (0..64).map(|i| format!("thing-{i}")).collect();
    let config = serde_json::to_vec(&json!({
        "architecture": "resnet50",
        "num_classes": 64,
        "label_names": names,
        "pretrained_cfg": {
            "input_size": [3, 80, 80], "interpolation": "bicubic", "crop_pct": 0.875,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]
        }
    }))
    .unwrap();
    let hub = StandinHub::start();
    hub.add_repo(
        REPO,
        COMMIT,
        &[
            ("config.json", &config, false),
            ("model.safetensors", &weights, true),
            (
                "README.md",
                b"---\nlicense: apache-2.0\nlibrary_name: timm\n---\n",
                false,
            ),
        ],
    );
    hub.require_token(REPO, TOKEN);
    // The first download is cut short; the pull continues it with a Range.
    hub.cut_once(REPO, "model.safetensors", 150_000);
    let dir = tempfile::tempdir().unwrap();
    let env = Env {
        hub: &hub,
        dir: dir.path(),
    };
    let spec = format!("hf:{REPO}");

    // Without the token the hub says 401 and the pull says what to do.
    let out = env.fovea(&["pull", &spec], None);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("set HF_TOKEN"),
        "{}",
        text(&out.stderr)
    );

    let out = env.fovea(&["pull", &spec], Some(TOKEN));
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        text(&out.stdout).contains(
            "pulled resnet50.tiny_in64 (classification resnet50, 64 classes, license apache-2.0)"
        ),
        "{}",
        text(&out.stdout)
    );
    assert!(stderr.contains("download interrupted"), "{stderr}");
    let gets = hub.storage_gets(REPO, "model.safetensors");
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[1].range.as_deref(), Some("bytes=150000-"));
    assert!(hub
        .log()
        .iter()
        .filter(|l| l.host == "cdn")
        .all(|l| l.authorization.is_none()));

    // The hub cache, in huggingface_hub's layout under $HF_HOME/hub.
    let repo_dir = dir.path().join("hf/hub/models--timm--resnet50.tiny_in64");
    let snapshot = repo_dir.join("snapshots").join(COMMIT);
    assert_eq!(
        std::fs::read(snapshot.join("model.safetensors")).unwrap(),
        weights
    );
    assert!(snapshot.join("config.json").is_file());
    assert!(repo_dir.join("blobs").join(sha256_hex(&weights)).is_file());
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        COMMIT
    );

    // `fovea models` lists it with its source.
    let out = env.fovea(&["models", "--json"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let m = &listed["store"][0]["manifest"];
    assert_eq!(m["name"], "resnet50.tiny_in64");
    assert_eq!(m["source"]["location"], format!("hf:{REPO}@{COMMIT}"));
    assert_eq!(m["source"]["sha256"], sha256_hex(&weights));
    assert_eq!(m["labels"][5], "thing-5");
    assert_eq!(m["preprocess"]["crop"]["width"], 80);

    // ... and `fovea classify` runs it with the hub's labels.
    let chelsea = image("chelsea.png");
    let out = env.fovea(
        &[
            "classify",
            "--model",
            "resnet50.tiny_in64",
            "--json",
            "--top-k",
            "3",
            chelsea.to_str().unwrap(),
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let classified: Value = serde_json::from_slice(&out.stdout).unwrap();
    let predictions = classified["results"][0]["predictions"].as_array().unwrap();
    assert_eq!(predictions.len(), 3);
    for p in predictions {
        let id = p["class_id"].as_u64().unwrap();
        assert_eq!(p["label"], format!("thing-{id}"));
    }

    // A second pull, under another name, comes from the cache.
    let out = env.fovea(
        &["pull", &format!("{spec}@main"), "--name", "again"],
        Some(TOKEN),
    );
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("model.safetensors (cached)"), "{stderr}");
    assert_eq!(hub.storage_gets(REPO, "model.safetensors").len(), 2);
}

#[test]
fn pull_from_a_url_with_its_sha256() {
    let weights = std::fs::read(
        repo_root().join("model-core/tests/fixtures/models/timm_resnet50_tiny/model.safetensors"),
    )
    .unwrap();
    let hub = StandinHub::start();
    let url = hub.add_plain("tiny-resnet.safetensors", &weights);
    let dir = tempfile::tempdir().unwrap();
    let env = Env {
        hub: &hub,
        dir: dir.path(),
    };
    let out = env.fovea(&["pull", &url], None);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--sha256"),
        "{}",
        text(&out.stderr)
    );

    let wrong = sha256_hex(b"not these weights");
    let out = env.fovea(&["pull", &url, "--sha256", &wrong], None);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("checksum mismatch"),
        "{}",
        text(&out.stderr)
    );

    let pinned = format!("{url}#sha256={}", sha256_hex(&weights));
    let out = env.fovea(&["pull", &pinned, "--name", "tiny-url"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = env.fovea(&["models", "--json"], None);
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let m = &listed["store"][0]["manifest"];
    assert_eq!(
        (m["name"].as_str(), m["arch"].as_str()),
        (Some("tiny-url"), Some("resnet50"))
    );
    assert_eq!(m["source"]["location"], url);
}

#[test]
fn pull_a_detr_detector_and_detect_with_its_labels() {
    let weights = std::fs::read(
        repo_root().join("model-core/tests/fixtures/models/detr_tiny/model.safetensors"),
    )
    .unwrap();
    // 91 COCO-style ids with gaps, as facebook/detr-resnet-50's id2label.
    let id2label: serde_json::Map<String, Value> = (0..91)
        .filter(|i| i % 10 != 5)
        .map(|i| (i.to_string(), json!(format!("obj-{i}"))))
        .collect();
    let config = serde_json::to_vec(&json!({
        "architectures": ["DetrForObjectDetection"], "model_type": "detr",
        "backbone": "resnet50", "use_timm_backbone": true, "id2label": id2label
    }))
    .unwrap();
    let hub = StandinHub::start();
    let repo = "facebook/detr-tiny";
    hub.add_repo(
        repo,
        COMMIT,
        &[
            ("config.json", &config, false),
            ("model.safetensors", &weights, true),
            (
                "preprocessor_config.json",
                br#"{"image_processor_type": "DetrImageProcessor", "size": {"shortest_edge": 800, "longest_edge": 1333}}"#,
                false,
            ),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let env = Env {
        hub: &hub,
        dir: dir.path(),
    };
    let out = env.fovea(&["pull", &format!("hf:{repo}")], None);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("license: unknown"), "{stderr}");
    let out = env.fovea(&["models", "--json"], None);
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let m = &listed["store"][0]["manifest"];
    assert_eq!(
        (m["task"].as_str(), m["arch"].as_str()),
        (Some("detection"), Some("detr_resnet50"))
    );
    assert_eq!(m["num_classes"], 91);
    assert_eq!(
        (m["labels"][0].as_str(), m["labels"][5].as_str()),
        (Some("obj-0"), Some("N/A"))
    );

    let photo = image("grace_hopper.jpg");
    let out = env.fovea(
        &[
            "detect",
            "--model",
            "detr-tiny",
            "--json",
            "--confidence",
            "0.01",
            photo.to_str().unwrap(),
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let found: Value = serde_json::from_slice(&out.stdout).unwrap();
    for d in found["results"][0]["detections"].as_array().unwrap() {
        let label = d["label"].as_str().unwrap();
        assert!(label == "N/A" || label.starts_with("obj-"), "{d}");
    }
}
