//! Starting the real `fovea` binary and talking to it like a client.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

/// The `fovea` binary of this build profile, built once per test binary.
pub fn fovea_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let profile = if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        };
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "fovea", "--bin", "fovea"])
            .current_dir(repo_root());
        if profile == "release" {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "cargo build of fovea failed");
        target_dir().join(profile).join("fovea")
    })
}

/// A model store shared by the tests, so real weights are pulled once.
pub fn shared_home() -> PathBuf {
    let home = target_dir().join("e2e-fovea-home");
    std::fs::create_dir_all(&home).unwrap();
    home
}

pub fn image(name: &str) -> PathBuf {
    repo_root().join("tests/images").join(name)
}

/// A tiny random-weight classifier from the conformance fixtures: fast to
/// load and run, with real layouts and 1000 classes.
pub fn tiny_model() -> String {
    let path = repo_root()
        .join("model-core/tests/fixtures/models/timm_efficientnet_b0_tiny/model.safetensors");
    assert!(path.is_file(), "missing fixture {}", path.display());
    format!("efficientnet_b0:{}", path.display())
}

pub struct Server {
    pub child: Child,
    pub base: String,
    /// The gRPC endpoint, `http://IP:PORT`.
    pub grpc: String,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Start `fovea serve` on a free loopback port and wait until ready.
    pub fn start(args: &[&str]) -> Server {
        Self::start_with_env(args, &[])
    }

    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(fovea_bin());
        cmd.arg("serve")
            .args(["--http-addr", "127.0.0.1:0"])
            .args(["--grpc-addr", "127.0.0.1:0"])
            .args(args)
            .env("FOVEA_HOME", shared_home())
            .env_remove("FOVEA_MODELS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start fovea");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains("listening") {
                        if let Some(addr) = line.split("addr=").nth(1) {
                            let addr = addr.split_whitespace().next().unwrap_or("").to_string();
                            let grpc = line.contains("grpc listening");
                            let _ = tx.send((grpc, addr));
                        }
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        // The HTTP and the gRPC listener, in either order.
        let (mut http, mut grpc) = (None, None);
        while http.is_none() || grpc.is_none() {
            let (is_grpc, addr) = rx
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("fovea did not start: {:?}", log.lock().unwrap()));
            *if is_grpc { &mut grpc } else { &mut http } = Some(addr);
        }
        let server = Server {
            child,
            base: format!("http://{}", http.unwrap()),
            grpc: format!("http://{}", grpc.unwrap()),
            log,
        };
        server.wait_ready(Duration::from_secs(300));
        server
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    fn wait_ready(&self, limit: Duration) {
        let start = Instant::now();
        let client = client();
        loop {
            if let Ok(r) = client.get(self.url("/readyz")).send() {
                if r.status() == 200 {
                    return;
                }
            }
            if start.elapsed() > limit {
                panic!(
                    "fovea not ready after {limit:?}: {:?}",
                    self.log.lock().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// One sample of a metric with the given labels, e.g.
    /// `metric("fovea_images_total", &[("model", "m")])`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let text = client()
            .get(self.url("/metrics"))
            .send()
            .ok()?
            .text()
            .ok()?;
        metric_value(&text, name, labels)
    }

    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < limit,
                "fovea did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn client() -> reqwest::blocking::Client {
    // reqwest's rustls has no crypto provider of its own in this workspace.
    fovea_weights::http::install_crypto_provider();
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// Parse one sample out of the Prometheus text format.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| label_text.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
            all.then(|| value.parse().ok()).flatten()
        })
}

/// A tiny random-weight YOLOv8 from the conformance fixtures, imported
/// from its Ultralytics `.pt` with `fovea import` once per test binary.
pub fn tiny_detector() -> String {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    let path = PATH.get_or_init(|| {
        let pt = repo_root().join(TINY_DETECTOR_PT);
        assert!(pt.is_file(), "missing fixture {}", pt.display());
        // Test binaries run in parallel: import beside, rename into place.
        let out = target_dir().join("e2e-tiny-detector.safetensors");
        let partial = out.with_extension(format!("{}.partial", std::process::id()));
        let status = Command::new(fovea_bin())
            .arg("import")
            .arg(&pt)
            .arg(&partial)
            .stdout(Stdio::null())
            .status()
            .expect("run fovea import");
        assert!(status.success(), "fovea import {}", pt.display());
        std::fs::rename(&partial, &out).unwrap();
        out
    });
    path.display().to_string()
}

pub const TINY_DETECTOR_PT: &str = "model-core/tests/fixtures/models/yolov8_tiny/model.pt";

/// Answers to `ask` for each item alone (one after another), then for all
/// of them at once from concurrent clients; the concurrent ones must have
/// shared a forward pass (an answer's `timing.batch_sizes` above 1).
pub fn alone_then_together(
    items: &[&str],
    ask: impl Fn(&str) -> serde_json::Value + Sync,
) -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
    let alone: Vec<_> = items.iter().map(|item| ask(item)).collect();
    let together: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = items.iter().map(|item| s.spawn(|| ask(item))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let batched = together
        .iter()
        .any(|a| a["timing"]["batch_sizes"][0].as_u64().unwrap() > 1);
    assert!(batched, "no batch formed: {together:?}");
    (alone, together)
}

/// (class id, score, [x1, y1, x2, y2]) of each detection in one image's
/// `/v1/detect` result.
pub fn detections(result: &serde_json::Value) -> Vec<(u64, f64, [f64; 4])> {
    result["detections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let b = &d["box"];
            (
                d["class_id"].as_u64().unwrap(),
                d["score"].as_f64().unwrap(),
                ["x1", "y1", "x2", "y2"].map(|k| b[k].as_f64().unwrap()),
            )
        })
        .collect()
}
