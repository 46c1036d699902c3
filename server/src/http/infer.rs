//! What `/v1/classify` and `/v1/detect` share: reading the request, picking
//! the model for the task, decoding and preprocessing the images in
//! parallel, and waiting for the batcher's answers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use fovea_model_core::image_input::{decode_image, DecodeLimits};
use fovea_model_core::letterbox::LetterboxTransform;
use image::RgbImage;
use serde_json::{json, Value};

use super::error::ApiError;
use super::input::{parse_request, read_body, Options};
use super::AppState;
use crate::batcher::JobTiming;
use crate::network::{ModelInput, Task};
use crate::registry::{LoadedModel, Lookup, Registry};

/// What a route serves: its path (a metric label), task and options.
pub struct Route {
    pub path: &'static str,
    pub task: Task,
    pub options: &'static [&'static str],
}

impl Route {
    /// The answer to a handled request: a refusal is logged, every answer
    /// counted and timed under the route and model.
    pub fn answer(
        &self,
        state: &AppState,
        model_label: &str,
        started: Instant,
        result: Result<Response, ApiError>,
    ) -> Response {
        let (status, response) = match result {
            Ok(response) => (StatusCode::OK, response),
            Err(e) => {
                tracing::info!(route = self.path, status = e.status.as_u16(), code = e.code, error = %e.message, "request refused");
                (e.status, e.into_response())
            }
        };
        state.record(model_label, self.path, status, started);
        response
    }
}

/// A request read and checked, its model chosen.
pub struct Request {
    pub model: Arc<LoadedModel>,
    pub options: Options,
    pub images: Vec<Bytes>,
    pub deadline: Instant,
}

/// Read the body, check the options against the route's and pick the model.
pub async fn read_request(
    state: &Arc<AppState>,
    route: &Route,
    uri: Uri,
    headers: &HeaderMap,
    body: Body,
    started: Instant,
    model_label: &mut String,
) -> Result<Request, ApiError> {
    // Taken before the body: a request being read when shutdown begins is
    // still answered.
    let registry = state.serving()?.clone();
    let options = Options::from_query(uri.query())?;
    let body = read_body(headers, body, state.limits.max_body_bytes).await?;
    let request = parse_request(headers, body, options).await?;
    let deadline = Deadline {
        started,
        latest: None,
    };
    prepare(
        state,
        &registry,
        route,
        request.options,
        request.images,
        deadline,
        model_label,
    )
}

/// When a request started, and the transport's own deadline if it has one
/// (gRPC's `grpc-timeout`).
#[derive(Clone, Copy, Debug)]
pub struct Deadline {
    pub started: Instant,
    pub latest: Option<Instant>,
}

/// What every front end (HTTP, gRPC) does with a request once read: check
/// its options against the route's, pick the model for the task, set the
/// deadline (`timeout_ms`, else the model's request timeout, and never
/// later than the transport's own deadline) and count the images.
pub fn prepare(
    state: &AppState,
    registry: &Registry,
    route: &Route,
    options: Options,
    images: Vec<Bytes>,
    deadline: Deadline,
    model_label: &mut String,
) -> Result<Request, ApiError> {
    options.check_known(route.options)?;

    let name = options.string("model")?;
    let model = registry
        .for_task(name.as_deref(), route.task)
        .map_err(|e| match e {
            Lookup::NotFound(name) => ApiError::model_not_found(&name),
            other => ApiError::invalid_option(other.to_string()),
        })?
        .clone();
    model_label.clone_from(&model.name);
    let timeout = options
        .integer("timeout_ms", 1, 3_600_000)?
        .map(Duration::from_millis)
        .unwrap_or(model.settings().request_timeout);
    let own_deadline = deadline.started + timeout;

    let count = images.len();
    if count > state.limits.max_images_per_request {
        return Err(ApiError::payload_too_large(format!(
            "{count} images in one request; at most {} are accepted",
            state.limits.max_images_per_request
        )));
    }
    Ok(Request {
        model,
        options,
        images,
        deadline: deadline
            .latest
            .map_or(own_deadline, |latest| latest.min(own_deadline)),
    })
}

/// One image after the forward pass.
pub struct ImageResult {
    /// The model's raw output for the image (flattened).
    pub output: Vec<f32>,
    pub width: u32,
    pub height: u32,
    pub letterbox: Option<LetterboxTransform>,
    /// The decoded image, when asked for (to draw on).
    pub decoded: Option<RgbImage>,
}

