//! Conformance of the ResNet and EfficientNet classifiers with their PyTorch
//! references (torchvision, timm, efficientnet_lite_pytorch), on the tiny
//! fixtures in `tests/fixtures/models/` (see `make_model_fixtures.py`) and,
//! when `FOVEA_FULL_FIXTURES` points at them, on full-size models and the
//! real EfficientNet-Lite0 weights.

mod common;

use common::rel_diff;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor};
use fovea_model_core::classifier::{detect_architecture, Classifier, ModelError};

fn top5(logits: &Tensor) -> Result<Vec<Vec<u32>>> {
    let sorted = logits.to_dtype(DType::F32)?.arg_sort_last_dim(false)?;
    Ok(sorted.narrow(1, 0, 5)?.to_vec2::<u32>()?)
}

struct Fixture {
    name: String,
    weights: HashMap<String, Tensor>,
    pixel_values: Tensor,
    logits: Tensor,
    /// The reference run in f64, when the fixture has it.
    logits_f64: Option<Tensor>,
    arch: Option<String>,
    tolerance: f32,
}

impl Fixture {
    fn load(dir: &Path) -> Result<Self> {
        let cpu = Device::Cpu;
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
        let mut golden = candle_core::safetensors::load(dir.join("golden.safetensors"), &cpu)?;
        let take = |g: &mut HashMap<String, Tensor>, k: &str| {
            g.remove(k).with_context(|| format!("{k} in {dir:?}"))
        };
        Ok(Self {
            name: dir.file_name().unwrap().to_string_lossy().into_owned(),
            weights: candle_core::safetensors::load(dir.join("model.safetensors"), &cpu)?,
            pixel_values: take(&mut golden, "pixel_values")?,
            logits: take(&mut golden, "logits")?,
            logits_f64: golden.remove("logits_f64"),
            arch: config["arch"].as_str().map(str::to_string),
            tolerance: config["tolerance_rel"].as_f64().unwrap_or(1e-4) as f32,
        })
    }

    /// How far our logits and the f32 reference's are from the f64 reference
    /// (NaN without one): tells an implementation error from f32 rounding.
    fn f64_diffs(&self, ours: &Tensor) -> Result<(f32, f32)> {
        match &self.logits_f64 {
            Some(exact) => Ok((rel_diff(ours, exact)?, rel_diff(&self.logits, exact)?)),
            None => Ok((f32::NAN, f32::NAN)),
        }
    }

    fn classifier(&self) -> Result<Classifier> {
        Ok(Classifier::load(
            self.weights.clone(),
            self.arch.as_deref(),
            &Device::Cpu,
            DType::F32,
        )?)
    }
}

fn small_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

fn small(name: &str) -> Fixture {
    Fixture::load(&small_dir(name)).unwrap_or_else(|e| panic!("fixture {name}: {e:#}"))
}

/// Every committed fixture, with what the classifier should say it is:
/// (fixture, family, variant, layout).
const SMALL_FIXTURES: [(&str, &str, &str, &str); 8] = [
    (
        "tv_resnet_bottleneck_tiny",
        "resnet",
        "resnet50",
        "torchvision/timm",
    ),
    (
        "tv_resnet_basic_tiny",
        "resnet",
        "resnet18",
        "torchvision/timm",
    ),
    (
        "timm_resnet50_tiny",
        "resnet",
        "resnet50",
        "torchvision/timm",
    ),
    (
        "timm_efficientnet_b0_tiny",
        "efficientnet",
        "efficientnet_b0",
        "timm",
    ),
    (
        "timm_tf_efficientnet_b0_tiny",
        "efficientnet",
        "tf_efficientnet_b0",
        "timm",
    ),
    (
        "timm_tf_efficientnet_lite0_tiny",
        "efficientnet",
        "tf_efficientnet_lite-custom",
        "timm",
    ),
    (
        "lukemelas_lite0_tiny",
        "efficientnet",
        "tf_efficientnet_lite-custom",
        "lukemelas",
    ),
    (
        "lukemelas_b0_tiny",
        "efficientnet",
        "tf_efficientnet_b-custom",
        "lukemelas",
    ),
];

#[test]
fn tiny_models_match_pytorch() -> Result<()> {
    let mut failures = Vec::new();
    println!(
        "{:34} {:30} {:>10} {:>10} {:>12} {:>12}",
        "fixture", "variant", "rel diff", "tolerance", "ours vs f64", "torch vs f64"
    );
    for (name, family, variant, layout) in SMALL_FIXTURES {
        let f = small(name);
        let model = f.classifier()?;
        let info = model.info();
        assert_eq!(
            (info.family, info.variant.as_str(), info.layout),
            (family, variant, layout),
            "{name}"
        );
        assert_eq!(info.num_classes, f.logits.dim(1)?, "{name}");
        let got = model.forward(&f.pixel_values)?;
        assert_eq!(got.dims(), f.logits.dims(), "{name}");
        let rel = rel_diff(&got, &f.logits)?;
        let (ours64, torch64) = f.f64_diffs(&got)?;
        println!(
            "{:34} {:30} {rel:>10.2e} {:>10.0e} {ours64:>12.2e} {torch64:>12.2e}",
            f.name, info.variant, f.tolerance
        );
        if rel > f.tolerance || rel.is_nan() {
            failures.push(format!("{name}: {rel:.3e}"));
        }
    }
    assert!(failures.is_empty(), "over tolerance: {failures:?}");
    Ok(())
}

