//! `POST /v1/detect`: boxes as JSON, or the image with the boxes drawn
//! (`Accept: image/jpeg` or `render=true`).

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use fovea_model_core::detection::{DetectOptions, Detection};
use fovea_model_core::render::{encode_jpeg, render};
use serde_json::{json, Value};

use super::error::ApiError;
use super::infer::{infer, read_request, ImageResult, Route};
use super::input::Options;
#[allow(unused_imports)] // read by the OpenAPI derive
use super::openapi::{Base64Images, DetectResponse, ErrorBody};
use super::AppState;
use crate::network::{Decoder, Task};
use crate::postprocess::{class_filter, detect, detection_json};
use crate::registry::LoadedModel;

const ROUTE: Route = Route {
    path: "/v1/detect",
    task: Task::Detection,
    options: OPTIONS,
};
const OPTIONS: &[&str] = &[
    "model",
    "confidence",
    "iou",
    "max_detections",
    "classes",
    "agnostic",
    "render",
    "timeout_ms",
];
const DEFAULT_IOU: f64 = 0.45;
const DEFAULT_MAX_DETECTIONS: u64 = 300;
const MAX_DETECTIONS: u64 = 10_000;
const JPEG_QUALITY: u8 = 90;

/// Detect objects in one or more images; or draw them on one image.
#[utoipa::path(
    method(post, put),
    path = "/v1/detect",
    tag = "v1",
    params(
        ("model" = Option<String>, Query, description = "Model name; default: the first detector"),
        ("confidence" = Option<f32>, Query, description = "Lowest score kept (default: YOLO 0.25, DETR 0.5)"),
        ("iou" = Option<f32>, Query, description = "NMS IoU threshold (YOLO; default 0.45)"),
        ("max_detections" = Option<u32>, Query, description = "Per image (default 300)"),
        ("classes" = Option<String>, Query, description = "Comma-separated class names or ids"),
        ("agnostic" = Option<bool>, Query, description = "NMS across classes (YOLO)"),
        ("render" = Option<bool>, Query, description = "Answer the image with the boxes drawn (JPEG)"),
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
        (status = 200, description = "Boxes per image, in order; or the drawn JPEG (`render=true` or `Accept: image/jpeg`)",
            content((DetectResponse = "application/json"), ("image/jpeg"))),
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
pub async fn detect_route(
    State(state): State<Arc<AppState>>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let mut model_label = "unknown".to_string();
    let result = handle(&state, uri, headers, body, started, &mut model_label).await;
    ROUTE.answer(&state, &model_label, started, result)
}

/// Does the client want a picture back? Yes when the Accept header ranks
/// `image/jpeg` (or `image/*`) above JSON: by q-value, JSON winning ties and
/// `*/*` counting as JSON, the default answer.
fn wants_image(headers: &HeaderMap) -> bool {
    let mut image_q: f32 = 0.0;
    let mut json_q: f32 = 0.0;
    for item in headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
    {
        let mut parts = item.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0)
            .clamp(0.0, 1.0);
        match media.as_str() {
            "image/jpeg" | "image/*" => image_q = image_q.max(q),
            "application/json" | "application/*" | "*/*" => json_q = json_q.max(q),
            _ => {}
        }
    }
    image_q > json_q
}

async fn handle(
    state: &Arc<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
    started: Instant,
    model_label: &mut String,
) -> Result<Response, ApiError> {
    let request = read_request(state, &ROUTE, uri, &headers, body, started, model_label).await?;
    let model = request.model.clone();
    let detect_options = detect_options(&request.options, &model)?;
    // An explicit `render` wins over the Accept header.
    let render_image = request
        .options
        .boolean("render")?
        .unwrap_or_else(|| wants_image(&headers));
    let count = request.images.len();
    if render_image && count != 1 {
        return Err(ApiError::invalid_option(format!(
            "a drawn image answers one image per request; this one has {count}"
        )));
    }

    let (images, timing) = infer(state, request, render_image).await?;
    let (mut images, per_image) = detect_all(state, &model, images, detect_options).await?;
    let answer = if render_image {
        let decoded = images.swap_remove(0).decoded.expect("kept for drawing");
        let found = per_image.into_iter().next().unwrap_or_default();
        let detections = found.len();
        let labels = model.labels.clone();
        // Drawing is CPU work: off the async workers.
        let jpeg = tokio::task::spawn_blocking(move || {
            encode_jpeg(&render(&decoded, &found, &labels), JPEG_QUALITY)
        })
        .await
        .map_err(|e| postprocess_failed(&model.name, e))?;
        Answer::Image { jpeg, detections }
    } else {
        let results: Vec<Value> = images
            .iter()
            .zip(&per_image)
            .map(|(image, found)| {
                let detections: Vec<Value> = found
                    .iter()
                    .map(|d| detection_json(d, &model.labels))
                    .collect();
                json!({"width": image.width, "height": image.height, "detections": detections})
            })
            .collect();
        Answer::Json(results)
    };

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
        "detected"
    );
    Ok(match answer {
        Answer::Image { jpeg, detections } => (
            [
                (header::CONTENT_TYPE, "image/jpeg".to_string()),
                (
                    header::HeaderName::from_static("x-fovea-detections"),
                    detections.to_string(),
                ),
            ],
            jpeg,
        )
            .into_response(),
        Answer::Json(results) => Json(json!({
            "model": model.name,
            "results": results,
            "timing": timing.to_json(started),
        }))
        .into_response(),
    })
}

