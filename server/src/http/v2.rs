//! The Open Inference Protocol (KServe V2) over REST: `/v2/...`, with JSON
//! tensors and the binary tensor data extension (what `tritonclient.http`
//! sends by default). The work itself is in [`crate::v2`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::ApiError;
use super::input::read_body;
use super::openapi::V2ErrorBody;
use super::AppState;
use crate::registry::LoadedModel;
use crate::v2::infer::{infer, InferRequest, RequestedOutput};
use crate::v2::tensor::{checked_shape, decode_raw, encode_raw, DataType, InputTensor, TensorData};
use crate::v2::{self as protocol, TensorSpec};

/// The binary extension's header: how much of the body is JSON.
const HEADER_LENGTH: &str = "inference-header-content-length";
/// The metric label of every V2 inference.
const INFER_ROUTE: &str = "/v2/models/infer";

pub fn routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(server_metadata))
        .routes(routes!(live))
        .routes(routes!(ready))
        .routes(routes!(model_metadata))
        .routes(routes!(model_metadata_at))
        .routes(routes!(model_ready))
        .routes(routes!(model_ready_at))
        .routes(routes!(model_infer))
        .routes(routes!(model_infer_at))
}

/// An error as the protocol answers it: `{"error": "message"}`. Every
/// refusal of the request itself is a 400, as the specification says.
#[derive(Debug)]
struct V2Error(ApiError);

impl From<ApiError> for V2Error {
    fn from(e: ApiError) -> Self {
        V2Error(e)
    }
}

impl V2Error {
    fn status(&self) -> StatusCode {
        match self.0.status {
            StatusCode::UNPROCESSABLE_ENTITY | StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                StatusCode::BAD_REQUEST
            }
            other => other,
        }
    }
}

impl IntoResponse for V2Error {
    fn into_response(self) -> Response {
        let mut response = (self.status(), Json(json!({"error": self.0.message}))).into_response();
        if let Some(s) = self.0.retry_after_s {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        response
    }
}

fn bad(message: impl Into<String>) -> V2Error {
    V2Error(ApiError::bad_request(message))
}

/// Server liveness.
#[utoipa::path(get, path = "/v2/health/live", tag = "v2", responses((status = 200, description = "`{\"live\": true}`")))]
async fn live() -> Json<Value> {
    Json(json!({"live": true}))
}

/// Server readiness: every model loaded.
#[utoipa::path(get, path = "/v2/health/ready", tag = "v2", responses(
    (status = 200, description = "`{\"ready\": true}`"),
    (status = 503, description = "Loading models or shutting down", body = V2ErrorBody),
))]
async fn ready(State(state): State<Arc<AppState>>) -> Response {
    match state.serving() {
        Ok(_) => Json(json!({"ready": true})).into_response(),
        Err(e) => V2Error(e).into_response(),
    }
}

/// Server metadata: name, version, the protocol extensions supported.
#[utoipa::path(get, path = "/v2", tag = "v2", responses((status = 200, description = "`{name, version, extensions}`")))]
async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": protocol::SERVER_NAME,
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": protocol::EXTENSIONS,
    }))
}

fn find_model(state: &AppState, name: &str, version: &str) -> Result<Arc<LoadedModel>, V2Error> {
    Ok(protocol::find_model(state, name, version)?)
}

fn tensor_json(specs: Vec<TensorSpec>) -> Vec<Value> {
    specs
        .into_iter()
        .map(|s| json!({"name": s.name, "datatype": s.datatype.as_str(), "shape": s.shape}))
        .collect()
}

