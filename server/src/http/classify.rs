//! `POST /v1/classify`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use fovea_model_core::image_input::{decode_image, DecodeLimits};
use fovea_model_core::topk::softmax_topk;
use serde_json::{json, Value};

use super::error::ApiError;
use super::input::{parse_request, read_body, Options};
use super::AppState;
use crate::batcher::JobTiming;
use crate::registry::LoadedModel;

const ROUTE: &str = "/v1/classify";
const OPTIONS: &[&str] = &["model", "top_k", "timeout_ms"];
const DEFAULT_TOP_K: u64 = 5;

pub async fn classify(
    State(state): State<Arc<AppState>>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let mut model_label = "unknown".to_string();
    let result = handle(&state, uri, headers, body, started, &mut model_label).await;
    let (status, response) = match result {
        Ok(response) => (StatusCode::OK, response.into_response()),
        Err(e) => {
            tracing::info!(route = ROUTE, status = e.status.as_u16(), code = e.code, error = %e.message, "request refused");
            (e.status, e.into_response())
        }
    };
    state.record(&model_label, ROUTE, status, started);
    response
}

async fn handle(
    state: &Arc<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
    started: Instant,
    model_label: &mut String,
) -> Result<Json<Value>, ApiError> {
    let registry = state.serving()?.clone();
    let options = Options::from_query(uri.query())?;
    let body = read_body(&headers, body, state.limits.max_body_bytes).await?;
    let request = parse_request(&headers, body, options).await?;
    let options = &request.options;
    options.check_known(OPTIONS)?;

    let name = options.string("model")?;
    let model = registry
        .get(name.as_deref())
        .ok_or_else(|| ApiError::model_not_found(name.as_deref().unwrap_or("")))?
        .clone();
    model_label.clone_from(&model.name);
    let top_k = options
        .integer("top_k", 1, model.num_classes as u64)?
        .unwrap_or(DEFAULT_TOP_K.min(model.num_classes as u64)) as usize;
    let timeout = options
        .integer("timeout_ms", 1, 3_600_000)?
        .map(Duration::from_millis)
        .unwrap_or(model.settings().request_timeout);
    let deadline = started + timeout;

    let count = request.images.len();
    if count > state.limits.max_images_per_request {
        return Err(ApiError::payload_too_large(format!(
            "{count} images in one request; at most {} are accepted",
            state.limits.max_images_per_request
        )));
    }

    let prep_started = Instant::now();
    let inputs = preprocess_all(state, &model, request.images).await?;
    let preprocess_ms = prep_started.elapsed().as_secs_f64() * 1e3;

    let receivers = model.batcher.submit(inputs, deadline)?;
    let mut results = Vec::with_capacity(count);
    let mut timings: Vec<JobTiming> = Vec::with_capacity(count);
    for rx in receivers {
        // The worker answers expired jobs itself; the timeout here is a
        // safety net should it be stuck in a long forward pass.
        let answer = tokio::time::timeout_at((deadline + Duration::from_secs(1)).into(), rx).await;
        let (logits, timing) = match answer {
            Err(_) => return Err(ApiError::deadline_exceeded()),
            Ok(Err(_)) => return Err(ApiError::shutting_down()),
            Ok(Ok(result)) => result?,
        };
        let predictions: Vec<Value> = softmax_topk(&logits, top_k)
            .into_iter()
            .map(|(class_id, score)| {
                json!({
                    "class_id": class_id,
                    "label": model.labels.get(class_id).map(String::as_str).unwrap_or(""),
                    "score": score,
                })
            })
            .collect();
        results.push(json!({ "predictions": predictions }));
        timings.push(timing);
    }

    let queue_ms = timings
        .iter()
        .map(|t| t.queued.as_secs_f64())
        .fold(0.0, f64::max)
        * 1e3;
    let inference_ms = timings
        .iter()
        .map(|t| t.inference.as_secs_f64())
        .fold(0.0, f64::max)
        * 1e3;
    let batch_sizes: Vec<usize> = timings.iter().map(|t| t.batch_size).collect();
    let total_ms = started.elapsed().as_secs_f64() * 1e3;
    tracing::info!(
        route = ROUTE,
        model = %model.name,
        images = count,
        batch_size = batch_sizes.iter().max().copied().unwrap_or(0),
        preprocess_ms,
        queue_ms,
        inference_ms,
        total_ms,
        status = 200,
        "classified"
    );
    Ok(Json(json!({
        "model": model.name,
        "results": results,
        "timing": {
            "preprocess_ms": preprocess_ms,
            "queue_ms": queue_ms,
            "inference_ms": inference_ms,
            "total_ms": total_ms,
            "batch_sizes": batch_sizes,
        },
    })))
}

/// Decode and preprocess every image on the blocking pool, in parallel
/// with each other and with the model's forward passes.
async fn preprocess_all(
    state: &Arc<AppState>,
    model: &Arc<LoadedModel>,
    images: Vec<Bytes>,
) -> Result<Vec<Vec<f32>>, ApiError> {
    let count = images.len();
    let limits = DecodeLimits::with_max_pixels(state.limits.max_image_pixels);
    let tasks: Vec<_> = images
        .into_iter()
        .map(|bytes| {
            let model = model.clone();
            let histogram = state
                .metrics
                .preprocess_duration
                .with_label_values(&[&model.name]);
            tokio::task::spawn_blocking(move || {
                let start = Instant::now();
                let decoded = decode_image(&bytes, &limits)?;
                let input = model
                    .preprocess
                    .apply(&decoded.image)
                    .map_err(|e| ApiError::bad_request(e.to_string()))?;
                histogram.observe(start.elapsed().as_secs_f64());
                Ok::<_, ApiError>(input)
            })
        })
        .collect();
    let mut inputs = Vec::with_capacity(count);
    for (i, task) in futures::future::join_all(tasks)
        .await
        .into_iter()
        .enumerate()
    {
        let input = task
            .map_err(|_| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "preprocessing failed",
                )
            })?
            .map_err(|e| e.for_image(i, count))?;
        inputs.push(input);
    }
    Ok(inputs)
}
