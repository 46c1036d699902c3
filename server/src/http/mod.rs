//! The HTTP front end (axum).

pub mod classify;
pub mod detect;
pub mod error;
pub mod infer;
pub mod input;
mod openapi;
mod v2;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde_json::{json, Value};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::config::Limits;
use crate::metrics::Metrics;
use crate::registry::{LoadedModel, Registry};
use error::ApiError;
use openapi::{ErrorBody, ModelDescription, ModelList, Status};

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

/// Every route with its OpenAPI declaration: the router and the document
/// are both made from this, so neither can miss a route of the other.
fn api_routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(classify::classify))
        .routes(routes!(detect::detect_route))
        .routes(routes!(list_models))
        .routes(routes!(get_model))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .routes(routes!(openapi_json))
        .merge(v2::routes())
}

/// The OpenAPI document of the REST API.
pub fn openapi_document() -> &'static utoipa::openapi::OpenApi {
    static DOCUMENT: OnceLock<utoipa::openapi::OpenApi> = OnceLock::new();
    DOCUMENT.get_or_init(|| api_routes().split_for_parts().1)
}

pub fn router(state: Arc<AppState>) -> Router {
    let (routes, _) = api_routes().split_for_parts();
    routes
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

/// The loaded models.
#[utoipa::path(get, path = "/v1/models", tag = "v1", responses(
    (status = 200, body = ModelList),
    (status = 503, description = "Loading models", body = ErrorBody),
))]
async fn list_models(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let registry = state.registry.get().ok_or_else(ApiError::not_ready)?;
    let models: Vec<Value> = registry.all().iter().map(|m| describe(m)).collect();
    Ok(Json(json!({ "models": models })))
}

/// One loaded model.
#[utoipa::path(get, path = "/v1/models/{name}", tag = "v1",
    params(("name" = String, Path, description = "Model name")),
    responses(
        (status = 200, body = ModelDescription),
        (status = 404, body = ErrorBody),
        (status = 503, description = "Loading models", body = ErrorBody),
    ))]
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

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, body = Status)))]
async fn healthz() -> Json<Value> {
    Json(json!({"status": "live"}))
}

/// Readiness: every model is loaded and warmed up, and the server is not
/// shutting down.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses(
    (status = 200, body = Status),
    (status = 503, description = "Loading models or shutting down", body = ErrorBody),
))]
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    match state.serving() {
        Ok(_) => Json(json!({"status": "ready"})).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(get, path = "/metrics", tag = "operations", responses(
    (status = 200, description = "Metrics", content_type = "text/plain; version=0.0.4"),
))]
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

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", responses(
    (status = 200, description = "OpenAPI 3 description of the REST API", content_type = "application/json"),
))]
async fn openapi_json() -> Json<&'static utoipa::openapi::OpenApi> {
    Json(openapi_document())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{Method, Request};
    use tower::ServiceExt;

    /// Ask the router (no models loaded) for `path`: is it a route?
    async fn is_route(method: Method, path: &str) -> bool {
        let limits = Limits {
            max_body_bytes: 1 << 20,
            max_image_pixels: 1 << 24,
            max_images_per_request: 8,
        };
        let state = Arc::new(AppState::new(Arc::new(Metrics::new()), limits));
        let request = Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty())
            .unwrap();
        let response = router(state).oneshot(request).await.unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        let fallback = String::from_utf8_lossy(&body).contains("no such route");
        status != StatusCode::METHOD_NOT_ALLOWED && !fallback
    }

    #[tokio::test]
    async fn every_documented_route_is_served() {
        let document = openapi_document();
        let mut checked = 0;
        for (path, item) in document.paths.paths.iter() {
            let concrete = path.replace("{name}", "m").replace("{version}", "1");
            let operations = [
                (Method::GET, item.get.is_some()),
                (Method::POST, item.post.is_some()),
                (Method::PUT, item.put.is_some()),
            ];
            for (method, documented) in operations {
                assert_eq!(
                    is_route(method.clone(), &concrete).await,
                    documented,
                    "{method} {path}: documented {documented}"
                );
                checked += usize::from(documented);
            }
        }
        // The check itself can fail: an unknown path is no route.
        assert!(!is_route(Method::GET, "/v1/nope").await);
        assert!(checked >= 19, "only {checked} operations documented");
    }

    #[test]
    fn the_api_is_documented() {
        let document = openapi_document();
        let paths: Vec<&str> = document.paths.paths.keys().map(String::as_str).collect();
        for expected in [
            "/v1/classify",
            "/v1/detect",
            "/v1/models",
            "/v1/models/{name}",
            "/healthz",
            "/readyz",
            "/metrics",
            "/openapi.json",
            "/v2",
            "/v2/health/live",
            "/v2/health/ready",
            "/v2/models/{name}",
            "/v2/models/{name}/ready",
            "/v2/models/{name}/infer",
            "/v2/models/{name}/versions/{version}",
            "/v2/models/{name}/versions/{version}/ready",
            "/v2/models/{name}/versions/{version}/infer",
        ] {
            assert!(
                paths.contains(&expected),
                "{expected} missing from {paths:?}"
            );
        }
        let json = serde_json::to_value(document).unwrap();
        assert!(json["openapi"].as_str().unwrap().starts_with("3."));
        // Schemas are resolvable: every component referenced is defined.
        let text = json.to_string();
        for reference in text.split("#/components/schemas/").skip(1) {
            let name = reference.split('"').next().unwrap();
            assert!(
                json["components"]["schemas"].get(name).is_some(),
                "schema {name} is referenced but not defined"
            );
        }
    }
}
