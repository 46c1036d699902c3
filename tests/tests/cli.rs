//! The command line: `fovea run` reproduces the PyTorch reference from the
//! outside, `import`, `models` and `pull` behave as documented.

mod common;

use std::process::Command;

use common::{fovea_bin, repo_root};

fn fovea(args: &[&str], home: &std::path::Path) -> std::process::Output {
    Command::new(fovea_bin())
        .args(args)
        .env("FOVEA_HOME", home)
        .output()
        .expect("run fovea")
}

/// Read a safetensors file's f32 tensor with Python-free, dependency-free
/// parsing: the header is JSON, the data little-endian.
/// The JSON header of a safetensors file and where its data starts.
fn read_header(bytes: &[u8]) -> (serde_json::Value, usize) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (serde_json::from_slice(&bytes[8..8 + n]).unwrap(), 8 + n)
}

fn read_f32(path: &std::path::Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let (header, start) = read_header(&bytes);
    let info = &header[name];
    assert_eq!(info["dtype"], "F32", "{name} in {}", path.display());
    let shape = info["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    let offsets = info["data_offsets"].as_array().unwrap();
    let (a, b) = (
        offsets[0].as_u64().unwrap() as usize,
        offsets[1].as_u64().unwrap() as usize,
    );
    let data = bytes[start + a..start + b]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (shape, data)
}

/// `fovea run --model MODEL --input INPUT --output OUT`, which must succeed.
fn fovea_run(model: &str, input: &std::path::Path, out: &std::path::Path, home: &std::path::Path) {
    let (input, out) = (input.to_str().unwrap(), out.to_str().unwrap());
    let result = fovea(
        &["run", "--model", model, "--input", input, "--output", out],
        home,
    );
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
}

/// (max |got - want|, max |want|).
fn max_diff(got: &[f32], want: &[f32]) -> (f32, f32) {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    (diff, scale)
}

#[test]
fn run_reproduces_the_pytorch_reference() {
    let fixtures = repo_root().join("model-core/tests/fixtures/models");
    let tmp = tempfile_dir();
    for (fixture, arch) in [
        ("tv_resnet_bottleneck_tiny", "resnet50"),
        ("timm_tf_efficientnet_lite0_tiny", "tf_efficientnet_lite0"),
    ] {
        let dir = fixtures.join(fixture);
        let golden = dir.join("golden.safetensors");
        let out = tmp.join(format!("{fixture}.out.safetensors"));
        let spec = format!("{arch}:{}", dir.join("model.safetensors").display());
        fovea_run(&spec, &golden, &out, &tmp);
        let (shape, got) = read_f32(&out, "logits");
        let (ref_shape, want) = read_f32(&golden, "logits");
        assert_eq!(shape, ref_shape);
        let (diff, scale) = max_diff(&got, &want);
        assert!(
            diff <= 1e-4 * scale,
            "{fixture}: max diff {diff} vs scale {scale}"
        );
    }
}

/// DETR takes `pixel_values` and `pixel_mask` and gives `logits` and
/// `pred_boxes`: the transformers reference on a padded batch of two images
/// of different sizes.
#[test]
fn run_reproduces_detr_with_its_pixel_mask() {
    let tmp = tempfile_dir();
    let dir = repo_root().join("model-core/tests/fixtures/models/detr_tiny");
    let golden = dir.join("golden.safetensors");
    let out = tmp.join("detr_tiny.out.safetensors");
    fovea_run(
        dir.join("model.safetensors").to_str().unwrap(),
        &golden,
        &out,
        &tmp,
    );
    for name in ["logits", "pred_boxes"] {
        let (shape, got) = read_f32(&out, name);
        let (ref_shape, want) = read_f32(&golden, name);
        assert_eq!(shape, ref_shape, "{name}");
        let (diff, scale) = max_diff(&got, &want);
        assert!(
            diff <= 1e-4 * scale,
            "{name}: max diff {diff} vs scale {scale}"
        );
    }
}

/// An Ultralytics checkpoint in, the raw detector output out: `fovea import`
/// then `fovea run` reproduce Ultralytics' `model(x)[0]`.
#[test]
fn import_and_run_reproduce_ultralytics_yolov8() {
    let tmp = tempfile_dir();
    let dir = repo_root().join("model-core/tests/fixtures/models/yolov8_tiny");
    let weights = tmp.join("yolov8_tiny.safetensors");
    let result = fovea(
        &[
            "import",
            dir.join("model.pt").to_str().unwrap(),
            weights.to_str().unwrap(),
        ],
        &tmp,
    );
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    assert!(String::from_utf8_lossy(&result.stdout).contains("pickled module"));

    let golden = dir.join("golden.safetensors");
    let out = tmp.join("yolov8_tiny.out.safetensors");
    fovea_run(weights.to_str().unwrap(), &golden, &out, &tmp);
    let (shape, got) = read_f32(&out, "output");
    let (ref_shape, want) = read_f32(&golden, "output");
    assert_eq!(shape, ref_shape);
    // Rows 0..4 are boxes in input pixels, the rest scores in 0..1: each
    // within 1e-4 of its own scale.
    let anchors = shape[2];
    let rows = shape[0] * shape[1];
    let (mut box_diff, mut box_scale, mut score_diff) = (0f32, 0f32, 0f32);
    for r in 0..rows {
        let is_box = r % shape[1] < 4;
        for a in 0..anchors {
            let (g, w) = (got[r * anchors + a], want[r * anchors + a]);
            if is_box {
                box_diff = box_diff.max((g - w).abs());
                box_scale = box_scale.max(w.abs());
            } else {
                score_diff = score_diff.max((g - w).abs());
            }
        }
    }
    assert!(
        box_diff <= 1e-4 * box_scale,
        "boxes: {box_diff} of {box_scale}"
    );
    assert!(score_diff <= 1e-4, "scores: {score_diff}");
}

#[test]
fn models_lists_the_catalog_and_pull_refuses_unknown_names() {
    let tmp = tempfile_dir();
    let out = fovea(&["models", "--json"], &tmp);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["catalog"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["name"] == "efficientnet-lite0"));
    assert_eq!(v["store"].as_array().unwrap().len(), 0);

    let out = fovea(&["pull", "no-such-model"], &tmp);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown model"));
}