/// Model metadata.
#[utoipa::path(get, path = "/v2/models/{name}", tag = "v2", params(("name" = String, Path, description = "Model name")), responses(
    (status = 200, description = "Inputs and outputs with datatypes and shapes (-1: variable)"),
    (status = 404, description = "No such model or version", body = V2ErrorBody),
    (status = 503, description = "Loading models", body = V2ErrorBody),
))]
async fn model_metadata(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, V2Error> {
    metadata(&state, &name, "")
}

/// Model metadata at a version.
#[utoipa::path(get, path = "/v2/models/{name}/versions/{version}", tag = "v2", params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "Model version (each model has one: \"1\")")), responses(
    (status = 200, description = "Inputs and outputs with datatypes and shapes (-1: variable)"),
    (status = 404, description = "No such model or version", body = V2ErrorBody),
    (status = 503, description = "Loading models", body = V2ErrorBody),
))]
async fn model_metadata_at(
    State(state): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<Value>, V2Error> {
    metadata(&state, &name, &version)
}

fn metadata(state: &AppState, name: &str, version: &str) -> Result<Json<Value>, V2Error> {
    let model = find_model(state, name, version)?;
    Ok(Json(json!({
        "name": model.name,
        "versions": [protocol::MODEL_VERSION],
        "platform": protocol::PLATFORM,
        "inputs": tensor_json(protocol::inputs(&model)),
        "outputs": tensor_json(protocol::outputs(&model)),
    })))
}

/// Model readiness.
#[utoipa::path(get, path = "/v2/models/{name}/ready", tag = "v2", params(("name" = String, Path, description = "Model name")), responses(
    (status = 200, description = "`{name, ready: true}`"),
    (status = 404, description = "No such model or version", body = V2ErrorBody),
    (status = 503, description = "Loading models or shutting down", body = V2ErrorBody),
))]
async fn model_ready(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, V2Error> {
    readiness(&state, &name, "")
}

/// Model readiness at a version.
#[utoipa::path(get, path = "/v2/models/{name}/versions/{version}/ready", tag = "v2", params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "Model version (each model has one: \"1\")")), responses(
    (status = 200, description = "`{name, ready: true}`"),
    (status = 404, description = "No such model or version", body = V2ErrorBody),
    (status = 503, description = "Loading models or shutting down", body = V2ErrorBody),
))]
async fn model_ready_at(
    State(state): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<Value>, V2Error> {
    readiness(&state, &name, &version)
}

/// A loaded model is ready until the server shuts down.
fn readiness(state: &AppState, name: &str, version: &str) -> Result<Json<Value>, V2Error> {
    let model = find_model(state, name, version)?;
    state.serving()?;
    Ok(Json(json!({"name": model.name, "ready": true})))
}

/// Inference.
#[utoipa::path(post, path = "/v2/models/{name}/infer", tag = "v2", params(("name" = String, Path, description = "Model name"), ("Inference-Header-Content-Length" = Option<u64>, Header, description = "Length of the JSON part when binary data follows")), request_body(
        description = "JSON, or with the binary tensor data extension: the JSON header (its length in `Inference-Header-Content-Length`) followed by the inputs' raw little-endian data",
        content((RestRequest = "application/json"), ("application/octet-stream"))
    ),
    responses(
        (status = 200, description = "Outputs; binary ones after the JSON header (`Inference-Header-Content-Length`)",
            content((RestResponse = "application/json"), ("application/octet-stream"))),
        (status = 400, description = "Bad input: datatype, shape, data, parameters", body = V2ErrorBody),
        (status = 404, description = "No such model or version", body = V2ErrorBody),
        (status = 413, description = "Body or batch over the limits", body = V2ErrorBody),
        (status = 429, description = "The model's queue is full (Retry-After)", body = V2ErrorBody),
        (status = 503, description = "Loading models or shutting down", body = V2ErrorBody),
        (status = 504, description = "The deadline passed before the inputs were computed", body = V2ErrorBody),
    ))]
async fn model_infer(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    infer_answer(state, name, String::new(), headers, body).await
}

