//! The gRPC front end (tonic): `fovea.v1.Vision`, `grpc.health.v1.Health`
//! and server reflection on their own port, sharing the HTTP front end's
//! state (models, batchers, limits, metrics, shutdown flag).

mod kserve;
mod vision;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tonic::body::Body;
use tonic::codegen::http::Request;
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;
use tonic::service::{Routes, RoutesBuilder};
use tonic::{Code, Status};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::http::error::ApiError;
use crate::http::infer::Deadline;
use crate::http::AppState;

/// Every gRPC service, ready to serve, and the health statuses to keep.
pub struct Services {
    pub routes: Routes,
    pub health: Health,
}

/// Build every gRPC service over the shared state, each refusing messages
/// over `max_message_bytes` either way.
pub async fn services(state: &Arc<AppState>, max_message_bytes: usize) -> anyhow::Result<Services> {
    let limit = max_message_bytes;
    let mut services = Registered::default();
    services.add(
        fovea_proto::vision::vision_server::VisionServer::new(vision::VisionService::new(
            state.clone(),
        ))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit),
    );
    services.add(
        kserve::service(state.clone())
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit),
    );

    // Health and reflection are not listed in health themselves.
    let (reporter, health_server) = tonic_health::server::health_reporter();
    services.routes.add_service(
        health_server
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit),
    );
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(fovea_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    services.routes.add_service(
        reflection()
            .build_v1()?
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit),
    );
    services.routes.add_service(
        reflection()
            .build_v1alpha()?
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit),
    );
    let health = Health::new(reporter, services.names);
    // The reporter starts with "" SERVING: not before the models are loaded.
    health.set(ServingStatus::NotServing).await;
    Ok(Services {
        routes: services.routes.routes(),
        health,
    })
}

/// The routes being built and the names of the services they serve.
#[derive(Default)]
struct Registered {
    routes: RoutesBuilder,
    names: Vec<&'static str>,
}

impl Registered {
    fn add<S>(&mut self, service: S)
    where
        S: tower::Service<Request<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME);
        self.routes.add_service(service);
    }
}

/// `grpc.health.v1` statuses: the server's (`""`) and each service's,
/// NOT_SERVING until the models are loaded and again once shutting down.
pub struct Health {
    reporter: HealthReporter,
    services: Vec<&'static str>,
    /// Set at shutdown, so a late "ready" cannot undo it.
    stopping: tokio::sync::Mutex<bool>,
}

impl Health {
    fn new(reporter: HealthReporter, services: Vec<&'static str>) -> Self {
        Health {
            reporter,
            services,
            stopping: tokio::sync::Mutex::new(false),
        }
    }

    /// Every model is loaded: SERVING, unless shutting down already.
    pub async fn ready(&self) {
        let stopping = self.stopping.lock().await;
        if !*stopping {
            self.set(ServingStatus::Serving).await;
        }
    }

    /// Shutting down: NOT_SERVING for good.
    pub async fn stopping(&self) {
        let mut stopping = self.stopping.lock().await;
        *stopping = true;
        self.set(ServingStatus::NotServing).await;
    }

    async fn set(&self, status: ServingStatus) {
        for name in std::iter::once("").chain(self.services.iter().copied()) {
            self.reporter.set_service_status(name, status).await;
        }
    }
}

/// Serve HTTP/2 connections until `shutdown` resolves, then stop accepting,
/// tell every client to go away (GOAWAY) and wait for the calls in flight.
///
/// Served with hyper rather than tonic's `Server` because the latter's own
/// `grpc-timeout` timer ends a late call with CANCELLED; here the handlers
/// enforce the deadline and answer DEADLINE_EXCEEDED, as gRPC specifies.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let graceful = GracefulShutdown::new();
    let builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait, don't spin.
                    tracing::warn!("gRPC accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(routes.clone());
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("gRPC connection ended: {e}");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// The answer a client gets for a refused request. 413 (an image or a
/// request over a limit) is INVALID_ARGUMENT rather than RESOURCE_EXHAUSTED:
/// the same request can never succeed, while RESOURCE_EXHAUSTED (429, the
/// queue is full) tells a client to retry later.
impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        // Out of device memory is a 503 over HTTP, but gRPC has a code for
        // exhausted resources.
        let code = match e.code {
            "out_of_memory" => Code::ResourceExhausted,
            _ => code_for(e.status),
        };
        Status::new(code, e.message)
    }
}

fn code_for(status: StatusCode) -> Code {
    match status.as_u16() {
        400 | 413 | 415 | 422 => Code::InvalidArgument,
        404 => Code::NotFound,
        429 => Code::ResourceExhausted,
        503 => Code::Unavailable,
        504 => Code::DeadlineExceeded,
        _ => Code::Internal,
    }
}

/// When a call started and the deadline its client set (`grpc-timeout`).
pub fn call_deadline(metadata: &MetadataMap, started: Instant) -> Result<Deadline, Status> {
    let latest = match metadata.get("grpc-timeout") {
        None => None,
        Some(value) => {
            let timeout = value
                .to_str()
                .ok()
                .and_then(parse_grpc_timeout)
                .ok_or_else(|| {
                    Status::invalid_argument(format!("malformed grpc-timeout {value:?}"))
                })?;
            Some(started + timeout)
        }
    };
    Ok(Deadline { started, latest })
}

/// `grpc-timeout`: at most 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(text: &str) -> Option<Duration> {
    let unit_at = text.len().checked_sub(1)?;
    let (digits, unit) = text.split_at(unit_at);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_errors_map_to_grpc_codes() {
        let cases = [
            (ApiError::bad_request("x"), Code::InvalidArgument),
            (ApiError::invalid_option("x"), Code::InvalidArgument),
            (ApiError::unsupported_media_type("x"), Code::InvalidArgument),
            (ApiError::payload_too_large("x"), Code::InvalidArgument),
            (ApiError::model_not_found("m"), Code::NotFound),
            (
                crate::batcher::SubmitError::QueueFull { capacity: 1 }.into(),
                Code::ResourceExhausted,
            ),
            (ApiError::not_ready(), Code::Unavailable),
            (ApiError::shutting_down(), Code::Unavailable),
            (ApiError::deadline_exceeded(), Code::DeadlineExceeded),
            (
                crate::batcher::JobError::Failed("boom".into()).into(),
                Code::Internal,
            ),
            (
                crate::batcher::JobError::OutOfMemory("CUDA_ERROR_OUT_OF_MEMORY".into()).into(),
                Code::ResourceExhausted,
            ),
        ];
        for (error, code) in cases {
            let message = error.message.clone();
            let status = Status::from(error);
            assert_eq!(status.code(), code, "{message}");
            assert_eq!(status.message(), message);
        }
    }

    #[test]
    fn grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "S", "5", "5s", "123456789S", "-1S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
        let mut metadata = MetadataMap::new();
        let started = Instant::now();
        assert!(call_deadline(&metadata, started).unwrap().latest.is_none());
        metadata.insert("grpc-timeout", "100m".parse().unwrap());
        let deadline = call_deadline(&metadata, started).unwrap();
        assert_eq!(deadline.latest, Some(started + Duration::from_millis(100)));
        metadata.insert("grpc-timeout", "soon".parse().unwrap());
        let refused = call_deadline(&metadata, started).unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument);
    }
}
