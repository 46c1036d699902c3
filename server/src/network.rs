//! The networks Fovea serves, whatever their task, behind one interface:
//! how an image becomes an input tensor, the forward pass, and the labels.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use fovea_model_core::classifier::Classifier;
use fovea_model_core::letterbox::{Letterbox, LetterboxTransform};
use fovea_model_core::preprocess::Preprocess;
use fovea_model_core::yolo::Yolo;
use fovea_weights::store::Labels;
use image::RgbImage;
use serde::Serialize;

use crate::batcher::BatchRunner;
use crate::registry::{default_preprocess, Resolved};

/// Letterbox side of a detector when neither the configuration nor the
/// manifest gives one (Ultralytics' default).
pub const DEFAULT_DETECTION_SIZE: u32 = 640;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    Classification,
    Detection,
}

impl Task {
    pub fn as_str(self) -> &'static str {
        match self {
            Task::Classification => "classification",
            Task::Detection => "detection",
        }
    }
}

/// A loaded network.
pub enum Network {
    Classifier(Classifier),
    Yolo(Yolo),
}

impl Network {
    pub fn task(&self) -> Task {
        match self {
            Network::Classifier(_) => Task::Classification,
            Network::Yolo(_) => Task::Detection,
        }
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Network::Classifier(m) => m.forward(x),
            Network::Yolo(m) => m.forward(x),
        }
    }

    /// The name of the raw output, as `fovea run` writes it.
    pub fn output_name(&self) -> &'static str {
        match self {
            Network::Classifier(_) => "logits",
            Network::Yolo(_) => "output",
        }
    }

    pub fn family(&self) -> &'static str {
        match self {
            Network::Classifier(m) => m.info().family,
            Network::Yolo(_) => "yolo",
        }
    }

    pub fn variant(&self) -> String {
        match self {
            Network::Classifier(m) => m.info().variant.clone(),
            Network::Yolo(m) => m.info().variant.clone(),
        }
    }

    pub fn layout(&self) -> &'static str {
        match self {
            Network::Classifier(m) => m.info().layout,
            Network::Yolo(_) => "ultralytics",
        }
    }

    pub fn num_classes(&self) -> usize {
        match self {
            Network::Classifier(m) => m.info().num_classes,
            Network::Yolo(m) => m.info().num_classes,
        }
    }
}

/// How an image becomes a model input (in `/v1/models` as the settings
/// plus `"kind": "classify"` or `"letterbox"`).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum InputPipeline {
    /// Resize, crop and normalise (classifiers).
    Classify(Preprocess),
    /// Keep the aspect ratio, pad to a fixed size (YOLO).
    Letterbox(Letterbox),
}

/// One image ready for the batcher, with what maps results back to it.
pub struct Prepared {
    pub values: Vec<f32>,
    pub letterbox: Option<LetterboxTransform>,
}

impl InputPipeline {
    /// (height, width) of the model input.
    pub fn input_size(&self) -> (u32, u32) {
        match self {
            InputPipeline::Classify(p) => p.input_size(),
            InputPipeline::Letterbox(l) => (l.height, l.width),
        }
    }

    pub fn apply(&self, image: &RgbImage) -> anyhow::Result<Prepared> {
        Ok(match self {
            InputPipeline::Classify(p) => Prepared {
                values: p.apply(image)?,
                letterbox: None,
            },
            InputPipeline::Letterbox(l) => {
                let (values, transform) = l.apply(image);
                Prepared {
                    values,
                    letterbox: Some(transform),
                }
            }
        })
    }
}

/// A network ready to run, with what is needed to feed it and read it.
pub struct LoadedNetwork {
    pub network: Arc<Network>,
    pub pipeline: InputPipeline,
    pub labels: Arc<Vec<String>>,
    pub device: Device,
    pub dtype: DType,
}

impl LoadedNetwork {
    pub fn runner(&self) -> NetworkRunner {
        let (h, w) = self.pipeline.input_size();
        NetworkRunner {
            network: self.network.clone(),
            device: self.device.clone(),
            dtype: self.dtype,
            height: h as usize,
            width: w as usize,
        }
    }
}

