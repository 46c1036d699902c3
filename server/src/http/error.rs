//! Errors as the API answers them: `{"error": {"code", "message"}}` with the
//! status that says whose fault it was.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use fovea_model_core::image_input::ImageInputError;
use serde_json::json;

use crate::batcher::{JobError, SubmitError};

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after_s: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_input", message)
    }

    pub fn invalid_option(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_option", message)
    }

    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            message,
        )
    }

    pub fn payload_too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }

    pub fn model_not_found(name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!("no model named {name:?} is loaded (GET /v1/models lists them)"),
        )
    }

    pub fn not_ready() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the server is loading its models",
        )
    }

    pub fn shutting_down() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down",
        )
    }

    pub fn deadline_exceeded() -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "deadline_exceeded",
            "the request's deadline passed before its images were computed",
        )
    }

    /// Which image of the request was at fault.
    pub fn for_image(mut self, index: usize, count: usize) -> Self {
        if count > 1 {
            self.message = format!("image {index}: {}", self.message);
        }
        self
    }
}

impl From<ImageInputError> for ApiError {
    fn from(e: ImageInputError) -> Self {
        let message = e.to_string();
        match e {
            ImageInputError::Unsupported(_) => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_image_format",
                message,
            ),
            ImageInputError::TooLarge { .. } => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "image_too_large", message)
            }
            _ => ApiError::new(StatusCode::BAD_REQUEST, "invalid_image", message),
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::QueueFull { .. } => ApiError {
                retry_after_s: Some(1),
                ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", e.to_string())
            },
            SubmitError::Closed => ApiError::shutting_down(),
        }
    }
}

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::DeadlineExceeded => ApiError::deadline_exceeded(),
            // The model failed on valid input: that is the server's fault.
            JobError::Failed(m) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "inference_failed", m)
            }
            // Temporary: the batch did not fit beside what else the device
            // held; a retry (or a smaller request) may succeed.
            JobError::OutOfMemory(_) => ApiError {
                retry_after_s: Some(1),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "out_of_memory",
                    e.to_string(),
                )
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        let mut response = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after_s {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_batches_say_whose_fault_it_was() {
        let oom: ApiError = JobError::OutOfMemory("CUDA_ERROR_OUT_OF_MEMORY".into()).into();
        assert_eq!(
            (oom.status, oom.code, oom.retry_after_s),
            (StatusCode::SERVICE_UNAVAILABLE, "out_of_memory", Some(1))
        );
        let response = oom.into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        let failed: ApiError = JobError::Failed("shape mismatch".into()).into();
        assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
}