/// A batch's rows do not influence each other.
#[test]
fn batch_rows_are_independent() -> Result<()> {
    for name in ["tv_resnet_bottleneck_tiny", "timm_efficientnet_b0_tiny"] {
        let f = small(name);
        let model = f.classifier()?;
        assert_eq!(f.pixel_values.dim(0)?, 3);
        let batch = model.forward(&f.pixel_values)?;
        for row in 0..3 {
            let single = model.forward(&f.pixel_values.narrow(0, row, 1)?)?;
            let rel = rel_diff(&single, &batch.i(row..row + 1)?)?;
            assert!(
                rel <= 1e-5,
                "{name} row {row}: batch of 1 differs by {rel:e}"
            );
        }
    }
    Ok(())
}

/// A broken checkpoint is reported with every problem at once and the layout.
fn assert_reports_all(
    name: &str,
    remove: &str,
    add: &str,
    reshape: (&str, &[usize]),
) -> Result<()> {
    let f = small(name);
    let mut weights = f.weights.clone();
    assert!(weights.remove(remove).is_some(), "{remove} not in {name}");
    weights.insert(add.to_string(), Tensor::zeros(4, DType::F32, &Device::Cpu)?);
    assert!(
        weights.contains_key(reshape.0),
        "{} not in {name}",
        reshape.0
    );
    weights.insert(
        reshape.0.to_string(),
        Tensor::zeros(reshape.1, DType::F32, &Device::Cpu)?,
    );
    let err = Classifier::load(weights, f.arch.as_deref(), &Device::Cpu, DType::F32).unwrap_err();
    let ModelError::WeightsMismatch(m) = &err else {
        panic!("{name}: expected a weights mismatch, got {err}");
    };
    assert_eq!(m.missing, vec![remove.to_string()], "{name}");
    assert_eq!(m.unexpected, vec![add.to_string()], "{name}");
    assert_eq!(m.mismatched.len(), 1, "{name}");
    assert_eq!(
        (m.mismatched[0].0.as_str(), m.mismatched[0].2.as_slice()),
        reshape,
        "{name}"
    );
    let text = err.to_string();
    for needle in [remove, add, reshape.0, &m.layout] {
        assert!(text.contains(needle), "`{needle}` not in: {text}");
    }
    println!("{text}");
    Ok(())
}

#[test]
fn mismatched_weights_are_reported_together() -> Result<()> {
    assert_reports_all(
        "tv_resnet_bottleneck_tiny",
        "layer2.0.downsample.1.running_mean",
        "layer5.0.conv1.weight",
        ("layer3.0.conv2.weight", &[16, 16, 5, 5]),
    )?;
    assert_reports_all(
        "timm_tf_efficientnet_b0_tiny",
        "blocks.1.0.bn2.running_var",
        "blocks.1.0.extra.weight",
        ("blocks.3.0.se.conv_expand.bias", &[3]),
    )?;
    assert_reports_all(
        "lukemelas_lite0_tiny",
        "_blocks.2._bn0.weight",
        "_fc.extra",
        ("_conv_head.weight", &[1280, 80, 3, 3]),
    )?;
    Ok(())
}

/// Keys that detection reads first may be missing too: they are reported
/// as missing (widths come from the batch norm next to them).
#[test]
fn missing_detection_keys_are_reported() -> Result<()> {
    for (name, key) in [
        ("tv_resnet_basic_tiny", "layer1.0.conv1.weight"),
        ("timm_efficientnet_b0_tiny", "blocks.2.0.conv_pwl.weight"),
        ("lukemelas_lite0_tiny", "_conv_stem.weight"),
    ] {
        let f = small(name);
        let mut weights = f.weights.clone();
        weights.remove(key);
        match Classifier::load(weights, f.arch.as_deref(), &Device::Cpu, DType::F32) {
            Err(ModelError::WeightsMismatch(m)) => {
                assert_eq!(m.missing, vec![key.to_string()], "{name}");
                assert!(
                    m.unexpected.is_empty() && m.mismatched.is_empty(),
                    "{name}: {m}"
                );
            }
            other => panic!(
                "{name} without {key}: {:?}",
                other.map(|c| c.info().clone())
            ),
        }
    }
    Ok(())
}

