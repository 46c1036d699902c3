//! Running one V2 inference request: checking its inputs against the
//! model's metadata, feeding the batcher, and shaping the answers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fovea_model_core::topk::top_k;
use serde_json::{json, Value};

use super::tensor::{DataType, InputTensor, OutputTensor, TensorData};
use super::{raw_outputs, DETECTIONS, IMAGES, PIXEL_MASK, PIXEL_VALUES};
use crate::http::detect::{detect_all, detect_options};
use crate::http::error::ApiError;
use crate::http::infer::{infer as infer_images, run_inputs, Request as ImageRequest};
use crate::http::input::Options;
use crate::http::AppState;
use crate::network::ModelInput;
use crate::postprocess::detection_json;
use crate::registry::LoadedModel;

/// An output the client asks for.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestedOutput {
    pub name: String,
    /// The classification extension: the N best classes as strings.
    pub classification: Option<usize>,
}

/// A request, whatever wire it came on.
#[derive(Debug, Default)]
pub struct InferRequest {
    pub inputs: Vec<InputTensor>,
    /// `None`: every output the inputs allow.
    pub outputs: Option<Vec<RequestedOutput>>,
    pub parameters: BTreeMap<String, Value>,
}

/// Fovea's own request parameters: the detection options and a deadline.
const FOVEA_PARAMETERS: &[&str] = &[
    "confidence",
    "iou",
    "max_detections",
    "classes",
    "agnostic",
    "timeout_ms",
];
/// Parameters the protocol (or Triton's clients) define, accepted as such:
/// `timeout` (microseconds) is honoured as a deadline, `binary_data_output`
/// by the REST layer; the others do not apply to stateless vision models.
const PROTOCOL_PARAMETERS: &[&str] = &[
    "binary_data_output",
    "timeout",
    "priority",
    "sequence_id",
    "sequence_start",
    "sequence_end",
    "headers",
];
const DETECTION_PARAMETERS: &[&str] =
    &["confidence", "iou", "max_detections", "classes", "agnostic"];

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::bad_request(message)
}

/// Run `request` on `model`. `deadline`, if given, is the caller's own
/// (gRPC's `grpc-timeout`); the sooner of it and the request's wins.
pub async fn infer(
    state: &Arc<AppState>,
    model: &Arc<LoadedModel>,
    request: InferRequest,
    started: Instant,
    deadline: Option<Instant>,
) -> Result<Vec<OutputTensor>, ApiError> {
    let options = check_parameters(&request.parameters)?;
    let deadline = request_deadline(&options, &request.parameters, model, started, deadline)?;
    let detecting = model.decoder.is_some();
    if !detecting {
        if let Some(p) = DETECTION_PARAMETERS
            .iter()
            .find(|p| request.parameters.contains_key(**p))
        {
            return Err(bad(format!(
                "parameter {p:?} applies to detectors; {:?} is a classifier",
                model.name
            )));
        }
    }
    let inputs = Inputs::check(model, request.inputs, state.limits.max_images_per_request)?;
    let wanted = wanted_outputs(model, request.outputs, inputs.is_images())?;
    let detect_options = match model.decoder {
        Some(_) if wanted.iter().any(|o| o.name == DETECTIONS) => {
            Some(detect_options(&options, model)?)
        }
        _ => None,
    };

    // Each image's raw output: from the tensors, or from the images' results,
    // which also map detections back to each image.
    let (tensor_outputs, results) = match inputs {
        Inputs::Images(images) => {
            let request = ImageRequest {
                model: model.clone(),
                options: Options::default(),
                images,
                deadline,
            };
            (Vec::new(), infer_images(state, request, false).await?.0)
        }
        Inputs::Tensors(tensors) => (run_inputs(model, tensors, deadline).await?.0, Vec::new()),
    };
    // Detections first: `detect_all` hands the images back, so the raw
    // outputs below are read in place rather than copied.
    let (results, mut detections) = match detect_options {
        Some(options) => {
            let (results, found) = detect_all(state, model, results, options).await?;
            let elements: Vec<Bytes> = results
                .iter()
                .zip(&found)
                .map(|(image, found)| {
                    let detections: Vec<Value> = found
                        .iter()
                        .map(|d| detection_json(d, &model.labels))
                        .collect();
                    let answer = json!({"width": image.width, "height": image.height, "detections": detections});
                    Bytes::from(answer.to_string())
                })
                .collect();
            (results, Some(elements))
        }
        None => (results, None),
    };
    // One of the two is empty.
    let raw: Vec<&[f32]> = tensor_outputs
        .iter()
        .map(Vec::as_slice)
        .chain(results.iter().map(|r| r.output.as_slice()))
        .collect();

    let shapes = raw_outputs(model);
    let per_image: usize = shapes
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    if let Some(bad_len) = raw.iter().map(|r| r.len()).find(|&l| l != per_image) {
        return Err(internal(format!(
            "model {:?} answered {bad_len} values per image, {per_image} expected",
            model.name
        )));
    }
    let batch = raw.len();
    let mut outputs = Vec::with_capacity(wanted.len());
    for output in &wanted {
        if output.name == DETECTIONS {
            let elements = detections.take().expect("computed above for images");
            outputs.push(OutputTensor {
                name: DETECTIONS.into(),
                datatype: DataType::Bytes,
                shape: vec![batch],
                data: TensorData::Bytes(elements),
            });
            continue;
        }
        // A raw output: its slice of every image's flattened output.
        let mut offset = 0;
        let mut found = None;
        for (name, shape) in &shapes {
            let len: usize = shape.iter().product();
            if *name == output.name {
                found = Some((offset, len, shape));
            }
            offset += len;
        }
        let (offset, len, shape) = found.expect("wanted outputs are the model's");
        let values: Vec<f32> = raw
            .iter()
            .flat_map(|r| &r[offset..offset + len])
            .copied()
            .collect();
        let tensor = match output.classification {
            Some(n) => classification(model, &values, batch, len, n),
            None => OutputTensor {
                name: output.name.clone(),
                datatype: DataType::Fp32,
                shape: std::iter::once(batch)
                    .chain(shape.iter().copied())
                    .collect(),
                data: TensorData::Fp32(values),
            },
        };
        outputs.push(tensor);
    }
    Ok(outputs)
}