/// The detection options of a request (`confidence`, `iou`,
/// `max_detections`, `classes`, `agnostic`), checked, with the defaults
/// filled in.
pub fn detect_options(options: &Options, model: &LoadedModel) -> Result<DetectOptions, ApiError> {
    let decoder = decoder(model)?;
    let classes = match options.list("classes")? {
        None => None,
        Some(values) => {
            Some(class_filter(&values, &model.labels).map_err(ApiError::invalid_option)?)
        }
    };
    Ok(DetectOptions {
        confidence: options
            .number("confidence", 0.0, 1.0)?
            .map_or_else(|| decoder.default_confidence(), |c| c as f32),
        iou: options.number("iou", 0.0, 1.0)?.unwrap_or(DEFAULT_IOU) as f32,
        max_detections: options
            .integer("max_detections", 1, MAX_DETECTIONS)?
            .unwrap_or(DEFAULT_MAX_DETECTIONS) as usize,
        classes,
        agnostic: options.boolean("agnostic")?.unwrap_or(false),
    })
}

fn decoder(model: &LoadedModel) -> Result<Decoder, ApiError> {
    model.decoder.ok_or_else(|| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "a detection model without a decoder",
        )
    })
}

/// The detections of every image (NMS or DETR's threshold, boxes mapped
/// back to the original pixels), counted in the detections histogram. The
/// images come back alongside, for their sizes and for drawing.
pub async fn detect_all(
    state: &AppState,
    model: &Arc<LoadedModel>,
    images: Vec<ImageResult>,
    options: DetectOptions,
) -> Result<(Vec<ImageResult>, Vec<Vec<Detection>>), ApiError> {
    let decoder = decoder(model)?;
    let histogram = state
        .metrics
        .detections_per_image
        .with_label_values(&[&model.name]);
    // NMS is CPU work: off the async workers.
    tokio::task::spawn_blocking(move || {
        let mut per_image = Vec::with_capacity(images.len());
        for image in &images {
            let found = detect(
                &image.output,
                decoder,
                image.letterbox.as_ref(),
                (image.width, image.height),
                &options,
            )?;
            histogram.observe(found.len() as f64);
            per_image.push(found);
        }
        Ok::<_, anyhow::Error>((images, per_image))
    })
    .await
    .map_err(|e| postprocess_failed(&model.name, e))?
    .map_err(|e| postprocess_failed(&model.name, e))
}

fn postprocess_failed(model: &str, e: impl std::fmt::Display) -> ApiError {
    tracing::error!(model, "postprocessing failed: {e:#}");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "postprocessing failed",
    )
}

enum Answer {
    Image { jpeg: Vec<u8>, detections: usize },
    Json(Vec<Value>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_header_picks_the_answer() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT, v.parse().unwrap());
            wants_image(&h)
        };
        assert!(with("image/jpeg"));
        assert!(with("image/*"));
        assert!(with("image/jpeg;q=0.9, application/json;q=0.5"));
        assert!(with("application/json;q=0.5, image/jpeg"));
        assert!(with("image/jpeg, */*;q=0.8"));
        assert!(!with("application/json"));
        assert!(!with("*/*"));
        assert!(!with("image/png"));
        assert!(!with("application/json, image/jpeg"), "JSON wins ties");
        assert!(!with("image/jpeg;q=0, */*"));
        assert!(!wants_image(&HeaderMap::new()));
    }
}
