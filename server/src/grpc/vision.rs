//! `fovea.v1.Vision`: the typed twin of `/v1/classify` and `/v1/detect`,
//! through the same pipeline (model choice, limits, deadline, batcher,
//! postprocessing), plus a stream of video frames.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use axum::http::StatusCode;
use bytes::Bytes;
use fovea_model_core::detection::Detection;
use fovea_proto::vision as pb;
use futures::{Stream, StreamExt};
use serde_json::Value;
use tonic::{Request, Response, Status, Streaming};

use super::call_deadline;
use crate::http::classify::{predictions, top_k};
use crate::http::detect::{detect_all, detect_options};
use crate::http::error::ApiError;
use crate::http::infer::{infer, prepare, Deadline, ImageResult, Route, Timing};
use crate::http::input::Options;
use crate::http::AppState;
use crate::network::Task;

// Metric labels: the gRPC method, told apart from HTTP routes by `grpc:`.
const CLASSIFY: Route = Route {
    path: "grpc:/fovea.v1.Vision/Classify",
    task: Task::Classification,
    options: &["model", "top_k", "timeout_ms"],
};
const DETECT: Route = Route {
    path: "grpc:/fovea.v1.Vision/Detect",
    task: Task::Detection,
    options: DETECT_OPTIONS,
};
/// Counted per frame.
const DETECT_STREAM: Route = Route {
    path: "grpc:/fovea.v1.Vision/DetectStream",
    task: Task::Detection,
    options: DETECT_OPTIONS,
};
const DETECT_OPTIONS: &[&str] = &[
    "model",
    "confidence",
    "iou",
    "max_detections",
    "classes",
    "agnostic",
    "timeout_ms",
];
/// Frames of one stream computed at once: enough to batch them and to keep
/// the model busy while results travel back, few enough to hold in memory.
const FRAMES_IN_FLIGHT: usize = 4;

pub struct VisionService {
    state: Arc<AppState>,
}

impl VisionService {
    pub fn new(state: Arc<AppState>) -> Self {
        VisionService { state }
    }
}

type FrameResults = Pin<Box<dyn Stream<Item = Result<pb::DetectFrameResult, Status>> + Send>>;

#[tonic::async_trait]
impl pb::vision_server::Vision for VisionService {
    async fn classify(
        &self,
        request: Request<pb::ClassifyRequest>,
    ) -> Result<Response<pb::ClassifyResponse>, Status> {
        let deadline = call_deadline(request.metadata(), Instant::now())?;
        let mut model = "unknown".to_string();
        let work = classify(&self.state, request.into_inner(), deadline, &mut model);
        let result = within(deadline, work).await;
        answer(&self.state, &CLASSIFY, &model, deadline.started, result).map(Response::new)
    }

    async fn detect(
        &self,
        request: Request<pb::DetectRequest>,
    ) -> Result<Response<pb::DetectResponse>, Status> {
        let deadline = call_deadline(request.metadata(), Instant::now())?;
        let request = request.into_inner();
        let options =
            detect_option_values(request.options.as_ref(), &request.model, request.timeout_ms);
        let mut model = "unknown".to_string();
        let work = detect(
            &self.state,
            &DETECT,
            options,
            request.images,
            deadline,
            &mut model,
        );
        let result = within(deadline, work)
            .await
            .map(|(model, results, timing)| pb::DetectResponse {
                model,
                results,
                timing: Some(timing_message(&timing, deadline.started)),
            });
        answer(&self.state, &DETECT, &model, deadline.started, result).map(Response::new)
    }

    type DetectStreamStream = FrameResults;

    async fn detect_stream(
        &self,
        request: Request<Streaming<pb::DetectFrame>>,
    ) -> Result<Response<FrameResults>, Status> {
        // A deadline for the whole stream bounds every frame's.
        let latest = call_deadline(request.metadata(), Instant::now())?.latest;
        let state = self.state.clone();
        let mut first: Option<pb::DetectFrame> = None;
        let results = request
            .into_inner()
            .map(move |frame| {
                let state = state.clone();
                let frame = frame.map(|frame| inherit(&mut first, frame));
                async move {
                    let frame = frame?;
                    let deadline = Deadline {
                        started: Instant::now(),
                        latest,
                    };
                    Ok::<_, Status>(detect_frame(&state, frame, deadline).await)
                }
            })
            // Several frames in flight, answered in the order they came.
            .buffered(FRAMES_IN_FLIGHT);
        Ok(Response::new(Box::pin(results)))
    }
}

/// The work of a call, given up at the client's deadline: the client has
/// stopped waiting then, and the batcher drops images nobody waits for.
async fn within<T>(
    deadline: Deadline,
    work: impl Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    match deadline.latest {
        None => work.await,
        Some(latest) => tokio::time::timeout_at(latest.into(), work)
            .await
            .unwrap_or_else(|_| Err(ApiError::deadline_exceeded())),
    }
}