#[test]
fn architecture_names_are_checked() -> Result<()> {
    let basic = small("tv_resnet_basic_tiny");
    let load = |w: &HashMap<String, Tensor>, arch: &str| {
        Classifier::load(w.clone(), Some(arch), &Device::Cpu, DType::F32)
    };
    assert!(matches!(
        load(&basic.weights, "resnet50"),
        Err(ModelError::ArchMismatch { .. })
    ));
    assert!(matches!(
        load(&basic.weights, "efficientnet_b0"),
        Err(ModelError::ArchMismatch { .. })
    ));
    let err = load(&basic.weights, "resnet51").unwrap_err();
    assert!(matches!(err, ModelError::UnknownArch { .. }) && err.to_string().contains("resnet51"));
    assert_eq!(
        load(&basic.weights, "timm/resnet18.a1_in1k")?
            .info()
            .variant,
        "resnet18"
    );

    // timm keys cannot tell tf_ from plain: the name decides, and the numbers differ.
    let tf = small("timm_tf_efficientnet_b0_tiny");
    let plain = load(&tf.weights, "efficientnet_b0")?;
    assert!(rel_diff(&plain.forward(&tf.pixel_values)?, &tf.logits)? > 1e-3);
    let lite = small("timm_tf_efficientnet_lite0_tiny");
    let model = load(&lite.weights, "tf_efficientnet_lite0")?;
    assert_eq!(model.info().variant, "tf_efficientnet_lite0");
    assert!(rel_diff(&model.forward(&lite.pixel_values)?, &lite.logits)? <= 1e-4);

    let shapes = basic
        .weights
        .iter()
        .map(|(k, t)| (k.clone(), t.dims().to_vec()))
        .collect();
    let detected = detect_architecture(&shapes, None)?;
    assert_eq!(
        (
            detected.family,
            detected.variant.as_str(),
            detected.num_classes
        ),
        ("resnet", "resnet18", 50)
    );
    let mut bad = shapes.clone();
    bad.retain(|k, _| !k.starts_with("layer"));
    let err = detect_architecture(&bad, None).unwrap_err().to_string();
    assert!(err.contains("conv1.weight"), "{err}");
    Ok(())
}

/// Lower precision runs and stays close (f16 on the CPU).
#[test]
fn half_precision_runs() -> Result<()> {
    for name in ["timm_resnet50_tiny", "lukemelas_lite0_tiny"] {
        let f = small(name);
        let model = Classifier::load(f.weights.clone(), None, &Device::Cpu, DType::F16)?;
        let got = model.forward(&f.pixel_values)?;
        assert_eq!(got.dtype(), DType::F16);
        let rel = rel_diff(&got, &f.logits)?;
        println!("{name} f16: rel diff {rel:.2e}");
        // f16 activations through ~50 layers of random weights: a smoke
        // test that the half-precision path runs and stays in the ballpark.
        assert!(rel < 0.1, "{name}: f16 rel diff {rel}");
    }
    Ok(())
}

/// Any input size works (global pooling); the output keeps the batch.
#[test]
fn odd_input_sizes() -> Result<()> {
    for name in [
        "tv_resnet_basic_tiny",
        "timm_tf_efficientnet_b0_tiny",
        "lukemelas_b0_tiny",
    ] {
        let model = small(name).classifier()?;
        for (h, w) in [(33, 47), (64, 64), (101, 75)] {
            let x = Tensor::randn(0f32, 1., (2, 3, h, w), &Device::Cpu)?;
            assert_eq!(
                model.forward(&x)?.dims(),
                &[2, model.info().num_classes],
                "{name} {h}x{w}"
            );
        }
    }
    Ok(())
}

#[test]
fn classifier_is_shareable_across_threads() {
    fn check<T: Send + Sync>() {}
    check::<Classifier>();
}

/// Full-size models, from `make_model_fixtures.py --full $FOVEA_FULL_FIXTURES`.
#[test]
fn full_size_models_match_pytorch() -> Result<()> {
    let Ok(root) = std::env::var("FOVEA_FULL_FIXTURES") else {
        println!("note: FOVEA_FULL_FIXTURES is not set; skipping the full-size checks");
        return Ok(());
    };
    for name in ["torchvision_resnet50", "timm_efficientnet_b0", "lite0_real"] {
        let dir = Path::new(&root).join(name);
        if !dir.exists() {
            println!("note: {dir:?} not found; skipped");
            continue;
        }
        let f = Fixture::load(&dir)?;
        let model = f.classifier()?;
        let got = model.forward(&f.pixel_values)?;
        let rel = rel_diff(&got, &f.logits)?;
        let (ours, theirs) = (top5(&got)?, top5(&f.logits)?);
        let (ours64, torch64) = f.f64_diffs(&got)?;
        println!(
            "{name:22} {:24} rel diff {rel:.2e} (vs f64: ours {ours64:.2e}, torch {torch64:.2e})  top-5 {ours:?}",
            model.info().variant
        );
        assert!(rel <= f.tolerance, "{name}: rel diff {rel:e}");
        assert_eq!(ours, theirs, "{name}: top-5 differs");
    }
    Ok(())
}