/// Inference at a version.
#[utoipa::path(post, path = "/v2/models/{name}/versions/{version}/infer", tag = "v2", params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "Model version (each model has one: \"1\")"), ("Inference-Header-Content-Length" = Option<u64>, Header, description = "Length of the JSON part when binary data follows")), request_body(
        description = "JSON, or with the binary tensor data extension: the JSON header (its length in `Inference-Header-Content-Length`) followed by the inputs' raw little-endian data",
        content((RestRequest = "application/json"), ("application/octet-stream"))
    ),
    responses(
        (status = 200, description = "Outputs; binary ones after the JSON header (`Inference-Header-Content-Length`)",
            content((RestResponse = "application/json"), ("application/octet-stream"))),
        (status = 400, description = "Bad input: datatype, shape, data, parameters", body = V2ErrorBody),
        (status = 404, description = "No such model or version", body = V2ErrorBody),
        (status = 413, description = "Body or batch over the limits", body = V2ErrorBody),
        (status = 429, description = "The model's queue is full (Retry-After)", body = V2ErrorBody),
        (status = 503, description = "Loading models or shutting down", body = V2ErrorBody),
        (status = 504, description = "The deadline passed before the inputs were computed", body = V2ErrorBody),
    ))]
async fn model_infer_at(
    State(state): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    infer_answer(state, name, version, headers, body).await
}

async fn infer_answer(
    state: Arc<AppState>,
    name: String,
    version: String,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let mut label = "unknown".to_string();
    let result = handle_infer(&state, &name, &version, headers, body, started, &mut label).await;
    let (status, response) = match result {
        Ok(response) => (StatusCode::OK, response),
        Err(e) => {
            tracing::info!(route = INFER_ROUTE, status = e.status().as_u16(), code = e.0.code, error = %e.0.message, "request refused");
            (e.status(), e.into_response())
        }
    };
    state.record(&label, INFER_ROUTE, status, started);
    response
}

/// An inference request.
#[derive(Deserialize, ToSchema)]
struct RestRequest {
    #[serde(default)]
    id: Option<String>,
    /// Fovea's: confidence, iou, max_detections, classes, agnostic,
    /// timeout_ms; the protocol's: binary_data_output, timeout (µs), ...
    #[serde(default)]
    #[schema(value_type = Object)]
    parameters: BTreeMap<String, Value>,
    inputs: Vec<RestInput>,
    #[serde(default)]
    outputs: Option<Vec<RestOutput>>,
}

/// An input tensor: `pixel_values` (FP32), DETR's `pixel_mask`, or
/// `images` (BYTES: encoded images; base64 strings in JSON).
#[derive(Deserialize, ToSchema)]
struct RestInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    /// `binary_data_size`: this input's bytes in the binary part.
    #[serde(default)]
    #[schema(value_type = Object)]
    parameters: BTreeMap<String, Value>,
    /// Nested row-major or flat.
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>)]
    data: Option<Value>,
}

/// An output asked for.
#[derive(Deserialize, ToSchema)]
struct RestOutput {
    name: String,
    /// `binary_data` (bool), `classification` (N best classes).
    #[serde(default)]
    #[schema(value_type = Object)]
    parameters: BTreeMap<String, Value>,
}

/// Output data in JSON: f32 values keep their shortest exact form.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
enum JsonData {
    Fp32(Vec<f32>),
    Int(Vec<i64>),
    Text(Vec<String>),
}

/// An output tensor; with `binary_data_size` in its parameters, its data
/// is in the binary part.
#[derive(Serialize, ToSchema)]
struct RestOutputTensor {
    name: String,
    datatype: &'static str,
    shape: Vec<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    parameters: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<JsonData>,
}

/// An inference response.
#[derive(Serialize, ToSchema)]
struct RestResponse {
    model_name: String,
    model_version: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    outputs: Vec<RestOutputTensor>,
}