/// Where the time of a request went.
pub struct Timing {
    pub preprocess_ms: f64,
    pub queue_ms: f64,
    pub inference_ms: f64,
    pub batch_sizes: Vec<usize>,
}

impl Timing {
    pub fn to_json(&self, started: Instant) -> Value {
        json!({
            "preprocess_ms": self.preprocess_ms,
            "queue_ms": self.queue_ms,
            "inference_ms": self.inference_ms,
            "total_ms": started.elapsed().as_secs_f64() * 1e3,
            "batch_sizes": self.batch_sizes,
        })
    }
}

/// Preprocess every image and run them through the model's batcher.
pub async fn infer(
    state: &Arc<AppState>,
    request: Request,
    keep_decoded: bool,
) -> Result<(Vec<ImageResult>, Timing), ApiError> {
    let model = &request.model;
    let prep_started = Instant::now();
    let prepared = preprocess_all(state, model, request.images, keep_decoded).await?;
    let preprocess_ms = prep_started.elapsed().as_secs_f64() * 1e3;

    let (inputs, metas): (Vec<_>, Vec<_>) = prepared.into_iter().unzip();
    let (outputs, mut timing) = run_inputs(model, inputs, request.deadline).await?;
    timing.preprocess_ms = preprocess_ms;
    let results = outputs
        .into_iter()
        .zip(metas)
        .map(|(output, meta)| ImageResult { output, ..meta })
        .collect();
    Ok((results, timing))
}

/// Run prepared inputs through the model's batcher and wait for each
/// one's raw output (in order). `preprocess_ms` is left at zero.
pub async fn run_inputs(
    model: &LoadedModel,
    inputs: Vec<ModelInput>,
    deadline: Instant,
) -> Result<(Vec<Vec<f32>>, Timing), ApiError> {
    let receivers = model.batcher.submit(inputs, deadline)?;
    let mut outputs = Vec::with_capacity(receivers.len());
    let mut timings: Vec<JobTiming> = Vec::with_capacity(receivers.len());
    for rx in receivers {
        // The worker answers expired jobs itself; the timeout here is a
        // safety net should it be stuck in a long forward pass.
        let safety = (deadline + Duration::from_secs(1)).into();
        let (output, timing) = match tokio::time::timeout_at(safety, rx).await {
            Err(_) => return Err(ApiError::deadline_exceeded()),
            Ok(Err(_)) => return Err(ApiError::shutting_down()),
            Ok(Ok(result)) => result?,
        };
        outputs.push(output);
        timings.push(timing);
    }
    let longest = |f: fn(&JobTiming) -> Duration| {
        timings
            .iter()
            .map(|t| f(t).as_secs_f64())
            .fold(0.0, f64::max)
            * 1e3
    };
    let timing = Timing {
        preprocess_ms: 0.0,
        queue_ms: longest(|t| t.queued),
        inference_ms: longest(|t| t.inference),
        batch_sizes: timings.iter().map(|t| t.batch_size).collect(),
    };
    Ok((outputs, timing))
}

/// Decode and preprocess every image on the blocking pool, in parallel
/// with each other and with the model's forward passes.
pub async fn preprocess_all(
    state: &Arc<AppState>,
    model: &Arc<LoadedModel>,
    images: Vec<Bytes>,
    keep_decoded: bool,
) -> Result<Vec<(ModelInput, ImageResult)>, ApiError> {
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
                let decoded = decode_image(&bytes, &limits)?.image;
                let prepared = model
                    .pipeline
                    .apply(&decoded)
                    .map_err(|e| ApiError::bad_request(e.to_string()))?;
                histogram.observe(start.elapsed().as_secs_f64());
                let meta = ImageResult {
                    output: Vec::new(),
                    width: decoded.width(),
                    height: decoded.height(),
                    letterbox: prepared.letterbox,
                    decoded: keep_decoded.then_some(decoded),
                };
                Ok::<_, ApiError>((prepared.input, meta))
            })
        })
        .collect();
    let mut prepared = Vec::with_capacity(count);
    for (i, task) in futures::future::join_all(tasks)
        .await
        .into_iter()
        .enumerate()
    {
        let one = task
            .map_err(|_| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "preprocessing failed",
                )
            })?
            .map_err(|e| e.for_image(i, count))?;
        prepared.push(one);
    }
    Ok(prepared)
}