/// Is this a YOLO checkpoint (Ultralytics module tree)?
fn is_yolo(arch: Option<&str>, tensors: &HashMap<String, Tensor>) -> bool {
    match arch {
        Some(arch) => arch.starts_with("yolo"),
        None => tensors.contains_key("model.0.conv.weight"),
    }
}

/// What the loader may be told beyond the weights.
#[derive(Clone, Debug, Default)]
pub struct LoadOverrides {
    /// Replaces a classifier's preprocessing.
    pub preprocess: Option<Preprocess>,
    /// A detector's letterbox side.
    pub input_size: Option<u32>,
}

pub fn load_network(
    resolved: &Resolved,
    device: &Device,
    dtype: DType,
    overrides: &LoadOverrides,
) -> anyhow::Result<LoadedNetwork> {
    let path = &resolved.weights;
    let tensors = fovea_weights::safetensors_io::load_safetensors(path, DType::F32, &Device::Cpu)
        .with_context(|| format!("reading {}", path.display()))?;
    let tensors: HashMap<String, Tensor> = tensors.into_iter().collect();
    let manifest = resolved.manifest.as_ref();
    let manifest_names = match manifest.map(|m| &m.labels) {
        Some(Labels::Names(names)) => Some(names.clone()),
        _ => None,
    };

    let (network, pipeline, builtin_names) = if is_yolo(resolved.arch.as_deref(), &tensors) {
        let yolo = Yolo::load(tensors, device, dtype)
            .with_context(|| format!("loading {}", path.display()))?;
        let size = overrides
            .input_size
            .or(manifest.and_then(|m| m.input_size))
            .unwrap_or(DEFAULT_DETECTION_SIZE);
        let letterbox = Letterbox::new(size);
        if let Err(e) = letterbox.validate() {
            bail!("input size {size}: {e}");
        }
        let names = checkpoint_names(path)?;
        (
            Network::Yolo(yolo),
            InputPipeline::Letterbox(letterbox),
            names,
        )
    } else {
        let classifier = Classifier::load(tensors, resolved.arch.as_deref(), device, dtype)
            .with_context(|| format!("loading {}", path.display()))?;
        let preprocess = overrides
            .preprocess
            .clone()
            .or_else(|| manifest.and_then(|m| m.preprocess.clone()))
            .unwrap_or_else(|| default_preprocess(classifier.info()));
        preprocess.validate()?;
        (
            Network::Classifier(classifier),
            InputPipeline::Classify(preprocess),
            None,
        )
    };

    let num_classes = network.num_classes();
    let labels = manifest_names
        .or(builtin_names)
        .filter(|names| names.len() == num_classes)
        .unwrap_or_else(|| standard_names(network.task(), num_classes));
    Ok(LoadedNetwork {
        network: Arc::new(network),
        pipeline,
        labels: Arc::new(labels),
        device: device.clone(),
        dtype,
    })
}

/// Class names stored in the file by `fovea import` (Ultralytics `names`,
/// a `{id: name}` dict or a list, kept as JSON in the safetensors metadata).
fn checkpoint_names(path: &std::path::Path) -> anyhow::Result<Option<Vec<String>>> {
    let metadata = fovea_weights::safetensors_io::read_metadata(path)?;
    let Some(json) = metadata.get("names") else {
        return Ok(None);
    };
    Ok(parse_names(json))
}

fn parse_names(json: &str) -> Option<Vec<String>> {
    let value: serde_json::Value = serde_json::from_str(json).ok()?;
    match value {
        serde_json::Value::Array(items) => items
            .into_iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect(),
        serde_json::Value::Object(map) => {
            let mut pairs: Vec<(usize, String)> = map
                .into_iter()
                .map(|(k, v)| Some((k.parse().ok()?, v.as_str()?.to_string())))
                .collect::<Option<_>>()?;
            pairs.sort();
            // Ids must be exactly 0..n.
            pairs
                .iter()
                .enumerate()
                .all(|(i, (id, _))| i == *id)
                .then(|| pairs.into_iter().map(|(_, name)| name).collect())
        }
        _ => None,
    }
}

