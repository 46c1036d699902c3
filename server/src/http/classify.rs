//! `POST /v1/classify`.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use fovea_model_core::topk::softmax_topk;
use serde_json::{json, Value};

use super::error::ApiError;
use super::infer::{infer, read_request, Route};
use super::input::Options;
#[allow(unused_imports)] // read by the OpenAPI derive
use super::openapi::{Base64Images, ClassifyResponse, ErrorBody};
use super::AppState;
use crate::network::Task;
use crate::registry::LoadedModel;

const ROUTE: Route = Route {
    path: "/v1/classify",
    task: Task::Classification,
    options: OPTIONS,
};
const OPTIONS: &[&str] = &["model", "top_k", "timeout_ms"];
const DEFAULT_TOP_K: u64 = 5;

/// The `top_k` option: 1 to the model's classes, 5 (or fewer classes) unset.
pub fn top_k(options: &Options, model: &LoadedModel) -> Result<usize, ApiError> {
    let classes = model.num_classes as u64;
    Ok(options
        .integer("top_k", 1, classes)?
        .unwrap_or(DEFAULT_TOP_K.min(classes)) as usize)
}

/// One class of an image's answer.
pub struct Prediction<'a> {
    pub class_id: usize,
    pub label: &'a str,
    pub score: f32,
}

/// The `top_k` likeliest classes of a classifier's logits, best first.
pub fn predictions<'a>(logits: &[f32], top_k: usize, labels: &'a [String]) -> Vec<Prediction<'a>> {
    softmax_topk(logits, top_k)
        .into_iter()
        .map(|(class_id, score)| Prediction {
            class_id,
            label: labels.get(class_id).map(String::as_str).unwrap_or(""),
            score,
        })
        .collect()
}

/// Classify one or more images.
#[utoipa::path(
    method(post, put),
    path = "/v1/classify",
    tag = "v1",
    params(
        ("model" = Option<String>, Query, description = "Model name; default: the first classifier"),
        ("top_k" = Option<u32>, Query, description = "Predictions per image (default 5)"),
        ("timeout_ms" = Option<u64>, Query, description = "Deadline (default: the model's request timeout)"),
    ),
    request_body(
        description = "One encoded image as the body, several as multipart/form-data parts, or JSON with base64 images",
        content(
            ("image/jpeg"), ("image/png"), ("image/webp"), ("application/octet-stream"),
            ("multipart/form-data"),
            (Base64Images = "application/json")
        )
    ),
    responses(
        (status = 200, description = "One result per image, in order", body = ClassifyResponse),
        (status = 400, description = "No image, an image that does not decode, or bad input", body = ErrorBody),
        (status = 404, description = "No model of that name", body = ErrorBody),
        (status = 413, description = "Body, image or image count over the limits", body = ErrorBody),
        (status = 415, description = "Unsupported Content-Type or image format", body = ErrorBody),
        (status = 422, description = "An invalid option, or a model of the other task", body = ErrorBody),
        (status = 429, description = "The model's queue is full (Retry-After)", body = ErrorBody),
        (status = 503, description = "Loading models or shutting down", body = ErrorBody),
        (status = 504, description = "The deadline passed before the images were computed", body = ErrorBody),
    )
)]
pub async fn classify(
    State(state): State<Arc<AppState>>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let mut model_label = "unknown".to_string();
    let result = handle(&state, uri, headers, body, started, &mut model_label).await;
    ROUTE.answer(
        &state,
        &model_label,
        started,
        result.map(IntoResponse::into_response),
    )
}

async fn handle(
    state: &Arc<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
    started: Instant,
    model_label: &mut String,
) -> Result<Json<Value>, ApiError> {
    let request = read_request(state, &ROUTE, uri, &headers, body, started, model_label).await?;
    let model = request.model.clone();
    let top_k = top_k(&request.options, &model)?;

    let count = request.images.len();
    let (images, timing) = infer(state, request, false).await?;
    let results: Vec<Value> = images
        .iter()
        .map(|image| {
            let predictions: Vec<Value> = predictions(&image.output, top_k, &model.labels)
                .into_iter()
                .map(|p| json!({"class_id": p.class_id, "label": p.label, "score": p.score}))
                .collect();
            json!({ "predictions": predictions })
        })
        .collect();

    tracing::info!(
        route = ROUTE.path,
        model = %model.name,
        images = count,
        batch_size = timing.batch_sizes.iter().max().copied().unwrap_or(0),
        preprocess_ms = timing.preprocess_ms,
        queue_ms = timing.queue_ms,
        inference_ms = timing.inference_ms,
        total_ms = started.elapsed().as_secs_f64() * 1e3,
        status = 200,
        "classified"
    );
    Ok(Json(json!({
        "model": model.name,
        "results": results,
        "timing": timing.to_json(started),
    })))
}
