//! The networks Fovea serves, whatever their task, behind one interface:
//! how an image becomes an input tensor, the forward pass, and the labels.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use fovea_model_core::classifier::Classifier;
use fovea_model_core::detr::Detr;
use fovea_model_core::detr_preprocess::DetrResize;
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
// One per loaded model, behind an Arc: the variants' sizes (larger with a
// CUDA device handle inside) cost nothing worth a box.
#[allow(clippy::large_enum_variant)]
pub enum Network {
    Classifier(Classifier),
    Yolo(Yolo),
    Detr(Detr),
}

impl Network {
    pub fn task(&self) -> Task {
        match self {
            Network::Classifier(_) => Task::Classification,
            Network::Yolo(_) | Network::Detr(_) => Task::Detection,
        }
    }

    /// The raw outputs for preprocessed `pixel_values` `[B, 3, H, W]`, named
    /// as [`Network::output_names`]. `pixel_mask` `[B, H, W]` is DETR's
    /// (all image when not given); other models take none.
    pub fn run(
        &self,
        pixel_values: &Tensor,
        pixel_mask: Option<&Tensor>,
    ) -> anyhow::Result<Vec<Tensor>> {
        if pixel_mask.is_some() && !matches!(self, Network::Detr(_)) {
            bail!("only DETR models take a pixel_mask");
        }
        Ok(match self {
            Network::Classifier(m) => vec![m.forward(pixel_values)?],
            Network::Yolo(m) => vec![m.forward(pixel_values)?],
            Network::Detr(m) => {
                let (b, _, h, w) = pixel_values.dims4()?;
                let ones;
                let mask = match pixel_mask {
                    Some(mask) => mask,
                    None => {
                        ones = Tensor::ones((b, h, w), DType::U8, &Device::Cpu)?;
                        &ones
                    }
                };
                let (logits, boxes) = m.forward(pixel_values, mask)?;
                vec![logits, boxes]
            }
        })
    }

    /// The names of the raw outputs, as `fovea run` writes them.
    pub fn output_names(&self) -> &'static [&'static str] {
        match self {
            Network::Classifier(_) => &["logits"],
            Network::Yolo(_) => &["output"],
            Network::Detr(_) => &["logits", "pred_boxes"],
        }
    }

    pub fn family(&self) -> &'static str {
        match self {
            Network::Classifier(m) => m.info().family,
            Network::Yolo(_) => "yolo",
            Network::Detr(_) => "detr",
        }
    }

    pub fn variant(&self) -> String {
        match self {
            Network::Classifier(m) => m.info().variant.clone(),
            Network::Yolo(m) => m.info().variant.clone(),
            Network::Detr(m) => m.info().variant.clone(),
        }
    }

    pub fn layout(&self) -> &'static str {
        match self {
            Network::Classifier(m) => m.info().layout,
            Network::Yolo(_) => "ultralytics",
            Network::Detr(_) => "huggingface",
        }
    }

    pub fn num_classes(&self) -> usize {
        match self {
            Network::Classifier(m) => m.info().num_classes,
            Network::Yolo(m) => m.info().num_classes,
            Network::Detr(m) => m.info().num_classes,
        }
    }

    /// How the raw output of one image becomes detections (detectors only).
    pub fn decoder(&self) -> Option<Decoder> {
        match self {
            Network::Classifier(_) => None,
            Network::Yolo(m) => Some(Decoder::Yolo {
                num_classes: m.info().num_classes,
            }),
            Network::Detr(m) => Some(Decoder::Detr {
                num_queries: m.info().num_queries,
            }),
        }
    }
}

/// A detector's raw output per image, as the batcher returns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoder {
    /// `[4 + classes, anchors]`, boxes in letterboxed pixels.
    Yolo { num_classes: usize },
    /// `logits` `[queries, classes + 1]` followed by `pred_boxes`
    /// `[queries, 4]` (normalised cx, cy, w, h).
    Detr { num_queries: usize },
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
    /// Keep the aspect ratio at the image's own size (DETR).
    Detr(DetrResize),
}

/// One preprocessed image: CHW values of `height x width`.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelInput {
    pub values: Vec<f32>,
    pub height: usize,
    pub width: usize,
}

impl ModelInput {
    pub fn zeros(height: usize, width: usize) -> Self {
        Self {
            values: vec![0.0; 3 * height * width],
            height,
            width,
        }
    }
}

/// One image ready for the batcher, with what maps results back to it.
pub struct Prepared {
    pub input: ModelInput,
    pub letterbox: Option<LetterboxTransform>,
}

impl InputPipeline {
    /// (height, width) of every model input, if the pipeline fixes it
    /// (DETR's follows each image's aspect ratio).
    pub fn fixed_input_size(&self) -> Option<(u32, u32)> {
        match self {
            InputPipeline::Detr(_) => None,
            fixed => Some(fixed.nominal_input_size()),
        }
    }

    /// (height, width) of a typical input: the fixed one, or for DETR that
    /// of a 4:3 landscape photo (for warm-up and benchmarks).
    pub fn nominal_input_size(&self) -> (u32, u32) {
        match self {
            InputPipeline::Classify(p) => p.input_size(),
            InputPipeline::Letterbox(l) => (l.height, l.width),
            // Validated settings always give a size; the square is a floor.
            InputPipeline::Detr(r) => r
                .output_size(3000, 4000)
                .unwrap_or((r.shortest_edge, r.shortest_edge)),
        }
    }