fn internal(message: String) -> ApiError {
    tracing::error!("{message}");
    ApiError::new(
        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        message,
    )
}

/// Refuse unknown parameters (a typo is not ignored) and keep Fovea's own
/// as options.
fn check_parameters(parameters: &BTreeMap<String, Value>) -> Result<Options, ApiError> {
    for key in parameters.keys() {
        if !FOVEA_PARAMETERS.contains(&key.as_str()) && !PROTOCOL_PARAMETERS.contains(&key.as_str())
        {
            return Err(bad(format!(
                "unknown parameter {key:?} (Fovea's: {})",
                FOVEA_PARAMETERS.join(", ")
            )));
        }
    }
    Ok(Options::from_values(
        parameters
            .iter()
            .filter(|(k, _)| FOVEA_PARAMETERS.contains(&k.as_str()))
            .map(|(k, v)| (k.as_str(), v.clone())),
    ))
}

/// The request's deadline: `timeout_ms`, Triton's `timeout` (microseconds,
/// 0 for none), else the model's default; never later than the caller's.
fn request_deadline(
    options: &Options,
    parameters: &BTreeMap<String, Value>,
    model: &LoadedModel,
    started: Instant,
    caller: Option<Instant>,
) -> Result<Instant, ApiError> {
    let triton_timeout = match parameters.get("timeout") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(0) => None,
            Some(us) => Some(Duration::from_micros(us)),
            None => return Err(bad(format!("timeout must be microseconds, got {v}"))),
        },
    };
    let timeout = options
        .integer("timeout_ms", 1, 3_600_000)?
        .map(Duration::from_millis)
        .or(triton_timeout)
        .unwrap_or(model.settings().request_timeout);
    let own = started + timeout;
    Ok(caller.map_or(own, |c| c.min(own)))
}

/// A request's inputs, checked: either images or preprocessed tensors.
enum Inputs {
    Images(Vec<Bytes>),
    Tensors(Vec<ModelInput>),
}

impl Inputs {
    fn is_images(&self) -> bool {
        matches!(self, Inputs::Images(_))
    }