async fn handle_infer(
    state: &Arc<AppState>,
    name: &str,
    version: &str,
    headers: HeaderMap,
    body: Body,
    started: Instant,
    label: &mut String,
) -> Result<Response, V2Error> {
    state.serving()?;
    let model = find_model(state, name, version)?;
    label.clone_from(&model.name);
    if let Some(encoding) = headers.get(header::CONTENT_ENCODING) {
        if encoding.as_bytes() != b"identity" {
            return Err(bad(format!(
                "Content-Encoding {encoding:?} is not supported: send the request uncompressed"
            )));
        }
    }
    let body = read_body(&headers, body, state.limits.max_body_bytes).await?;
    let (json_part, binary) = split_body(&headers, &body)?;
    let request: RestRequest = serde_json::from_slice(json_part)
        .map_err(|e| bad(format!("the request is not a valid inference request: {e}")))?;

    let inputs = decode_inputs(request.inputs, binary)?;
    let mut binary_outputs = BTreeMap::new();
    let outputs = match request.outputs {
        None => None,
        Some(outputs) => Some(
            outputs
                .into_iter()
                .map(|o| {
                    let (wanted, binary) = requested_output(o)?;
                    if let Some(b) = binary {
                        binary_outputs.insert(wanted.name.clone(), b);
                    }
                    Ok(wanted)
                })
                .collect::<Result<Vec<_>, V2Error>>()?,
        ),
    };
    let binary_default = match request.parameters.get("binary_data_output") {
        None => false,
        Some(v) => v
            .as_bool()
            .ok_or_else(|| bad("binary_data_output must be true or false"))?,
    };
    let request_id = request.id;
    let infer_request = InferRequest {
        inputs,
        outputs,
        parameters: request.parameters,
    };
    let tensors = infer(state, &model, infer_request, started, None).await?;

    let mut binary_tail: Vec<u8> = Vec::new();
    let outputs = tensors
        .into_iter()
        .map(|t| {
            let as_binary = binary_outputs
                .get(&t.name)
                .copied()
                .unwrap_or(binary_default);
            let (parameters, data) = if as_binary {
                let raw = encode_raw(&t.data);
                let size = raw.len();
                binary_tail.extend_from_slice(&raw);
                (Some(json!({"binary_data_size": size})), None)
            } else {
                (None, Some(json_data(t.data)))
            };
            RestOutputTensor {
                name: t.name,
                datatype: t.datatype.as_str(),
                shape: t.shape,
                parameters,
                data,
            }
        })
        .collect();
    let answer = RestResponse {
        model_name: model.name.clone(),
        model_version: protocol::MODEL_VERSION,
        id: request_id,
        outputs,
    };
    let json = serde_json::to_vec(&answer).expect("serialisable");
    if binary_tail.is_empty() {
        return Ok(([(header::CONTENT_TYPE, "application/json")], json).into_response());
    }
    let header_length = json.len();
    let mut body = json;
    body.extend_from_slice(&binary_tail);
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (
                header::HeaderName::from_static(HEADER_LENGTH),
                HeaderValue::from(header_length),
            ),
        ],
        body,
    )
        .into_response())
}

/// The JSON part and the binary part of a body
/// (`Inference-Header-Content-Length` says where they meet).
fn split_body<'a>(headers: &HeaderMap, body: &'a Bytes) -> Result<(&'a [u8], &'a [u8]), V2Error> {
    let Some(value) = headers.get(HEADER_LENGTH) else {
        return Ok((body, &[]));
    };
    let length = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .ok_or_else(|| {
            bad(format!(
                "Inference-Header-Content-Length {value:?} is not a length"
            ))
        })?;
    if length > body.len() {
        return Err(bad(format!(
            "Inference-Header-Content-Length is {length} but the body has only {} bytes",
            body.len()
        )));
    }
    Ok(body.split_at(length))
}

