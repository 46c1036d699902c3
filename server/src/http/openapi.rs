//! The REST API as OpenAPI 3, served at `/openapi.json`. Each route's
//! path, methods and answers are declared on its handler (`#[utoipa::path]`)
//! and the router is built from those declarations (`utoipa_axum`), so the
//! document lists exactly the routes the server has.
//!
//! The schemas below describe `/v1`'s JSON bodies, built in the handlers;
//! `/v2`'s request and response types are the handlers' own.

#![allow(dead_code)] // Schema types: read by the derive, never built.

use utoipa::{OpenApi, ToSchema};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Fovea",
        description = "Image classification and object detection. `/v1` is Fovea's own API \
                       (encoded images in, predictions and boxes out); `/v2` is the Open \
                       Inference Protocol (KServe V2), as Triton's and KServe's clients speak it.",
        license(name = "Apache-2.0")
    ),
    tags(
        (name = "v1", description = "Fovea's image API"),
        (name = "v2", description = "Open Inference Protocol (KServe V2)"),
        (name = "operations", description = "Health, readiness, metrics, this document")
    )
)]
pub struct ApiDoc;

/// A refusal on `/v1`: a stable code and a message for people.
#[derive(ToSchema)]
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(ToSchema)]
pub struct ErrorDetail {
    /// e.g. `invalid_image`, `model_not_found`, `queue_full`.
    code: String,
    message: String,
}

/// A refusal on `/v2`, as the protocol has it.
#[derive(ToSchema)]
pub struct V2ErrorBody {
    error: String,
}

/// Encoded images as base64, with options (the query string's names).
#[derive(ToSchema)]
pub struct Base64Images {
    /// Base64-encoded image files (JPEG, PNG, WebP, BMP, GIF, TIFF).
    images: Option<Vec<String>>,
    /// One base64-encoded image.
    image: Option<String>,
    model: Option<String>,
    timeout_ms: Option<u64>,
}

/// Where a request's time went.
#[derive(ToSchema)]
pub struct Timing {
    preprocess_ms: f64,
    queue_ms: f64,
    inference_ms: f64,
    total_ms: f64,
    /// The size of the batch each image ran in.
    batch_sizes: Vec<u32>,
}

#[derive(ToSchema)]
pub struct Prediction {
    class_id: u32,
    label: String,
    /// Softmax probability.
    score: f32,
}

#[derive(ToSchema)]
pub struct Classification {
    /// Best first.
    predictions: Vec<Prediction>,
}

#[derive(ToSchema)]
pub struct ClassifyResponse {
    model: String,
    /// One per image, in request order.
    results: Vec<Classification>,
    timing: Timing,
}

/// Corners in the original image's pixels.
#[derive(ToSchema)]
pub struct BoxCorners {
    x1: f32,
    y1: f32,
    x2: f32,
    y2: f32,
}

#[derive(ToSchema)]
pub struct Detection {
    class_id: u32,
    label: String,
    score: f32,
    #[schema(rename = "box")]
    corners: BoxCorners,
}

#[derive(ToSchema)]
pub struct ImageDetections {
    width: u32,
    height: u32,
    /// Best first.
    detections: Vec<Detection>,
}

#[derive(ToSchema)]
pub struct DetectResponse {
    model: String,
    results: Vec<ImageDetections>,
    timing: Timing,
}

/// A loaded model, as `/v1/models` lists it.
#[derive(ToSchema)]
pub struct ModelDescription {
    name: String,
    /// `classification` or `detection`.
    task: String,
    family: String,
    variant: String,
    layout: String,
    device: String,
    dtype: String,
    /// `[height, width]`; null where each image keeps its own size (DETR).
    input_size: Option<Vec<u32>>,
    num_classes: u32,
    /// The preprocessing, `kind` first (`classify`, `letterbox`, `detr`).
    #[schema(value_type = Object)]
    preprocess: serde_json::Value,
    /// max_batch_size, max_queue_delay_ms, queue_capacity, request_timeout_ms.
    #[schema(value_type = Object)]
    batching: serde_json::Value,
    source: String,
}

#[derive(ToSchema)]
pub struct ModelList {
    models: Vec<ModelDescription>,
}

#[derive(ToSchema)]
pub struct Status {
    /// `live` or `ready`.
    status: String,
}
