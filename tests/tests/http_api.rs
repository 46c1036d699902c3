//! The HTTP API end to end, on a tiny random-weight model: batching under
//! concurrent load, every error status, metrics after the load.

mod common;

use std::time::{Duration, Instant};

use common::{client, image, tiny_model, Server};
use reqwest::blocking::multipart;
use serde_json::Value;

fn png(name: &str) -> Vec<u8> {
    std::fs::read(image(name)).unwrap()
}

fn multipart_of(images: &[(&str, Vec<u8>)]) -> multipart::Form {
    let mut form = multipart::Form::new();
    for (i, (name, bytes)) in images.iter().enumerate() {
        let part = multipart::Part::bytes(bytes.clone())
            .file_name(name.to_string())
            .mime_str("image/png")
            .unwrap();
        form = form.part(format!("image{i}"), part);
    }
    form
}

fn error_of(resp: reqwest::blocking::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().expect("errors are JSON");
    let code = body["error"]["code"]
        .as_str()
        .expect("error.code")
        .to_string();
    assert!(body["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    (status, code)
}

#[test]
fn concurrent_multi_image_requests_are_batched_and_counted() {
    let model = tiny_model();
    let server = Server::start(&[
        "--model",
        &format!("tiny={model}"),
        "--max-batch-size",
        "16",
        "--max-queue-delay-ms",
        "50",
    ]);
    let images = ["chelsea.png", "coffee.png", "astronaut.png"];

    // Reference answers, one image per request.
    let single: Vec<Value> = images
        .iter()
        .map(|name| {
            let r = client()
                .post(server.url("/v1/classify?top_k=3"))
                .header("content-type", "image/png")
                .body(png(name))
                .send()
                .unwrap();
            assert_eq!(r.status(), 200);
            let v: Value = r.json().unwrap();
            v["results"][0]["predictions"].clone()
        })
        .collect();

    let threads = 8;
    let per_thread = 3;
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let url = server.url("/v1/classify?top_k=3");
            let parts: Vec<(&str, Vec<u8>)> = images.iter().map(|n| (*n, png(n))).collect();
            std::thread::spawn(move || {
                let mut answers = Vec::new();
                for _ in 0..per_thread {
                    let r = client()
                        .post(&url)
                        .multipart(multipart_of(&parts))
                        .send()
                        .unwrap();
                    assert_eq!(r.status(), 200);
                    answers.push(r.json::<Value>().unwrap());
                }
                answers
            })
        })
        .collect();
    let mut max_batch = 0;
    for h in handles {
        for answer in h.join().unwrap() {
            assert_eq!(answer["model"], "tiny");
            let results = answer["results"].as_array().unwrap();
            assert_eq!(results.len(), 3, "one result per image, in order");
            for (result, expected) in results.iter().zip(&single) {
                // Same image, same predictions, whatever it was batched with.
                let got = &result["predictions"];
                for (g, e) in got
                    .as_array()
                    .unwrap()
                    .iter()
                    .zip(expected.as_array().unwrap())
                {
                    assert_eq!(g["class_id"], e["class_id"]);
                    let diff = (g["score"].as_f64().unwrap() - e["score"].as_f64().unwrap()).abs();
                    assert!(diff < 1e-4, "score differs by {diff}");
                }
            }
            for b in answer["timing"]["batch_sizes"].as_array().unwrap() {
                max_batch = max_batch.max(b.as_u64().unwrap());
            }
        }
    }
    assert!(max_batch > 1, "batches held more than one image");

    let m = [("model", "tiny")];
    let images_total = 3 + threads * per_thread * 3;
    assert_eq!(
        server.metric("fovea_images_total", &m),
        Some(images_total as f64)
    );
    let batches = server.metric("fovea_batch_size_count", &m).unwrap();
    let batched = server.metric("fovea_batch_size_sum", &m).unwrap();
    assert_eq!(batched, images_total as f64);
    assert!(batches < batched, "{batches} batches for {batched} images");
    let ok = [
        ("model", "tiny"),
        ("route", "/v1/classify"),
        ("status", "200"),
    ];
    assert_eq!(
        server.metric("fovea_requests_total", &ok),
        Some((3 + threads * per_thread) as f64)
    );
    assert_eq!(
        server.metric("fovea_request_duration_seconds_count", &[("model", "tiny")]),
        Some((3 + threads * per_thread) as f64)
    );
    assert_eq!(
        server.metric("fovea_preprocess_duration_seconds_count", &m),
        Some(images_total as f64)
    );
    assert_eq!(
        server.metric("fovea_queue_duration_seconds_count", &m),
        Some(images_total as f64)
    );
    assert_eq!(
        server.metric("fovea_inference_duration_seconds_count", &m),
        Some(batches)
    );
    assert_eq!(server.metric("fovea_queue_depth", &m), Some(0.0));
    assert_eq!(
        server.metric(
            "fovea_model_info",
            &[
                ("model", "tiny"),
                ("family", "efficientnet"),
                ("device", "cpu"),
                ("dtype", "f32")
            ]
        ),
        Some(1.0)
    );
    assert!(server
        .metric("fovea_model_load_duration_seconds_count", &m)
        .is_some());
    let log = server.log_text();
    assert!(
        log.contains("classified") && log.contains("batch_size="),
        "one log line per request"
    );
}