/// Names a model gets when its file carries none: ImageNet-1k or COCO-80
/// when the class count says so, else `class_N`.
fn standard_names(task: Task, num_classes: usize) -> Vec<String> {
    use fovea_model_core::labels;
    let builtin: Option<&[&str]> = match (task, num_classes) {
        (Task::Classification, 1000) => Some(labels::imagenet1k()),
        (Task::Detection, 80) => Some(labels::coco80()),
        _ => None,
    };
    match builtin {
        Some(names) => names.iter().map(|s| s.to_string()).collect(),
        None => (0..num_classes).map(|i| format!("class_{i}")).collect(),
    }
}

/// Runs batches of prepared images through a network: one forward pass per
/// batch, each image's raw output flattened (classifier logits, YOLO's
/// `[4 + classes, anchors]`).
pub struct NetworkRunner {
    pub network: Arc<Network>,
    pub device: Device,
    pub dtype: DType,
    pub height: usize,
    pub width: usize,
}

impl NetworkRunner {
    pub fn forward(&self, images: &[Vec<f32>]) -> anyhow::Result<Vec<Vec<f32>>> {
        let n = images.len();
        let plane = 3 * self.height * self.width;
        let mut flat = Vec::with_capacity(n * plane);
        for image in images {
            if image.len() != plane {
                bail!("image of {} values, expected {plane}", image.len());
            }
            flat.extend_from_slice(image);
        }
        let x = Tensor::from_vec(flat, (n, 3, self.height, self.width), &Device::Cpu)?
            .to_device(&self.device)?
            .to_dtype(self.dtype)?;
        let y = self
            .network
            .forward(&x)?
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .flatten_from(1)?;
        Ok(y.to_vec2::<f32>()?)
    }
}

impl BatchRunner for NetworkRunner {
    type Input = Vec<f32>;
    type Output = Vec<f32>;
    fn run(&mut self, inputs: Vec<Vec<f32>>) -> anyhow::Result<Vec<Vec<f32>>> {
        self.forward(&inputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_checkpoint_metadata() {
        assert_eq!(
            parse_names(r#"{"0": "person", "1": "bicycle"}"#),
            Some(vec!["person".to_string(), "bicycle".to_string()])
        );
        assert_eq!(
            parse_names(r#"{"1": "b", "0": "a", "2": "c"}"#),
            Some(vec!["a".into(), "b".into(), "c".into()])
        );
        assert_eq!(
            parse_names(r#"["a", "b"]"#),
            Some(vec!["a".into(), "b".into()])
        );
        // Gaps in the ids, non-strings and junk are not names.
        assert_eq!(parse_names(r#"{"0": "a", "2": "c"}"#), None);
        assert_eq!(parse_names(r#"[1, 2]"#), None);
        assert_eq!(parse_names("not json"), None);
    }

    #[test]
    fn pipelines_describe_themselves() {
        let letterbox =
            serde_json::to_value(InputPipeline::Letterbox(Letterbox::new(640))).unwrap();
        assert_eq!(letterbox["kind"], "letterbox");
        assert_eq!(letterbox["height"], 640);
        assert_eq!(letterbox["pad_value"], 114);
        let classify =
            serde_json::to_value(InputPipeline::Classify(Preprocess::torchvision_imagenet()))
                .unwrap();
        assert_eq!(classify["kind"], "classify");
        assert!(classify["mean"].is_array());
    }

    #[test]
    fn standard_names_follow_the_task() {
        assert_eq!(standard_names(Task::Detection, 80)[0], "person");
        assert_eq!(standard_names(Task::Classification, 1000).len(), 1000);
        assert_eq!(standard_names(Task::Detection, 3)[2], "class_2");
    }
}
