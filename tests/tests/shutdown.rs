//! SIGTERM with requests in flight: readiness goes, nothing is lost, exit 0.

mod common;

use std::time::{Duration, Instant};

use common::{client, image, tiny_model, Server};

#[test]
fn sigterm_answers_everything_in_flight_then_exits_zero() {
    let mut server = Server::start(&[
        "--model",
        &format!("tiny={}", tiny_model()),
        "--max-batch-size",
        "64",
        "--max-queue-delay-ms",
        "1500",
    ]);
    let body = std::fs::read(image("chelsea.png")).unwrap();
    let requests = 6;
    let handles: Vec<_> = (0..requests)
        .map(|_| {
            let url = server.url("/v1/classify");
            let body = body.clone();
            std::thread::spawn(move || {
                client()
                    .post(&url)
                    .header("content-type", "image/png")
                    .body(body)
                    .send()
                    .map(|r| r.status().as_u16())
            })
        })
        .collect();
    // All admitted and waiting for the batch to fill.
    let start = Instant::now();
    while server.metric("fovea_queue_depth", &[("model", "tiny")]) != Some(requests as f64) {
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "requests not queued in time"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    server.terminate();
    for h in handles {
        assert_eq!(h.join().unwrap().expect("answered"), 200, "no request lost");
    }
    let status = server.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{}", server.log_text());
    let log = server.log_text();
    assert!(
        log.contains("shutting down") && log.contains("stopped"),
        "{log}"
    );
}

#[test]
fn new_work_after_sigterm_is_refused_while_in_flight_work_finishes() {
    let server = Server::start(&[
        "--model",
        &format!("tiny={}", tiny_model()),
        "--max-queue-delay-ms",
        "2000",
        "--max-batch-size",
        "64",
    ]);
    let body = std::fs::read(image("coffee.png")).unwrap();
    let inflight = {
        let url = server.url("/v1/classify");
        let body = body.clone();
        std::thread::spawn(move || {
            client()
                .post(&url)
                .header("content-type", "image/png")
                .body(body)
                .send()
                .unwrap()
                .status()
        })
    };
    let start = Instant::now();
    while server.metric("fovea_queue_depth", &[("model", "tiny")]) != Some(1.0) {
        assert!(start.elapsed() < Duration::from_secs(1));
        std::thread::sleep(Duration::from_millis(5));
    }
    server.terminate();
    std::thread::sleep(Duration::from_millis(200));
    // Refused: the listener is closed (connection error) or the answer is 503.
    let late = client()
        .post(server.url("/v1/classify"))
        .header("content-type", "image/png")
        .body(body)
        .send();
    if let Ok(r) = late {
        assert_eq!(r.status(), 503, "no new work after SIGTERM");
    }
    assert_eq!(inflight.join().unwrap(), 200);
}