#[test]
fn json_and_raw_bodies_agree() {
    use base64::Engine;
    let server = Server::start(&["--model", &format!("tiny={}", tiny_model())]);
    let bytes = png("coffee.png");
    let raw: Value = client()
        .put(server.url("/v1/classify"))
        .header("content-type", "image/png")
        .body(bytes.clone())
        .send()
        .unwrap()
        .json()
        .unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
    let json: Value = client()
        .post(server.url("/v1/classify"))
        .json(&serde_json::json!({"images": [b64], "model": "tiny", "top_k": 5}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        raw["results"][0]["predictions"],
        json["results"][0]["predictions"]
    );
    assert_eq!(
        json["results"][0]["predictions"].as_array().unwrap().len(),
        5
    );
    let p = &raw["results"][0]["predictions"][0];
    assert!(p["label"].as_str().is_some_and(|l| !l.is_empty()));
    assert!(p["score"].as_f64().unwrap() > 0.0);
}

/// A PNG header declaring `w` x `h` pixels with almost no data behind it.
fn png_bomb(w: u32, h: u32) -> Vec<u8> {
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in data {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
    fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(
        &mut out,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    chunk(&mut out, b"IEND", &[]);
    out
}

#[test]
fn bad_input_gets_the_right_status_never_a_500() {
    let server = Server::start(&[
        "--model",
        &format!("tiny={}", tiny_model()),
        "--max-body-bytes",
        "1000000",
        "--max-image-pixels",
        "1000000",
        "--max-images-per-request",
        "4",
    ]);
    let url = server.url("/v1/classify");
    let post = |ct: &str, body: Vec<u8>| {
        client()
            .post(&url)
            .header("content-type", ct)
            .body(body)
            .send()
            .unwrap()
    };
    assert_eq!(
        error_of(post("image/jpeg", b"definitely not a jpeg".to_vec())),
        (400, "invalid_image".into())
    );
    let mut truncated = png("coffee.png");
    truncated.truncate(truncated.len() / 3);
    assert_eq!(error_of(post("image/png", truncated)).0, 400);
    assert_eq!(
        error_of(post("text/plain", b"hello".to_vec())),
        (415, "unsupported_media_type".into())
    );
    assert_eq!(error_of(post("image/png", Vec::new())).0, 400);
    assert_eq!(
        error_of(post("application/json", b"{\"images\": 3}".to_vec())).0,
        400
    );
    assert_eq!(
        error_of(post("application/json", b"{not json".to_vec())).0,
        400
    );
    assert_eq!(
        error_of(post("image/png", vec![0u8; 1_100_000])),
        (413, "payload_too_large".into())
    );

    let start = Instant::now();
    assert_eq!(
        error_of(post("image/png", png_bomb(60_000, 60_000))),
        (413, "image_too_large".into())
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "decided from the header"
    );
    // Just over the pixel limit: 1001 x 1000.
    assert_eq!(error_of(post("image/png", png_bomb(1001, 1000))).0, 413);

    let coffee = png("coffee.png");
    let with = |query: &str| {
        client()
            .post(format!("{url}?{query}"))
            .header("content-type", "image/png")
            .body(coffee.clone())
            .send()
            .unwrap()
    };
    assert_eq!(
        error_of(with("model=nope")),
        (404, "model_not_found".into())
    );
    assert_eq!(error_of(with("top_k=0")), (422, "invalid_option".into()));
    assert_eq!(error_of(with("top_k=abc")), (422, "invalid_option".into()));
    assert_eq!(error_of(with("top_k=41")), (422, "invalid_option".into()));
    assert_eq!(
        error_of(with("timeout_ms=-5")),
        (422, "invalid_option".into())
    );
    assert_eq!(error_of(with("topk=3")), (422, "invalid_option".into()));
    assert_eq!(with("top_k=2").status(), 200);

    // The count is checked before anything is decoded.
    let five: Vec<(&str, Vec<u8>)> = (0..5).map(|_| ("c.png", png_bomb(8, 8))).collect();
    let r = client()
        .post(&url)
        .multipart(multipart_of(&five))
        .send()
        .unwrap();
    assert_eq!(r.status(), 413, "more images than allowed");
    let body: Value = r.json().unwrap();
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("5 images in one request"));
    // One bad image among good ones fails the request, naming it.
    let mixed = vec![("a.png", coffee.clone()), ("b.png", b"junk".to_vec())];
    let r = client()
        .post(&url)
        .multipart(multipart_of(&mixed))
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().unwrap();
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("image 1:"));

    assert_eq!(
        error_of(client().get(server.url("/v1/models/nope")).send().unwrap()).0,
        404
    );
    assert_eq!(
        error_of(client().get(server.url("/no/such/route")).send().unwrap()).0,
        404
    );

    let text = client()
        .get(server.url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(!text.contains("status=\"500\""), "no 500 for bad input");
    assert!(server
        .metric("fovea_requests_total", &[("status", "415")])
        .is_some());
    assert!(server
        .metric("fovea_requests_total", &[("status", "413")])
        .is_some());
    assert!(!server.log_text().contains("panicked"));
}

#[test]
fn a_full_queue_answers_429_at_once_with_retry_after() {
    // The first request's 3 images wait up to 3 s for a 4th to fill the
    // batch; meanwhile the queue (capacity 4) has room for 1 more image.
    let server = Server::start(&[
        "--model",
        &format!("tiny={}", tiny_model()),
        "--max-batch-size",
        "4",
        "--queue-capacity",
        "4",
        "--max-queue-delay-ms",
        "3000",
    ]);
    let coffee = png("coffee.png");
    let three: Vec<(&str, Vec<u8>)> = (0..3).map(|_| ("c.png", coffee.clone())).collect();
    let url = server.url("/v1/classify");
    let first = {
        let url = url.clone();
        let three = three.clone();
        std::thread::spawn(move || {
            client()
                .post(&url)
                .multipart(multipart_of(&three))
                .send()
                .unwrap()
        })
    };
    let start = Instant::now();
    while server.metric("fovea_queue_depth", &[("model", "tiny")]) != Some(3.0) {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "first request not queued"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let two: Vec<(&str, Vec<u8>)> = (0..2).map(|_| ("c.png", coffee.clone())).collect();
    let t = Instant::now();
    let refused = client()
        .post(&url)
        .multipart(multipart_of(&two))
        .send()
        .unwrap();
    assert!(t.elapsed() < Duration::from_millis(1500), "refused at once");
    assert_eq!(refused.headers().get("retry-after").unwrap(), "1");
    assert_eq!(error_of(refused), (429, "queue_full".into()));
    let first = first.join().unwrap();
    assert_eq!(first.status(), 200, "admitted work is still answered");
}

#[test]
fn an_expired_request_answers_504_and_is_never_computed() {
    let server = Server::start(&[
        "--model",
        &format!("tiny={}", tiny_model()),
        "--max-queue-delay-ms",
        "2000",
    ]);
    let r = client()
        .post(server.url("/v1/classify?timeout_ms=200"))
        .header("content-type", "image/png")
        .body(png("coffee.png"))
        .send()
        .unwrap();
    assert_eq!(error_of(r), (504, "deadline_exceeded".into()));
    // Give the worker time to form (and drop) the batch.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        server.metric("fovea_images_total", &[("model", "tiny")]),
        Some(0.0)
    );
    assert_eq!(
        server.metric("fovea_batch_size_count", &[("model", "tiny")]),
        Some(0.0)
    );
}

#[test]
fn models_health_and_readiness() {
    let server = Server::start(&["--model", &format!("tiny={}", tiny_model())]);
    let models: Value = client()
        .get(server.url("/v1/models"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let m = &models["models"][0];
    assert_eq!(m["name"], "tiny");
    assert_eq!(m["task"], "classification");
    assert_eq!(m["family"], "efficientnet");
    assert_eq!(m["device"], "cpu");
    assert_eq!(m["dtype"], "f32");
    assert_eq!(m["num_classes"], 40);
    assert_eq!(m["input_size"], serde_json::json!([224, 224]));
    assert!(m["batching"]["max_batch_size"].as_u64().is_some());
    let one: Value = client()
        .get(server.url("/v1/models/tiny"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(&one, m);
    assert_eq!(
        client()
            .get(server.url("/healthz"))
            .send()
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        client().get(server.url("/readyz")).send().unwrap().status(),
        200
    );
}