    fn check(
        model: &LoadedModel,
        inputs: Vec<InputTensor>,
        max_batch: usize,
    ) -> Result<Self, ApiError> {
        let specs = super::inputs(model);
        let mut by_name: BTreeMap<String, InputTensor> = BTreeMap::new();
        for input in inputs {
            let Some(spec) = specs.iter().find(|s| s.name == input.name) else {
                let names: Vec<_> = specs.iter().map(|s| s.name).collect();
                return Err(bad(format!(
                    "model {:?} has no input {:?} (its inputs: {})",
                    model.name,
                    input.name,
                    names.join(", ")
                )));
            };
            let expected = match spec.datatype {
                // A mask may come in any integer type or as BOOL.
                DataType::Int64 => matches!(input.data, TensorData::Int(_)),
                other => input.datatype == other,
            };
            if !expected {
                return Err(bad(format!(
                    "input {:?}: datatype {}, expected {}",
                    input.name,
                    input.datatype.as_str(),
                    spec.datatype.as_str()
                )));
            }
            let fits = input.shape.len() == spec.shape.len()
                && input
                    .shape
                    .iter()
                    .zip(&spec.shape)
                    .all(|(&d, &s)| s < 0 || d as i64 == s);
            if !fits {
                return Err(bad(format!(
                    "input {:?}: shape {:?} does not fit {:?} (-1: any size)",
                    input.name, input.shape, spec.shape
                )));
            }
            let count: usize = input.shape.iter().product();
            if input.data.len() != count {
                return Err(bad(format!(
                    "input {:?}: {} elements for shape {:?}",
                    input.name,
                    input.data.len(),
                    input.shape
                )));
            }
            let batch = input.shape[0];
            if batch == 0 {
                return Err(bad(format!("input {:?} has no elements", input.name)));
            }
            if batch > max_batch {
                return Err(ApiError::payload_too_large(format!(
                    "a batch of {batch} in one request; at most {max_batch} are accepted"
                )));
            }
            if by_name.insert(input.name.clone(), input).is_some() {
                return Err(bad("an input is given twice"));
            }
        }
        let images = by_name.remove(IMAGES);
        let values = by_name.remove(PIXEL_VALUES);
        let mask = by_name.remove(PIXEL_MASK);
        match (images, values, mask) {
            (Some(images), None, None) => match images.data {
                TensorData::Bytes(elements) => Ok(Inputs::Images(elements)),
                _ => Err(bad("input \"images\" must be BYTES")),
            },
            (None, Some(values), mask) => split_tensors(values, mask).map(Inputs::Tensors),
            (None, None, _) => Err(bad(format!(
                "send the input {PIXEL_VALUES:?} (preprocessed) or {IMAGES:?} (encoded images)"
            ))),
            (Some(_), ..) => Err(bad(format!(
                "send either {IMAGES:?} or {PIXEL_VALUES:?}, not both"
            ))),
        }
    }
}

/// `pixel_values` `[B, 3, H, W]` as one model input per image; with DETR's
/// `pixel_mask`, each image cropped to its unpadded top-left rectangle.
fn split_tensors(
    values: InputTensor,
    mask: Option<InputTensor>,
) -> Result<Vec<ModelInput>, ApiError> {
    let TensorData::Fp32(data) = values.data else {
        return Err(bad("input \"pixel_values\" must be FP32"));
    };
    let [batch, _, h, w] = values.shape[..] else {
        return Err(bad("pixel_values must be [B, 3, H, W]"));
    };
    if h == 0 || w == 0 {
        return Err(bad("pixel_values has an empty image"));
    }
    let masks = match mask {
        None => None,
        Some(mask) => {
            if mask.shape != [batch, h, w] {
                return Err(bad(format!(
                    "pixel_mask has shape {:?}; pixel_values needs [{batch}, {h}, {w}]",
                    mask.shape
                )));
            }
            match mask.data {
                TensorData::Int(m) => Some(m),
                _ => return Err(bad("pixel_mask must hold integers or booleans")),
            }
        }
    };
    let image_len = 3 * h * w;
    (0..batch)
        .map(|b| {
            let image = &data[b * image_len..(b + 1) * image_len];
            let Some(masks) = &masks else {
                return Ok(ModelInput {
                    values: image.to_vec(),
                    height: h,
                    width: w,
                });
            };
            let (mh, mw) = mask_extent(&masks[b * h * w..(b + 1) * h * w], h, w)
                .map_err(|e| bad(format!("pixel_mask of image {b}: {e}")))?;
            let mut values = Vec::with_capacity(3 * mh * mw);
            for channel in image.chunks_exact(h * w) {
                for row in channel.chunks_exact(w).take(mh) {
                    values.extend_from_slice(&row[..mw]);
                }
            }
            Ok(ModelInput {
                values,
                height: mh,
                width: mw,
            })
        })
        .collect()
}

/// The (height, width) of the ones of a mask, which must form a top-left
/// rectangle (what padding to a batch leaves).
fn mask_extent(mask: &[i64], h: usize, w: usize) -> Result<(usize, usize), String> {
    let width = mask[..w].iter().take_while(|&&v| v != 0).count();
    let height = (0..h).take_while(|&r| mask[r * w] != 0).count();
    if width == 0 || height == 0 {
        return Err("it has no ones at the top left".into());
    }
    for (r, row) in mask.chunks_exact(w).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            if (v != 0) != (r < height && c < width) {
                return Err(format!(
                    "its ones are not a top-left rectangle ({height}x{width} then a {v} at row {r}, column {c})"
                ));
            }
        }
    }
    Ok((height, width))
}

