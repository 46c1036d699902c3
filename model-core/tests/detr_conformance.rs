//! Conformance of DETR with transformers' `DetrForObjectDetection` on the
//! tiny fixture in `tests/fixtures/models/detr_tiny` (see
//! `make_detr_fixtures.py`): a padded batch of two images of different
//! sizes with its `pixel_mask` (the reference's own batching), each image
//! alone, and the serving path that keeps images independent of their
//! batchmates. With `FOVEA_FULL_FIXTURES`, full-size DETR-R50 and R101.

mod common;

use common::rel_diff;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use fovea_model_core::detr::Detr;
use fovea_model_core::model_error::ModelError;

struct Fixture {
    weights: HashMap<String, Tensor>,
    golden: HashMap<String, Tensor>,
    tolerance: f32,
    images: usize,
}

impl Fixture {
    fn load(dir: &Path) -> Result<Self> {
        let cpu = Device::Cpu;
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
        Ok(Self {
            weights: candle_core::safetensors::load(dir.join("model.safetensors"), &cpu)?,
            golden: candle_core::safetensors::load(dir.join("golden.safetensors"), &cpu)?,
            tolerance: config["tolerance_rel"].as_f64().unwrap_or(1e-4) as f32,
            images: config["image_shapes"].as_array().map_or(0, Vec::len),
        })
    }

    fn get(&self, key: &str) -> Result<&Tensor> {
        self.golden
            .get(key)
            .with_context(|| format!("{key} in golden"))
    }

    fn model(&self, dtype: DType) -> Result<Detr, ModelError> {
        Detr::load(self.weights.clone(), None, &Device::Cpu, dtype)
    }

    /// (logits, boxes) relative differences of `got` against the golden pair `prefix`.
    fn compare(&self, got: &(Tensor, Tensor), logits: &str, boxes: &str) -> Result<(f32, f32)> {
        let (want_l, want_b) = (self.get(logits)?, self.get(boxes)?);
        assert_eq!(got.0.dims(), want_l.dims(), "{logits}");
        assert_eq!(got.1.dims(), want_b.dims(), "{boxes}");
        Ok((rel_diff(&got.0, want_l)?, rel_diff(&got.1, want_b)?))
    }

    /// The reference's padded batch, each image alone, and the independent
    /// serving path; returns the worst difference.
    fn check(&self, name: &str) -> Result<f32> {
        let model = self.model(DType::F32)?;
        let info = model.info();
        assert_eq!(info.num_classes + 1, self.get("logits")?.dim(2)?, "{name}");
        let mut worst = 0f32;
        let mut report = |what: &str, (l, b): (f32, f32)| {
            println!(
                "{name:16} {:16} {what:32} logits {l:.2e}  boxes {b:.2e}",
                info.variant
            );
            worst = worst.max(l).max(b);
        };

        let padded = model.forward(self.get("pixel_values")?, self.get("pixel_mask")?)?;
        report(
            "padded batch + pixel_mask",
            self.compare(&padded, "logits", "pred_boxes")?,
        );

        let images: Vec<Tensor> = (0..self.images)
            .map(|i| self.get(&format!("image{i}")).cloned())
            .collect::<Result<_>>()?;
        for (i, image) in images.iter().enumerate() {
            let (h, w) = (image.dim(1)?, image.dim(2)?);
            let mask = Tensor::ones((1, h, w), DType::U8, &Device::Cpu)?;
            let (l, b) = model.forward(&image.unsqueeze(0)?, &mask)?;
            let alone = (l.squeeze(0)?, b.squeeze(0)?);
            let keys = (format!("image{i}_logits"), format!("image{i}_pred_boxes"));
            report(
                &format!("image {i} alone"),
                self.compare(&alone, &keys.0, &keys.1)?,
            );
        }

        // Served together (forward_images), each image must give its result alone.
        let (l, b) = model.forward_images(&images)?;
        for i in 0..self.images {
            let got = (l.get(i)?, b.get(i)?);
            let keys = (format!("image{i}_logits"), format!("image{i}_pred_boxes"));
            report(
                &format!("image {i} in forward_images"),
                self.compare(&got, &keys.0, &keys.1)?,
            );
        }
        Ok(worst)
    }
}

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

#[test]
fn tiny_detr_matches_transformers() -> Result<()> {
    let fixture = Fixture::load(&fixture_dir("detr_tiny"))?;
    let worst = fixture.check("detr_tiny")?;
    assert!(
        worst < fixture.tolerance,
        "worst relative difference {worst:.2e}"
    );
    Ok(())
}