/// Count, time and log a call's outcome; an error becomes its gRPC status.
fn answer<T>(
    state: &AppState,
    route: &Route,
    model: &str,
    started: Instant,
    result: Result<T, ApiError>,
) -> Result<T, Status> {
    match result {
        Ok(reply) => {
            state.record(model, route.path, StatusCode::OK, started);
            Ok(reply)
        }
        Err(e) => {
            tracing::info!(route = route.path, status = e.status.as_u16(), code = e.code, error = %e.message, "request refused");
            state.record(model, route.path, e.status, started);
            Err(e.into())
        }
    }
}

async fn classify(
    state: &Arc<AppState>,
    request: pb::ClassifyRequest,
    deadline: Deadline,
    model_label: &mut String,
) -> Result<pb::ClassifyResponse, ApiError> {
    let options = Options::from_values(
        [
            ("model", text(&request.model)),
            ("top_k", positive(request.top_k)),
            ("timeout_ms", positive(request.timeout_ms)),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?))),
    );
    let registry = state.serving()?;
    let images = encoded_images(request.images)?;
    let request = prepare(
        state,
        registry,
        &CLASSIFY,
        options,
        images,
        deadline,
        model_label,
    )?;
    let model = request.model.clone();
    let top_k = top_k(&request.options, &model)?;
    let (images, timing) = infer(state, request, false).await?;
    let results = images
        .iter()
        .map(|image| pb::Classification {
            predictions: predictions(&image.output, top_k, &model.labels)
                .into_iter()
                .map(|p| pb::Prediction {
                    class_id: p.class_id as u32,
                    label: p.label.to_string(),
                    score: p.score,
                })
                .collect(),
        })
        .collect();
    Ok(pb::ClassifyResponse {
        model: model.name.clone(),
        results,
        timing: Some(timing_message(&timing, deadline.started)),
    })
}

/// Detect objects in `images`: the model's name, one result per image and
/// where the time went.
async fn detect(
    state: &Arc<AppState>,
    route: &Route,
    options: Options,
    images: Vec<Vec<u8>>,
    deadline: Deadline,
    model_label: &mut String,
) -> Result<(String, Vec<pb::ImageDetections>, Timing), ApiError> {
    let registry = state.serving()?;
    let images = encoded_images(images)?;
    let request = prepare(
        state,
        registry,
        route,
        options,
        images,
        deadline,
        model_label,
    )?;
    let model = request.model.clone();
    let options = detect_options(&request.options, &model)?;
    let (images, timing) = infer(state, request, false).await?;
    let (images, found) = detect_all(state, &model, images, options).await?;
    let results = images
        .iter()
        .zip(&found)
        .map(|(image, found)| image_detections(image, found, &model.labels))
        .collect();
    Ok((model.name.clone(), results, timing))
}

/// One frame of a stream: its detections, or the error it met.
async fn detect_frame(
    state: &Arc<AppState>,
    frame: pb::DetectFrame,
    deadline: Deadline,
) -> pb::DetectFrameResult {
    let options = detect_option_values(frame.options.as_ref(), &frame.model, frame.timeout_ms);
    let mut model = "unknown".to_string();
    let work = detect(
        state,
        &DETECT_STREAM,
        options,
        vec![frame.image],
        deadline,
        &mut model,
    );
    let result = within(deadline, work).await;
    let (result, timing) = match answer(state, &DETECT_STREAM, &model, deadline.started, result) {
        Ok((_, mut results, timing)) => (
            pb::detect_frame_result::Result::Detections(results.remove(0)),
            Some(timing_message(&timing, deadline.started)),
        ),
        Err(status) => (
            pb::detect_frame_result::Result::Error(pb::FrameError {
                code: status.code() as i32,
                message: status.message().to_string(),
            }),
            None,
        ),
    };
    pb::DetectFrameResult {
        frame_id: frame.frame_id,
        result: Some(result),
        timing,
    }
}

/// The first frame's model, options and timeout stand for a later frame
/// that leaves them empty.
fn inherit(first: &mut Option<pb::DetectFrame>, mut frame: pb::DetectFrame) -> pb::DetectFrame {
    match first {
        None => {
            *first = Some(pb::DetectFrame {
                image: Vec::new(),
                ..frame.clone()
            })
        }
        Some(first) => {
            if frame.model.is_empty() {
                frame.model.clone_from(&first.model);
            }
            if frame.options.is_none() {
                frame.options.clone_from(&first.options);
            }
            if frame.timeout_ms == 0 {
                frame.timeout_ms = first.timeout_ms;
            }
        }
    }
    frame
}

/// The options a detection request sets, as the HTTP API's options: unset
/// (or empty) fields are left out so the same defaults apply.
fn detect_option_values(
    options: Option<&pb::DetectOptions>,
    model: &str,
    timeout_ms: u32,
) -> Options {
    let mut values = vec![("model", text(model)), ("timeout_ms", positive(timeout_ms))];
    if let Some(o) = options {
        let classes = (!o.classes.is_empty())
            .then(|| Value::Array(o.classes.iter().cloned().map(Value::String).collect()));
        values.extend([
            ("confidence", o.confidence.map(number)),
            ("iou", o.iou.map(number)),
            ("max_detections", o.max_detections.map(Value::from)),
            ("classes", classes),
            ("agnostic", o.agnostic.then_some(Value::Bool(true))),
        ]);
    }
    Options::from_values(values.into_iter().filter_map(|(k, v)| Some((k, v?))))
}

