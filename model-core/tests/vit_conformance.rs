//! Conformance of the ViT classifier with transformers' `ViTForImageClassification`
//! and timm's `VisionTransformer`, on the tiny fixtures in
//! `tests/fixtures/models/` (see `make_vit_fixtures.py`): logits at the
//! trained resolution and at a non-square other one (position embeddings
//! resampled), and, when `FOVEA_FULL_FIXTURES` points at them, ViT-Base/16.

mod common;

use common::rel_diff;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor};
use fovea_model_core::classifier::{Classifier, ModelError};

struct Fixture {
    weights: HashMap<String, Tensor>,
    pixel_values: Tensor,
    logits: Tensor,
    logits_f64: Tensor,
    arch: Option<String>,
    layout: String,
    tolerance: f32,
}

impl Fixture {
    fn load(dir: &Path) -> Result<Self> {
        let cpu = Device::Cpu;
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
        let mut golden = candle_core::safetensors::load(dir.join("golden.safetensors"), &cpu)?;
        let mut take = |k: &str| golden.remove(k).with_context(|| format!("{k} in {dir:?}"));
        Ok(Self {
            pixel_values: take("pixel_values")?,
            logits: take("logits")?,
            logits_f64: take("logits_f64")?,
            weights: candle_core::safetensors::load(dir.join("model.safetensors"), &cpu)?,
            arch: config["arch"].as_str().map(str::to_string),
            layout: config["layout"].as_str().unwrap_or_default().to_string(),
            tolerance: config["tolerance_rel"].as_f64().unwrap_or(1e-4) as f32,
        })
    }

    fn classifier(&self) -> Result<Classifier, ModelError> {
        Classifier::load(
            self.weights.clone(),
            self.arch.as_deref(),
            &Device::Cpu,
            DType::F32,
        )
    }

    /// Loads, checks what the classifier says it is, runs, compares.
    fn check(&self, name: &str) -> Result<f32> {
        let model = self.classifier()?;
        let info = model.info();
        assert_eq!(info.family, "vit", "{name}");
        assert_eq!(info.layout, self.layout, "{name}");
        assert_eq!(info.num_classes, self.logits.dim(1)?, "{name}");
        let got = model.forward(&self.pixel_values)?;
        assert_eq!(got.dims(), self.logits.dims(), "{name}");
        let rel = rel_diff(&got, &self.logits)?;
        println!(
            "{name:36} {:24} {:>3}px {rel:>10.2e} (ours vs f64 {:.2e}, torch vs f64 {:.2e})",
            info.variant,
            info.default_input_size,
            rel_diff(&got, &self.logits_f64)?,
            rel_diff(&self.logits, &self.logits_f64)?,
        );
        Ok(rel)
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

const SMALL: [&str; 4] = [
    "hf_vit_tiny",
    "timm_vit_tiny",
    "hf_vit_tiny_96x80",
    "timm_vit_tiny_96x80",
];

#[test]
fn tiny_vits_match_the_references() -> Result<()> {
    let mut failures = Vec::new();
    for name in SMALL {
        let f = small(name);
        let rel = f.check(name)?;
        assert_eq!(f.classifier()?.info().default_input_size, 64, "{name}");
        if rel > f.tolerance || rel.is_nan() {
            failures.push(format!("{name}: {rel:.3e}"));
        }
    }
    assert!(failures.is_empty(), "over tolerance: {failures:?}");
    Ok(())
}

/// One model serves several resolutions in turn (the resampled position
/// embeddings are cached per grid and do not leak into other sizes), and a
/// batch's rows do not influence each other.
#[test]
fn resolutions_and_batch_rows_are_independent() -> Result<()> {
    for layout in ["hf", "timm"] {
        let native = small(&format!("{layout}_vit_tiny"));
        let other = small(&format!("{layout}_vit_tiny_96x80"));
        let model = native.classifier()?;
        for f in [&native, &other, &native] {
            let got = model.forward(&f.pixel_values)?;
            assert!(rel_diff(&got, &f.logits)? <= 1e-4, "{layout}");
            for row in 0..f.pixel_values.dim(0)? {
                let single = model.forward(&f.pixel_values.narrow(0, row, 1)?)?;
                let rel = rel_diff(&single, &got.i(row..row + 1)?)?;
                assert!(rel <= 1e-5, "{layout} row {row}: {rel:e}");
            }
        }
    }
    Ok(())
}

/// Broken checkpoints are errors that say what is wrong, never panics.
#[test]
fn bad_vit_weights_are_clear_errors() -> Result<()> {
    let f = small("timm_vit_tiny");
    let load = |w: HashMap<String, Tensor>, arch: Option<&str>| {
        Classifier::load(w, arch, &Device::Cpu, DType::F32)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    // A missing and a misshapen tensor: both named, with the layout.
    let mut w = f.weights.clone();
    w.remove("blocks.1.mlp.fc2.bias");
    w.insert(
        "blocks.0.attn.proj.weight".into(),
        Tensor::zeros((48, 47), DType::F32, &Device::Cpu)?,
    );
    let err = load(w, f.arch.as_deref());
    assert!(err.contains("blocks.1.mlp.fc2.bias"), "{err}");
    assert!(err.contains("blocks.0.attn.proj.weight"), "{err}");
    // Position embeddings that are not a square grid.
    let mut w = f.weights.clone();
    w.insert(
        "pos_embed".into(),
        Tensor::zeros((1, 19, 48), DType::F32, &Device::Cpu)?,
    );
    let err = load(w, f.arch.as_deref());
    assert!(err.contains("pos_embed"), "{err}");
    // A custom width without a name: the heads cannot be known.
    let err = load(f.weights.clone(), None);
    assert!(err.contains("name the architecture"), "{err}");
    // The wrong family or patch size asked for.
    let err = load(f.weights.clone(), Some("resnet50"));
    assert!(err.contains("ViT"), "{err}");
    let err = load(f.weights.clone(), Some("vit_tiny_patch32_224"));
    assert!(err.contains("16x16"), "{err}");
    // An unexpected extra key in the Hugging Face layout.
    let hf = small("hf_vit_tiny");
    let mut w = hf.weights.clone();
    w.insert(
        "vit.pooler.dense.weight".into(),
        Tensor::zeros((48, 48), DType::F32, &Device::Cpu)?,
    );
    let err = load(w, hf.arch.as_deref());
    assert!(err.contains("vit.pooler.dense.weight"), "{err}");
    // An input smaller than one patch is an error, not a panic.
    let model = f.classifier()?;
    assert!(model
        .forward(&Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu)?)
        .is_err());
    Ok(())
}

/// Full-size ViT-Base/16 in both layouts, from
/// `make_vit_fixtures.py --full $FOVEA_FULL_FIXTURES`.
#[test]
fn full_size_vits_match_the_references() -> Result<()> {
    let Ok(root) = std::env::var("FOVEA_FULL_FIXTURES") else {
        println!("note: FOVEA_FULL_FIXTURES is not set; skipping the full-size checks");
        return Ok(());
    };
    for name in ["timm_vit_base_patch16_224", "hf_vit_base_patch16_224"] {
        let dir = Path::new(&root).join(name);
        if !dir.exists() {
            println!("note: {dir:?} not found; skipped");
            continue;
        }
        let f = Fixture::load(&dir)?;
        let rel = f.check(name)?;
        let info = f.classifier()?.info().clone();
        assert_eq!(info.variant, "vit_base_patch16_224");
        assert_eq!(info.default_input_size, 224);
        assert!(rel <= f.tolerance, "{name}: {rel:e}");
    }
    Ok(())
}