/// The outputs to answer, each checked against what the model and the
/// input kind offer.
fn wanted_outputs(
    model: &LoadedModel,
    requested: Option<Vec<RequestedOutput>>,
    images: bool,
) -> Result<Vec<RequestedOutput>, ApiError> {
    let mut available: Vec<&str> = raw_outputs(model).iter().map(|(n, _)| *n).collect();
    if images && model.decoder.is_some() {
        available.push(DETECTIONS);
    }
    let Some(requested) = requested else {
        return Ok(available
            .iter()
            .map(|name| RequestedOutput {
                name: name.to_string(),
                classification: None,
            })
            .collect());
    };
    for (i, output) in requested.iter().enumerate() {
        if output.name == DETECTIONS && model.decoder.is_some() && !images {
            return Err(bad(format!(
                "output {DETECTIONS:?} needs the input {IMAGES:?}: with preprocessed tensors the original image is unknown"
            )));
        }
        if !available.contains(&output.name.as_str()) {
            return Err(bad(format!(
                "model {:?} has no output {:?} (its outputs: {})",
                model.name,
                output.name,
                available.join(", ")
            )));
        }
        if requested[..i].iter().any(|o| o.name == output.name) {
            return Err(bad(format!("output {:?} is asked for twice", output.name)));
        }
        if let Some(n) = output.classification {
            if model.decoder.is_some() || output.name != "logits" {
                return Err(bad(format!(
                    "classification applies to a classifier's \"logits\", not {:?} of {:?}",
                    output.name, model.name
                )));
            }
            if n == 0 || n > model.num_classes {
                return Err(bad(format!(
                    "classification must be from 1 to {}, got {n}",
                    model.num_classes
                )));
            }
        }
    }
    Ok(requested)
}

/// The classification extension: each image's `n` best classes as
/// `"value:index:label"` (value the raw output, best first), `[B, n]`.
fn classification(
    model: &LoadedModel,
    values: &[f32],
    batch: usize,
    per_image: usize,
    n: usize,
) -> OutputTensor {
    let mut elements = Vec::with_capacity(batch * n);
    for row in values.chunks_exact(per_image) {
        for (index, value) in top_k(row, n) {
            let label = model.labels.get(index).map(String::as_str).unwrap_or("");
            elements.push(Bytes::from(format!("{value}:{index}:{label}")));
        }
    }
    OutputTensor {
        name: "logits".into(),
        datatype: DataType::Bytes,
        shape: vec![batch, n],
        data: TensorData::Bytes(elements),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_must_be_top_left_rectangles() {
        #[rustfmt::skip]
        let mask = [
            1, 1, 0,
            1, 1, 0,
        ];
        assert_eq!(mask_extent(&mask, 2, 3), Ok((2, 2)));
        assert_eq!(mask_extent(&[1; 6], 2, 3), Ok((2, 3)));
        assert!(mask_extent(&[0; 6], 2, 3).is_err());
        assert!(mask_extent(&[1, 1, 0, 1, 0, 0], 2, 3).is_err());
        assert!(mask_extent(&[1, 0, 1, 1, 0, 0], 2, 3).is_err());
    }

    #[test]
    fn masked_images_are_cropped() {
        let values = InputTensor {
            name: PIXEL_VALUES.into(),
            datatype: DataType::Fp32,
            shape: vec![1, 3, 2, 3],
            data: TensorData::Fp32((0..18).map(|v| v as f32).collect()),
        };
        let mask = InputTensor {
            name: PIXEL_MASK.into(),
            datatype: DataType::Int64,
            shape: vec![1, 2, 3],
            data: TensorData::Int(vec![1, 1, 0, 0, 0, 0]),
        };
        let inputs = split_tensors(values.clone(), Some(mask)).unwrap();
        assert_eq!((inputs[0].height, inputs[0].width), (1, 2));
        assert_eq!(inputs[0].values, [0.0, 1.0, 6.0, 7.0, 12.0, 13.0]);
        let whole = split_tensors(values, None).unwrap();
        assert_eq!(whole[0].values.len(), 18);
    }

    #[test]
    fn parameters_are_checked() {
        let params = |pairs: &[(&str, Value)]| -> BTreeMap<String, Value> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect()
        };
        assert!(check_parameters(&params(&[
            ("confidence", json!(0.3)),
            ("binary_data_output", json!(true))
        ]))
        .is_ok());
        let err = check_parameters(&params(&[("confidance", json!(0.3))])).unwrap_err();
        assert!(err.message.contains("unknown parameter"), "{}", err.message);
    }
}