fn text(s: &str) -> Option<Value> {
    (!s.is_empty()).then(|| Value::String(s.to_string()))
}

/// Proto3 scalars cannot be unset: 0 stands for "the default".
fn positive(n: u32) -> Option<Value> {
    (n > 0).then(|| Value::from(n))
}

/// JSON has no NaN or infinity: those go as text, for the range check to
/// refuse.
fn number(x: f32) -> Value {
    serde_json::Number::from_f64(f64::from(x))
        .map_or_else(|| Value::String(x.to_string()), Value::Number)
}

fn encoded_images(images: Vec<Vec<u8>>) -> Result<Vec<Bytes>, ApiError> {
    if images.is_empty() {
        return Err(ApiError::bad_request("the request has no images"));
    }
    Ok(images.into_iter().map(Bytes::from).collect())
}

fn image_detections(
    image: &ImageResult,
    found: &[Detection],
    labels: &[String],
) -> pb::ImageDetections {
    pb::ImageDetections {
        width: image.width,
        height: image.height,
        detections: found
            .iter()
            .map(|d| pb::Detection {
                class_id: d.class_id as u32,
                label: labels.get(d.class_id).cloned().unwrap_or_default(),
                score: d.score,
                r#box: Some(pb::Box {
                    x1: d.x1,
                    y1: d.y1,
                    x2: d.x2,
                    y2: d.y2,
                }),
            })
            .collect(),
    }
}

fn timing_message(timing: &Timing, started: Instant) -> pb::Timing {
    pb::Timing {
        preprocess_ms: timing.preprocess_ms,
        queue_ms: timing.queue_ms,
        inference_ms: timing.inference_ms,
        total_ms: started.elapsed().as_secs_f64() * 1e3,
        batch_sizes: timing.batch_sizes.iter().map(|&n| n as u32).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(id: u64, model: &str, confidence: Option<f32>, timeout_ms: u32) -> pb::DetectFrame {
        pb::DetectFrame {
            frame_id: id,
            image: vec![id as u8],
            model: model.into(),
            options: confidence.map(|c| pb::DetectOptions {
                confidence: Some(c),
                ..Default::default()
            }),
            timeout_ms,
        }
    }

    #[test]
    fn later_frames_inherit_what_they_leave_empty() {
        let mut first = None;
        let a = inherit(&mut first, frame(1, "yolo", Some(0.5), 100));
        assert_eq!(a, frame(1, "yolo", Some(0.5), 100));
        let b = inherit(&mut first, frame(2, "", None, 0));
        assert_eq!(b, frame(2, "yolo", Some(0.5), 100));
        let c = inherit(&mut first, frame(3, "detr", Some(0.1), 7));
        assert_eq!(c, frame(3, "detr", Some(0.1), 7));
        // Always the first frame's, not the previous one's.
        let d = inherit(&mut first, frame(4, "", None, 0));
        assert_eq!(d, frame(4, "yolo", Some(0.5), 100));
    }

    #[test]
    fn unset_fields_are_left_to_the_defaults() {
        let none = detect_option_values(Some(&pb::DetectOptions::default()), "", 0);
        assert_eq!(none.string("model").unwrap(), None);
        assert_eq!(none.integer("timeout_ms", 1, 10).unwrap(), None);
        assert_eq!(none.number("confidence", 0.0, 1.0).unwrap(), None);
        assert_eq!(none.list("classes").unwrap(), None);
        assert_eq!(none.boolean("agnostic").unwrap(), None);

        let set = pb::DetectOptions {
            confidence: Some(0.5),
            iou: Some(0.25),
            max_detections: Some(3),
            classes: vec!["person".into(), "2".into()],
            agnostic: true,
        };
        let all = detect_option_values(Some(&set), "yolo", 9);
        assert_eq!(all.string("model").unwrap().as_deref(), Some("yolo"));
        assert_eq!(all.integer("timeout_ms", 1, 10).unwrap(), Some(9));
        assert_eq!(all.number("confidence", 0.0, 1.0).unwrap(), Some(0.5));
        assert_eq!(all.number("iou", 0.0, 1.0).unwrap(), Some(0.25));
        assert_eq!(all.integer("max_detections", 1, 10).unwrap(), Some(3));
        assert_eq!(
            all.list("classes").unwrap(),
            Some(vec!["person".to_string(), "2".to_string()])
        );
        assert_eq!(all.boolean("agnostic").unwrap(), Some(true));
    }

    #[test]
    fn out_of_range_numbers_are_refused_not_dropped() {
        for bad in [f32::NAN, f32::INFINITY, 1.5, -0.1] {
            let options = detect_option_values(
                Some(&pb::DetectOptions {
                    confidence: Some(bad),
                    ..Default::default()
                }),
                "",
                0,
            );
            let err = options.number("confidence", 0.0, 1.0).unwrap_err();
            assert_eq!(err.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
        }
    }
}
