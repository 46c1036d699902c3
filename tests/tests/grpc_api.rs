//! The gRPC front end end to end: `fovea.v1.Vision` against the HTTP API's
//! answers on the same images, the frame stream, status codes, deadlines,
//! the message size limit, health and reflection.

mod common;

use std::time::Duration;

use common::{client, image, tiny_detector, tiny_model, Server};
use fovea_proto::vision::vision_client::VisionClient;
use fovea_proto::vision::{
    detect_frame_result, ClassifyRequest, DetectFrame, DetectOptions, DetectRequest,
    ImageDetections,
};
use hyper_util::rt::TokioExecutor;
use reqwest::blocking::multipart;
use serde_json::Value;
use tonic::transport::Channel;
use tonic::Code;

const IMAGES: [&str; 2] = ["chelsea.png", "grace_hopper.jpg"];

fn bytes_of(name: &str) -> Vec<u8> {
    std::fs::read(image(name)).unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn vision(server: &Server) -> VisionClient<Channel> {
    VisionClient::connect(server.grpc.clone())
        .await
        .expect("connect to the gRPC port")
}

fn start_both(extra: &[&str]) -> Server {
    let det = format!("det={}", tiny_detector());
    let cls = format!("cls={}", tiny_model());
    let mut args = vec!["--model", det.as_str(), "--model", cls.as_str()];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// The HTTP API's answer for `IMAGES` in one multipart request.
fn http_answer(server: &Server, path_and_query: &str) -> Value {
    let mut form = multipart::Form::new();
    for (i, name) in IMAGES.iter().enumerate() {
        let mime = if name.ends_with(".jpg") {
            "image/jpeg"
        } else {
            "image/png"
        };
        let part = multipart::Part::bytes(bytes_of(name))
            .file_name(name.to_string())
            .mime_str(mime)
            .unwrap();
        form = form.part(format!("image{i}"), part);
    }
    let r = client()
        .post(server.url(path_and_query))
        .multipart(form)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().unwrap()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-4 * (1.0 + a.abs().max(b.abs()))
}

/// Random weights give scores near 0.5: with a low threshold there are
/// boxes to compare.
fn low_threshold() -> DetectOptions {
    DetectOptions {
        confidence: Some(0.3),
        max_detections: Some(50),
        ..Default::default()
    }
}
const LOW: &str = "confidence=0.3&max_detections=50";

fn assert_same_detections(grpc: &ImageDetections, http: &Value) {
    assert_eq!(grpc.width as u64, http["width"].as_u64().unwrap());
    assert_eq!(grpc.height as u64, http["height"].as_u64().unwrap());
    let expected = http["detections"].as_array().unwrap();
    assert!(!expected.is_empty(), "nothing to compare");
    assert_eq!(grpc.detections.len(), expected.len());
    for (d, e) in grpc.detections.iter().zip(expected) {
        assert_eq!(d.class_id as u64, e["class_id"].as_u64().unwrap());
        assert_eq!(d.label, e["label"].as_str().unwrap());
        assert!(close(d.score.into(), e["score"].as_f64().unwrap()));
        let b = d.r#box.as_ref().unwrap();
        for (got, key) in [(b.x1, "x1"), (b.y1, "y1"), (b.x2, "x2"), (b.y2, "y2")] {
            let want = e["box"][key].as_f64().unwrap();
            assert!(close(got.into(), want), "{key}: {got} vs {want}");
        }
    }
}

#[test]
fn vision_answers_equal_the_http_api() {
    let server = start_both(&[]);
    let http_classes = http_answer(&server, "/v1/classify?model=cls&top_k=3");
    let http_boxes = http_answer(&server, &format!("/v1/detect?model=det&{LOW}"));

    runtime().block_on(async {
        let mut vision = vision(&server).await;
        let classes = vision
            .classify(ClassifyRequest {
                model: "cls".into(),
                images: IMAGES.iter().map(|n| bytes_of(n)).collect(),
                top_k: 3,
                timeout_ms: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(classes.model, "cls");
        assert_eq!(classes.results.len(), 2);
        for (got, want) in classes
            .results
            .iter()
            .zip(http_classes["results"].as_array().unwrap())
        {
            let want = want["predictions"].as_array().unwrap();
            assert_eq!(got.predictions.len(), 3);
            for (p, w) in got.predictions.iter().zip(want) {
                assert_eq!(p.class_id as u64, w["class_id"].as_u64().unwrap());
                assert_eq!(p.label, w["label"].as_str().unwrap());
                assert!(close(p.score.into(), w["score"].as_f64().unwrap()));
            }
        }
        let timing = classes.timing.unwrap();
        assert_eq!(timing.batch_sizes.len(), 2);
        assert!(timing.total_ms > 0.0);

        // The default classifier, and the default top_k (5).
        let defaults = vision
            .classify(ClassifyRequest {
                images: vec![bytes_of(IMAGES[0])],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(defaults.model, "cls");
        assert_eq!(defaults.results[0].predictions.len(), 5);

        let boxes = vision
            .detect(DetectRequest {
                model: String::new(),
                images: IMAGES.iter().map(|n| bytes_of(n)).collect(),
                options: Some(low_threshold()),
                timeout_ms: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(boxes.model, "det");
        let want = http_boxes["results"].as_array().unwrap();
        assert_eq!(boxes.results.len(), want.len());
        for (got, want) in boxes.results.iter().zip(want) {
            assert_same_detections(got, want);
        }

        // Refusals, with the codes the HTTP statuses map to.
        let unknown = vision
            .classify(ClassifyRequest {
                model: "nope".into(),
                images: vec![bytes_of(IMAGES[0])],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
        let wrong_task = vision
            .detect(DetectRequest {
                model: "cls".into(),
                images: vec![bytes_of(IMAGES[0])],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(wrong_task.code(), Code::InvalidArgument, "{wrong_task:?}");
        let no_images = vision
            .classify(ClassifyRequest::default())
            .await
            .unwrap_err();
        assert_eq!(no_images.code(), Code::InvalidArgument);
        let bad_option = vision
            .detect(DetectRequest {
                images: vec![bytes_of(IMAGES[0])],
                options: Some(DetectOptions {
                    iou: Some(1.5),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(bad_option.code(), Code::InvalidArgument);
        assert!(bad_option.message().contains("iou"), "{bad_option:?}");
    });

    let count = |route: &str, model: &str, status: &str| {
        server.metric(
            "fovea_requests_total",
            &[("route", route), ("model", model), ("status", status)],
        )
    };
    assert_eq!(
        count("grpc:/fovea.v1.Vision/Classify", "cls", "200"),
        Some(2.0)
    );
    assert_eq!(
        count("grpc:/fovea.v1.Vision/Detect", "det", "200"),
        Some(1.0)
    );
    assert_eq!(
        count("grpc:/fovea.v1.Vision/Classify", "unknown", "404"),
        Some(1.0)
    );
}

#[test]
fn detect_stream_answers_every_frame_in_order() {
    let server = start_both(&[]);
    let names = [
        "chelsea.png",
        "grace_hopper.jpg",
        "corrupt",
        "coffee.png",
        "chelsea.png",
    ];
    let frames: Vec<DetectFrame> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let image = if *name == "corrupt" {
                b"\x89PNG\r\n\x1a\n not really".to_vec()
            } else {
                bytes_of(name)
            };
            // The first frame's model and options stand for the others'.
            let first = i == 0;
            DetectFrame {
                frame_id: 100 + i as u64,
                image,
                model: if first { "det".into() } else { String::new() },
                options: first.then(low_threshold),
                timeout_ms: 0,
            }
        })
        .collect();

    runtime().block_on(async {
        let mut vision = vision(&server).await;
        let mut stream = vision
            .detect_stream(tokio_stream::iter(frames))
            .await
            .unwrap()
            .into_inner();
        let mut results = Vec::new();
        while let Some(result) = stream.message().await.unwrap() {
            results.push(result);
        }
        assert_eq!(results.len(), names.len());
        for (i, (result, name)) in results.iter().zip(names).enumerate() {
            assert_eq!(result.frame_id, 100 + i as u64, "in the order sent");
            match result.result.as_ref().unwrap() {
                detect_frame_result::Result::Error(e) => {
                    assert_eq!(name, "corrupt");
                    assert_eq!(e.code, Code::InvalidArgument as i32, "{e:?}");
                }
                detect_frame_result::Result::Detections(found) => {
                    assert_ne!(name, "corrupt");
                    // The same as a unary call with the first frame's options.
                    let unary = vision
                        .detect(DetectRequest {
                            model: "det".into(),
                            images: vec![bytes_of(name)],
                            options: Some(low_threshold()),
                            timeout_ms: 0,
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    assert_eq!(found.width, unary.results[0].width);
                    assert_eq!(found.detections.len(), unary.results[0].detections.len());
                    assert!(!found.detections.is_empty());
                    assert!(result.timing.is_some());
                }
            }
        }
    });
    assert_eq!(
        server.metric(
            "fovea_requests_total",
            &[
                ("route", "grpc:/fovea.v1.Vision/DetectStream"),
                ("status", "200")
            ]
        ),
        Some(4.0)
    );
}

#[test]
fn deadlines_and_the_message_limit() {
    // A long batching delay: a short deadline passes while queued.
    let server = Server::start(&[
        "--model",
        &format!("tiny={}", tiny_model()),
        "--max-queue-delay-ms",
        "2000",
        "--grpc-max-message-bytes",
        "300000",
    ]);
    runtime().block_on(async {
        let mut vision = vision(&server).await;
        let small = bytes_of("chelsea.png");
        assert!(small.len() < 300_000);
        let mut late = tonic::Request::new(ClassifyRequest {
            images: vec![small.clone()],
            ..Default::default()
        });
        late.set_timeout(Duration::from_millis(200));
        let started = std::time::Instant::now();
        // tonic's Channel enforces grpc-timeout itself (ending the call
        // CANCELLED first): this client leaves it to the server.
        let hyper = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http();
        let mut deadline_to_server = VisionClient::with_origin(hyper, server.grpc.parse().unwrap());
        let refused = deadline_to_server.classify(late).await.unwrap_err();
        assert_eq!(refused.code(), Code::DeadlineExceeded, "{refused:?}");
        assert!(started.elapsed() < Duration::from_millis(1500));

        // timeout_ms, shorter than the gRPC deadline, wins.
        let mut short = tonic::Request::new(ClassifyRequest {
            images: vec![small.clone()],
            timeout_ms: 100,
            ..Default::default()
        });
        short.set_timeout(Duration::from_secs(60));
        let refused = vision.classify(short).await.unwrap_err();
        assert_eq!(refused.code(), Code::DeadlineExceeded, "{refused:?}");

        // Over the message limit: refused, and the server goes on.
        let big = bytes_of("coffee.png");
        assert!(big.len() > 300_000);
        let too_big = vision
            .classify(ClassifyRequest {
                images: vec![big],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(too_big.code(), Code::OutOfRange, "{too_big:?}");
        let fine = vision
            .classify(ClassifyRequest {
                images: vec![small],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(fine.results.len(), 1);
    });
    assert_eq!(
        server.metric(
            "fovea_requests_total",
            &[
                ("route", "grpc:/fovea.v1.Vision/Classify"),
                ("status", "504")
            ]
        ),
        Some(2.0)
    );
    // The expired images were never computed: only the last one was.
    assert_eq!(
        server.metric("fovea_images_total", &[("model", "tiny")]),
        Some(1.0)
    );
}

#[test]
fn health_and_reflection() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let mut server = Server::start(&["--model", &format!("tiny={}", tiny_model())]);
    let runtime = runtime();
    let channel = runtime.block_on(async {
        Channel::from_shared(server.grpc.clone())
            .unwrap()
            .connect()
            .await
            .unwrap()
    });
    let status = |service: &str| {
        let mut health = HealthClient::new(channel.clone());
        runtime.block_on(health.check(HealthCheckRequest {
            service: service.into(),
        }))
    };
    for service in ["", "fovea.v1.Vision"] {
        let answer = status(service).unwrap().into_inner();
        assert_eq!(answer.status(), ServingStatus::Serving, "{service:?}");
    }
    assert_eq!(status("no.Such").unwrap_err().code(), Code::NotFound);

    let services = runtime.block_on(async {
        let mut reflection = ServerReflectionClient::new(channel.clone());
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers = reflection
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        match answers.message().await.unwrap().unwrap().message_response {
            Some(MessageResponse::ListServicesResponse(list)) => {
                list.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
            }
            other => panic!("not a service list: {other:?}"),
        }
    });
    for name in [
        "fovea.v1.Vision",
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
    ] {
        assert!(services.iter().any(|s| s == name), "{name} in {services:?}");
    }

    // SIGTERM ends both servers cleanly. The client's connection is closed
    // first: its current-thread runtime is idle between calls and would not
    // answer the server's GOAWAY, which holds the drain until its time limit.
    drop(channel);
    drop(runtime);
    server.terminate();
    let status = server.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{}", server.log_text());
    assert!(
        server.log_text().contains("grpc listening"),
        "{}",
        server.log_text()
    );
}