#[test]
fn serve_refuses_a_device_this_build_lacks() {
    let tmp = tempfile_dir();
    let out = fovea(
        &["serve", "--device", "cuda:0", "--http-addr", "127.0.0.1:0"],
        &tmp,
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cuda"));
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "fovea-cli-test-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

#[test]
fn import_converts_a_pickled_module_and_ignores_a_hostile_payload() {
    let tmp = tempfile_dir();
    let fixtures = repo_root().join("weights/tests/fixtures");
    // A whole pickled nn.Module in fp16 inside a dict, as Ultralytics saves them.
    let out = tmp.join("module.safetensors");
    let result = fovea(
        &[
            "import",
            fixtures.join("module_zip.pt").to_str().unwrap(),
            out.to_str().unwrap(),
        ],
        &tmp,
    );
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let (header, _) = read_header(&std::fs::read(&out).unwrap());
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures.join("module_expected.json")).unwrap())
            .unwrap();
    let keys = expected["keys"].as_array().expect("expected key list");
    assert!(!keys.is_empty());
    for key in keys {
        let key = key.as_str().unwrap();
        assert!(header.get(key).is_some(), "{key} missing from the import");
    }

    // A checkpoint whose pickle calls os.system, eval and Popen next to two
    // real tensors: the tensors are imported, the calls stay inert data.
    let markers = ["os_system", "eval", "popen"].map(|m| format!("/tmp/fovea_pwned_4c1e_{m}"));
    for m in &markers {
        let _ = std::fs::remove_file(m);
    }
    let out = tmp.join("hostile.safetensors");
    let result = fovea(
        &[
            "import",
            fixtures.join("hostile_zip.pt").to_str().unwrap(),
            out.to_str().unwrap(),
        ],
        &tmp,
    );
    for m in &markers {
        assert!(!std::path::Path::new(m).exists(), "{m}: the payload ran");
    }
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let (header, _) = read_header(&std::fs::read(&out).unwrap());
    assert!(
        header.get("weight").is_some() && header.get("bias").is_some(),
        "{header}"
    );
}