/// Each input's data, from its `binary_data_size` bytes of the binary part
/// (in input order) or its JSON `data`.
fn decode_inputs(inputs: Vec<RestInput>, binary: &[u8]) -> Result<Vec<InputTensor>, V2Error> {
    let mut rest = binary;
    let mut decoded = Vec::with_capacity(inputs.len());
    for input in inputs {
        let at = |e: String| bad(format!("input {:?}: {e}", input.name));
        let datatype = DataType::parse(&input.datatype).map_err(at)?;
        let (shape, count) = checked_shape(&input.shape).map_err(at)?;
        for key in input.parameters.keys() {
            if key != "binary_data_size" {
                return Err(at(format!("unknown input parameter {key:?}")));
            }
        }
        let data = match input.parameters.get("binary_data_size") {
            Some(size) => {
                let size = size
                    .as_u64()
                    .and_then(|s| usize::try_from(s).ok())
                    .ok_or_else(|| {
                        at(format!("binary_data_size must be a byte count, got {size}"))
                    })?;
                if size > rest.len() {
                    return Err(at(format!(
                        "binary_data_size is {size} but only {} bytes of binary data remain (truncated?)",
                        rest.len()
                    )));
                }
                let (mine, tail) = rest.split_at(size);
                rest = tail;
                if input.data.is_some() {
                    return Err(at("both binary data and JSON data".into()));
                }
                decode_raw(datatype, count, mine).map_err(at)?
            }
            None => {
                let data = input.data.as_ref().ok_or_else(|| at("no data".into()))?;
                json_tensor(datatype, count, data).map_err(at)?
            }
        };
        decoded.push(InputTensor {
            name: input.name,
            datatype,
            shape,
            data,
        });
    }
    if !rest.is_empty() {
        return Err(bad(format!(
            "{} bytes of binary data belong to no input",
            rest.len()
        )));
    }
    Ok(decoded)
}

/// Elements of JSON `data`, nested row-major or flat. `BYTES` elements are
/// strings holding base64 (encoded images are not text).
fn json_tensor(datatype: DataType, count: usize, data: &Value) -> Result<TensorData, String> {
    let mut leaves = Vec::new();
    flatten(data, &mut leaves, count)?;
    if leaves.len() != count {
        return Err(format!(
            "{} elements for {count} in the shape",
            leaves.len()
        ));
    }
    let wrong = |v: &Value| format!("{v} is not a {} element", datatype.as_str());
    Ok(match datatype {
        DataType::Fp32 => TensorData::Fp32(
            leaves
                .iter()
                .map(|v| v.as_f64().map(|x| x as f32).ok_or_else(|| wrong(v)))
                .collect::<Result<_, _>>()?,
        ),
        DataType::Bytes => TensorData::Bytes(
            leaves
                .iter()
                .map(|v| {
                    let text = v.as_str().ok_or_else(|| wrong(v))?;
                    base64::engine::general_purpose::STANDARD
                        .decode(text.trim())
                        .map(Bytes::from)
                        .map_err(|e| format!("a BYTES element is not base64: {e}"))
                })
                .collect::<Result<_, _>>()?,
        ),
        DataType::Fp16 | DataType::Bf16 | DataType::Fp64 => {
            return Err(format!(
                "{} data is not supported: send FP32",
                datatype.as_str()
            ))
        }
        _ => TensorData::Int(
            leaves
                .iter()
                .map(|v| match v {
                    Value::Bool(b) => Ok(*b as i64),
                    _ => v.as_i64().ok_or_else(|| wrong(v)),
                })
                .collect::<Result<_, _>>()?,
        ),
    })
}

/// Leaves of nested arrays, refusing more than `limit` of them.
fn flatten<'a>(value: &'a Value, out: &mut Vec<&'a Value>, limit: usize) -> Result<(), String> {
    match value {
        Value::Array(items) => items.iter().try_for_each(|v| flatten(v, out, limit)),
        leaf => {
            if out.len() == limit {
                return Err(format!("more elements than the {limit} in the shape"));
            }
            out.push(leaf);
            Ok(())
        }
    }
}

/// A requested output and whether it is wanted in binary.
fn requested_output(output: RestOutput) -> Result<(RequestedOutput, Option<bool>), V2Error> {
    let mut classification = None;
    let mut binary = None;
    for (key, value) in &output.parameters {
        match key.as_str() {
            "classification" => {
                let n = value
                    .as_u64()
                    .ok_or_else(|| bad(format!("classification must be a count, got {value}")))?;
                classification = Some(n as usize);
            }
            "binary_data" => {
                binary = Some(value.as_bool().ok_or_else(|| {
                    bad(format!("binary_data must be true or false, got {value}"))
                })?);
            }
            other => {
                return Err(bad(format!(
                    "output {:?}: unknown parameter {other:?}",
                    output.name
                )))
            }
        }
    }
    Ok((
        RequestedOutput {
            name: output.name,
            classification,
        },
        binary,
    ))
}

