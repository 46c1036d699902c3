//! The Open Inference Protocol (KServe V2), independent of the wire: what
//! each model offers (its metadata) and how a request runs. `http::v2`
//! (REST, JSON and binary tensors) and `grpc::kserve` translate their wire
//! forms to and from these types.
//!
//! Every model has two ways in: preprocessed tensors (`pixel_values`, and
//! DETR's `pixel_mask`), as `fovea run` takes them, or encoded `images`,
//! decoded and preprocessed exactly as on `/v1`. Both go through the model's
//! dynamic batcher with `/v1`'s requests.

pub mod infer;
pub mod tensor;

use std::sync::Arc;

use axum::http::StatusCode;

use crate::http::error::ApiError;
use crate::http::AppState;
use crate::network::Decoder;
use crate::registry::LoadedModel;
use tensor::DataType;

/// The server's name in its metadata.
pub const SERVER_NAME: &str = "fovea";
/// The platform a model reports: they all run on Fovea's candle models.
pub const PLATFORM: &str = "fovea";
/// Each model has one version.
pub const MODEL_VERSION: &str = "1";
/// The protocol extensions Fovea really supports.
pub const EXTENSIONS: &[&str] = &["binary_tensor_data", "classification"];

pub const PIXEL_VALUES: &str = "pixel_values";
pub const PIXEL_MASK: &str = "pixel_mask";
pub const IMAGES: &str = "images";
pub const DETECTIONS: &str = "detections";

/// A tensor in a model's metadata: -1 for a variable dimension.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: &'static str,
    pub datatype: DataType,
    pub shape: Vec<i64>,
}

fn spec(name: &'static str, datatype: DataType, shape: Vec<i64>) -> TensorSpec {
    TensorSpec {
        name,
        datatype,
        shape,
    }
}

/// The model named, at `version` (empty: the latest; each model has one).
pub fn find_model(
    state: &AppState,
    name: &str,
    version: &str,
) -> Result<Arc<LoadedModel>, ApiError> {
    let registry = state.registry.get().ok_or_else(ApiError::not_ready)?;
    let not_found = |message| ApiError::new(StatusCode::NOT_FOUND, "model_not_found", message);
    let model = registry
        .get(Some(name))
        .ok_or_else(|| not_found(format!("no model named {name:?} is loaded")))?;
    if !(version.is_empty() || version == MODEL_VERSION) {
        return Err(not_found(format!(
            "model {name:?} has no version {version:?} (its only version is {MODEL_VERSION:?})"
        )));
    }
    Ok(model.clone())
}

/// The inputs a model takes. Classifiers and YOLO have a fixed input size;
/// DETR's follows each image.
pub fn inputs(model: &LoadedModel) -> Vec<TensorSpec> {
    let (h, w) = model
        .pipeline
        .fixed_input_size()
        .map_or((-1, -1), |(h, w)| (h as i64, w as i64));
    let mut inputs = vec![spec(PIXEL_VALUES, DataType::Fp32, vec![-1, 3, h, w])];
    if matches!(model.decoder, Some(Decoder::Detr { .. })) {
        inputs.push(spec(PIXEL_MASK, DataType::Int64, vec![-1, h, w]));
    }
    inputs.push(spec(IMAGES, DataType::Bytes, vec![-1]));
    inputs
}

/// The raw outputs of one image, name and shape, in the order of the
/// batcher's flattened output (the names `fovea run` writes).
pub fn raw_outputs(model: &LoadedModel) -> Vec<(&'static str, Vec<usize>)> {
    let len = model.raw_output_len;
    match model.decoder {
        None => vec![("logits", vec![model.num_classes])],
        Some(Decoder::Yolo { num_classes }) => {
            let rows = 4 + num_classes;
            vec![("output", vec![rows, len / rows])]
        }
        Some(Decoder::Detr { num_queries }) => {
            // Per query: the class logits (with "no object") and 4 box values.
            let per_query = len / num_queries.max(1);
            vec![
                ("logits", vec![num_queries, per_query.saturating_sub(4)]),
                ("pred_boxes", vec![num_queries, 4]),
            ]
        }
    }
}

/// The outputs a model answers: its raw outputs and, for detectors fed
/// images, the detections (one JSON object per image).
pub fn outputs(model: &LoadedModel) -> Vec<TensorSpec> {
    let mut outputs: Vec<TensorSpec> = raw_outputs(model)
        .into_iter()
        .map(|(name, shape)| {
            let shape = std::iter::once(-1)
                .chain(shape.iter().map(|&d| d as i64))
                .collect();
            spec(name, DataType::Fp32, shape)
        })
        .collect();
    if model.decoder.is_some() {
        outputs.push(spec(DETECTIONS, DataType::Bytes, vec![-1]));
    }
    outputs
}