#[test]
fn the_mask_changes_the_answer() -> Result<()> {
    // A test that the mask is used at all: the padded batch without its mask
    // (all ones) must differ from the reference for the smaller image.
    let fixture = Fixture::load(&fixture_dir("detr_tiny"))?;
    let model = fixture.model(DType::F32)?;
    let values = fixture.get("pixel_values")?;
    let ones = Tensor::ones(fixture.get("pixel_mask")?.dims(), DType::U8, &Device::Cpu)?;
    let unmasked = model.forward(values, &ones)?;
    let (l, _) = fixture.compare(&unmasked, "logits", "pred_boxes")?;
    assert!(
        l > 1e-2,
        "ignoring the mask changed the logits by only {l:.2e}"
    );
    Ok(())
}

#[test]
fn transformers_5_key_names_load_too() -> Result<()> {
    let fixture = Fixture::load(&fixture_dir("detr_tiny"))?;
    let renamed: HashMap<String, Tensor> = fixture
        .weights
        .iter()
        .map(|(k, v)| {
            let k = k
                .replace(
                    "model.backbone.conv_encoder.model.",
                    "model.backbone.model.",
                )
                .replace(".out_proj.", ".o_proj.")
                .replace(".fc1.", ".mlp.fc1.")
                .replace(".fc2.", ".mlp.fc2.");
            (k, v.clone())
        })
        .collect();
    assert!(renamed.keys().any(|k| k.contains(".mlp.fc1.")));
    let model = Detr::load(renamed, None, &Device::Cpu, DType::F32)?;
    let got = model.forward(fixture.get("pixel_values")?, fixture.get("pixel_mask")?)?;
    let (l, b) = fixture.compare(&got, "logits", "pred_boxes")?;
    assert!(
        l < fixture.tolerance && b < fixture.tolerance,
        "{l:.2e} {b:.2e}"
    );
    Ok(())
}

#[test]
fn mismatched_weights_name_every_problem() -> Result<()> {
    let fixture = Fixture::load(&fixture_dir("detr_tiny"))?;
    let mut weights = fixture.weights.clone();
    weights.remove("model.decoder.layers.1.encoder_attn.k_proj.weight");
    weights.insert(
        "model.encoder.layers.0.extra.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu)?,
    );
    let err = Detr::load(weights, None, &Device::Cpu, DType::F32).unwrap_err();
    let text = err.to_string();
    for needle in ["encoder_attn.k_proj.weight", "extra.weight", "detr"] {
        assert!(text.contains(needle), "{needle} not in {text}");
    }
    // A head count that does not divide the width is refused, not guessed.
    let err = Detr::load(fixture.weights.clone(), Some(5), &Device::Cpu, DType::F32).unwrap_err();
    assert!(err.to_string().contains("heads"), "{err}");
    Ok(())
}

#[test]
fn half_precision_keeps_the_top_class() -> Result<()> {
    let fixture = Fixture::load(&fixture_dir("detr_tiny"))?;
    let model = fixture.model(DType::F16)?;
    let (l, b) = model.forward(fixture.get("pixel_values")?, fixture.get("pixel_mask")?)?;
    let rel = rel_diff(&l, fixture.get("logits")?)?.max(rel_diff(&b, fixture.get("pred_boxes")?)?);
    println!("detr_tiny f16: {rel:.2e}");
    assert!(rel < 2e-2, "f16 differs by {rel:.2e}");
    Ok(())
}

/// Full-size DETR-R50 / R101 with random weights, when generated with
/// `make_detr_fixtures.py --full DIR` and `FOVEA_FULL_FIXTURES=DIR`.
#[test]
fn full_size_detr() -> Result<()> {
    let Ok(dir) = std::env::var("FOVEA_FULL_FIXTURES") else {
        eprintln!("FOVEA_FULL_FIXTURES not set: skipping the full-size DETR checks");
        return Ok(());
    };
    for name in ["detr_resnet_50", "detr_resnet_101"] {
        let path = Path::new(&dir).join(name);
        if !path.exists() {
            eprintln!("{path:?} missing: skipped");
            continue;
        }
        let fixture = Fixture::load(&path)?;
        let worst = fixture.check(name)?;
        assert!(worst < fixture.tolerance, "{name}: {worst:.2e}");
    }
    Ok(())
}