fn json_data(data: TensorData) -> JsonData {
    match data {
        TensorData::Fp32(v) => JsonData::Fp32(v),
        TensorData::Int(v) => JsonData::Int(v),
        TensorData::Bytes(v) => JsonData::Text(
            v.iter()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(json: Value) -> RestInput {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn json_data_nested_or_flat() {
        let nested = json!([[1.0, 2.5], [3.0, -4.0]]);
        let flat = json!([1.0, 2.5, 3.0, -4.0]);
        let expected = TensorData::Fp32(vec![1.0, 2.5, 3.0, -4.0]);
        assert_eq!(json_tensor(DataType::Fp32, 4, &nested).unwrap(), expected);
        assert_eq!(json_tensor(DataType::Fp32, 4, &flat).unwrap(), expected);
        assert!(json_tensor(DataType::Fp32, 3, &flat)
            .unwrap_err()
            .contains("more elements"));
        assert!(json_tensor(DataType::Fp32, 5, &flat).is_err());
        assert!(json_tensor(DataType::Fp32, 1, &json!(["x"])).is_err());
        assert_eq!(
            json_tensor(DataType::Bool, 2, &json!([true, false])).unwrap(),
            TensorData::Int(vec![1, 0])
        );
        assert_eq!(
            json_tensor(DataType::Bytes, 1, &json!(["aGk="])).unwrap(),
            TensorData::Bytes(vec![Bytes::from_static(b"hi")])
        );
    }

    #[test]
    fn binary_inputs_are_cut_from_the_tail() {
        let raw: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        let one = || {
            input(
                json!({"name": "pixel_values", "shape": [1, 2], "datatype": "FP32",
                         "parameters": {"binary_data_size": 8}}),
            )
        };
        let decoded = decode_inputs(vec![one()], &raw).unwrap();
        assert_eq!(decoded[0].data, TensorData::Fp32(vec![1.0, 2.0]));
        // Truncated, left over, wrong size for the shape.
        let e = decode_inputs(vec![one()], &raw[..6]).err().unwrap();
        assert!(e.0.message.contains("truncated"), "{}", e.0.message);
        let mut longer = raw.clone();
        longer.push(0);
        assert!(decode_inputs(vec![one()], &longer).is_err());
        let huge = input(
            json!({"name": "pixel_values", "shape": [100000, 3, 4096, 4096],
                                "datatype": "FP32", "parameters": {"binary_data_size": 8}}),
        );
        assert!(decode_inputs(vec![huge], &raw).is_err());
    }

    #[test]
    fn the_header_length_must_fit_the_body() {
        let body = Bytes::from_static(b"{}abcd");
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_LENGTH, HeaderValue::from(2));
        let (json, binary) = split_body(&headers, &body).unwrap();
        assert_eq!((json, binary), (&b"{}"[..], &b"abcd"[..]));
        headers.insert(HEADER_LENGTH, HeaderValue::from(7));
        assert!(split_body(&headers, &body).is_err());
        headers.insert(HEADER_LENGTH, HeaderValue::from_static("x"));
        assert!(split_body(&headers, &body).is_err());
    }

    #[test]
    fn output_parameters() {
        let (o, binary) = requested_output(
            serde_json::from_value(
                json!({"name": "logits", "parameters": {"classification": 3, "binary_data": true}}),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!((o.classification, binary), (Some(3), Some(true)));
        assert!(requested_output(
            serde_json::from_value(json!({"name": "logits", "parameters": {"x": 1}})).unwrap()
        )
        .is_err());
    }

    #[test]
    fn errors_are_the_protocols() {
        let e = V2Error(ApiError::invalid_option("no"));
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        let e = V2Error(ApiError::model_not_found("m"));
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
    }
}
