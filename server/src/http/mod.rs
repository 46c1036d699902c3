//! The HTTP front end (axum).

pub mod classify;
pub mod detect;
pub mod error;
pub mod infer;
pub mod input;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::config::Limits;
use crate::metrics::Metrics;
use crate::registry::{LoadedModel, Registry};
use error::ApiError;

/// What every handler shares.
pub struct AppState {
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    /// Set once every model is loaded and warmed up.
    pub registry: OnceLock<Arc<Registry>>,
    pub shutting_down: AtomicBool,
}

impl AppState {
    pub fn new(metrics: Arc<Metrics>, limits: Limits) -> Self {
        AppState {
            metrics,
            limits,
            registry: OnceLock::new(),
            shutting_down: AtomicBool::new(false),
        }
    }

    /// The registry, if the server takes work now.
    pub fn serving(&self) -> Result<&Arc<Registry>, ApiError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ApiError::shutting_down());
        }
        self.registry.get().ok_or_else(ApiError::not_ready)
    }

    /// Count and time a finished request.
    pub fn record(&self, model: &str, route: &str, status: StatusCode, started: Instant) {
        self.metrics
            .requests_total
            .with_label_values(&[model, route, status.as_str()])
            .inc();
        self.metrics
            .request_duration
            .with_label_values(&[model, route])
            .observe(started.elapsed().as_secs_f64());
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route(
            "/v1/classify",
            post(classify::classify).put(classify::classify),
        )
        .route(
            "/v1/detect",
            post(detect::detect_route).put(detect::detect_route),
        )
        .route("/v1/models", get(list_models))
        .route("/v1/models/{name}", get(get_model))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            panic_response,
        ))
        .with_state(state)
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal error (logged)",
    )
    .into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

pub fn describe(model: &LoadedModel) -> Value {
    // DETR's input follows each image's aspect ratio: no fixed size.
    let input_size = model.pipeline.fixed_input_size().map(|(h, w)| [h, w]);
    json!({
        "name": model.name,
        "task": model.task,
        "family": model.family,
        "variant": model.variant,
        "layout": model.layout,
        "device": model.device,
        "dtype": model.dtype,
        "input_size": input_size,
        "num_classes": model.num_classes,
        "preprocess": model.pipeline,
        "batching": model.settings(),
        "source": model.source,
    })
}

async fn list_models(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let registry = state.registry.get().ok_or_else(ApiError::not_ready)?;
    let models: Vec<Value> = registry.all().iter().map(|m| describe(m)).collect();
    Ok(Json(json!({ "models": models })))
}

async fn get_model(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let registry = state.registry.get().ok_or_else(ApiError::not_ready)?;
    let model = registry
        .get(Some(&name))
        .ok_or_else(|| ApiError::model_not_found(&name))?;
    Ok(Json(describe(model)))
}

async fn healthz() -> Json<Value> {
    Json(json!({"status": "live"}))
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    match state.serving() {
        Ok(_) => Json(json!({"status": "ready"})).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}