    pub fn apply(&self, image: &RgbImage) -> anyhow::Result<Prepared> {
        Ok(match self {
            InputPipeline::Classify(p) => {
                let (h, w) = p.input_size();
                Prepared {
                    input: ModelInput {
                        values: p.apply(image)?,
                        height: h as usize,
                        width: w as usize,
                    },
                    letterbox: None,
                }
            }
            InputPipeline::Letterbox(l) => {
                let (values, transform) = l.apply(image);
                Prepared {
                    input: ModelInput {
                        values,
                        height: l.height as usize,
                        width: l.width as usize,
                    },
                    letterbox: Some(transform),
                }
            }
            InputPipeline::Detr(r) => {
                let prepared = r.apply(image)?;
                Prepared {
                    input: ModelInput {
                        values: prepared.values,
                        height: prepared.height as usize,
                        width: prepared.width as usize,
                    },
                    letterbox: None,
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
        NetworkRunner {
            network: self.network.clone(),
            device: self.device.clone(),
            dtype: self.dtype,
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
    /// A YOLO detector's letterbox side; DETR's shortest edge.
    pub input_size: Option<u32>,
    /// DETR's longest edge.
    pub max_input_size: Option<u32>,
}

/// Is this a DETR checkpoint? Its keys say so whatever the architecture
/// name (`detr-resnet-50`, transformers' `DetrForObjectDetection`).
fn is_detr(arch: Option<&str>, tensors: &HashMap<String, Tensor>) -> bool {
    arch.is_some_and(|a| a.to_ascii_lowercase().starts_with("detr"))
        || tensors.contains_key("model.query_position_embeddings.weight")
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

    let arch = resolved.arch.as_deref();
    let (network, pipeline, builtin_names) = if is_detr(arch, &tensors) {
        let model = Detr::load(tensors, None, device, dtype)
            .with_context(|| format!("loading {}", path.display()))?;
        let mut resize = DetrResize::default();
        if let Some(short) = overrides.input_size.or(manifest.and_then(|m| m.input_size)) {
            resize.shortest_edge = short;
        }
        if let Some(long) = overrides.max_input_size {
            resize.longest_edge = long;
        }
        resize.validate()?;
        (Network::Detr(model), InputPipeline::Detr(resize), None)
    } else if is_yolo(arch, &tensors) {
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
        let classifier = Classifier::load(tensors, arch, device, dtype)
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
        // DETR's COCO head: the 91 category ids, unused ones "N/A".
        (Task::Detection, 91) => Some(labels::coco91()),
        _ => None,
    };
    match builtin {
        Some(names) => names.iter().map(|s| s.to_string()).collect(),
        None => (0..num_classes).map(|i| format!("class_{i}")).collect(),
    }
}

/// Runs batches of prepared images through a network: one forward pass per
/// batch, each image's raw output flattened (classifier logits, YOLO's
/// `[4 + classes, anchors]`, DETR's as [`Decoder::Detr`] says).
pub struct NetworkRunner {
    pub network: Arc<Network>,
    pub device: Device,
    pub dtype: DType,
}

impl NetworkRunner {
    pub fn forward(&self, images: &[ModelInput]) -> anyhow::Result<Vec<Vec<f32>>> {
        let outputs = self.forward_here(images);
        // No parallel step follows until the next batch: the kernels' helper
        // threads sleep now instead of spinning while the server decodes.
        fovea_model_core::team::rest();
        outputs
    }

    fn forward_here(&self, images: &[ModelInput]) -> anyhow::Result<Vec<Vec<f32>>> {
        let Some(first) = images.first() else {
            return Ok(Vec::new());
        };
        for image in images {
            if image.values.len() != 3 * image.height * image.width {
                bail!(
                    "image of {} values, expected 3x{}x{}",
                    image.values.len(),
                    image.height,
                    image.width
                );
            }
        }
        let to_device = |t: Tensor| -> anyhow::Result<Tensor> {
            Ok(t.to_device(&self.device)?.to_dtype(self.dtype)?)
        };
        let to_rows = |t: Tensor| -> anyhow::Result<Vec<Vec<f32>>> {
            let t = t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
            Ok(t.flatten_from(1)?.to_vec2::<f32>()?)
        };
        if let Network::Detr(detr) = self.network.as_ref() {
            // Each image at its own size; the model pads what needs padding.
            let tensors = images
                .iter()
                .map(|i| {
                    let t = Tensor::from_slice(&i.values, (3, i.height, i.width), &Device::Cpu)?;
                    to_device(t)
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let (logits, boxes) = detr.forward_images(&tensors)?;
            let rows = to_rows(logits)?.into_iter().zip(to_rows(boxes)?);
            return Ok(rows
                .map(|(mut logits, boxes)| {
                    logits.extend(boxes);
                    logits
                })
                .collect());
        }
        let (h, w) = (first.height, first.width);
        let mut flat = Vec::with_capacity(images.len() * 3 * h * w);
        for image in images {
            if (image.height, image.width) != (h, w) {
                bail!("images of different sizes in one batch");
            }
            flat.extend_from_slice(&image.values);
        }
        let x = to_device(Tensor::from_vec(
            flat,
            (images.len(), 3, h, w),
            &Device::Cpu,
        )?)?;
        let mut outputs = self.network.run(&x, None)?;
        to_rows(outputs.remove(0))
    }
}

impl BatchRunner for NetworkRunner {
    type Input = ModelInput;
    type Output = Vec<f32>;
    fn run(&mut self, inputs: Vec<ModelInput>) -> anyhow::Result<Vec<Vec<f32>>> {
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
