//! The KServe V2 / Open Inference Protocol surface against NVIDIA's real
//! Triton clients: tests/interop/triton_clients.py drives `tritonclient.http`
//! and `tritonclient.grpc` (plus raw HTTP and gRPC requests for bad input)
//! against two servers started here, and compares every output with
//! `fovea run` or with the server's own /v1 answers.
//!
//! Python is `python3` (or `$FOVEA_PYTHON`); when it cannot import the
//! clients they are installed once with pip into `<target>/interop-python`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fovea_bin, repo_root, shared_home, tiny_detector, tiny_model, Server};

const IMPORTS: &str = "import tritonclient.http, tritonclient.grpc, safetensors.numpy, numpy";
const PACKAGES: [&str; 3] = ["tritonclient[http,grpc]", "safetensors", "numpy"];
/// The small server's queue: a request for more images than this is
/// refused as a full queue every time.
const SMALL_QUEUE: usize = 1;

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

fn python() -> String {
    std::env::var("FOVEA_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn can_import(pythonpath: Option<&Path>) -> bool {
    let mut cmd = Command::new(python());
    cmd.args(["-c", IMPORTS]);
    if let Some(p) = pythonpath {
        cmd.env("PYTHONPATH", p);
    }
    cmd.output().map(|o| o.status.success()).unwrap_or(false)
}

/// The PYTHONPATH the script needs: none when Python already has the
/// clients, else a pip `--target` directory, installed once.
fn python_path() -> Option<PathBuf> {
    if can_import(None) {
        return None;
    }
    let dir = target_dir().join("interop-python");
    if !can_import(Some(&dir)) {
        let out = Command::new(python())
            .args(["-m", "pip", "install", "--quiet", "--upgrade", "--target"])
            .arg(&dir)
            .args(PACKAGES)
            .output()
            .expect("run pip");
        assert!(
            out.status.success(),
            "pip install {PACKAGES:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            can_import(Some(&dir)),
            "{IMPORTS:?} still fails after pip install --target {}",
            dir.display()
        );
    }
    Some(dir)
}

fn grpc_host_port(server: &Server) -> String {
    server.grpc.trim_start_matches("http://").to_string()
}

fn host_port(server: &Server) -> String {
    server.base.trim_start_matches("http://").to_string()
}

#[test]
fn triton_clients_interoperate() {
    let pythonpath = python_path();

    let classifier = tiny_model();
    let detector = tiny_detector();
    let detr = repo_root()
        .join("model-core/tests/fixtures/models/detr_tiny/model.safetensors")
        .display()
        .to_string();
    let scratch = target_dir().join(format!("kserve-interop-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    // DETR needs its input sizes, which only the config file sets; the
    // pixel_values the script sends (160x208) lie within them.
    let config = scratch.join("fovea.toml");
    std::fs::write(
        &config,
        format!(
            r#"
            [[models]]
            name = "cls"
            spec = "{classifier}"
            [[models]]
            name = "yolo"
            spec = "{detector}"
            [[models]]
            name = "detr"
            spec = "{detr}"
            input_size = 160
            max_input_size = 240
            "#
        ),
    )
    .unwrap();
    let main = Server::start(&["--config", config.to_str().unwrap()]);
    let small = Server::start(&[
        "--model",
        &format!("cls={classifier}"),
        "--max-batch-size",
        "1",
        "--max-queue-delay-ms",
        "0",
        "--queue-capacity",
        &SMALL_QUEUE.to_string(),
    ]);

    let mut cmd = Command::new(python());
    cmd.arg(repo_root().join("tests/interop/triton_clients.py"))
        .args(["--http", &host_port(&main)])
        .args(["--grpc", &grpc_host_port(&main)])
        .arg("--fovea")
        .arg(fovea_bin())
        .args(["--classifier", &format!("cls={classifier}")])
        .args(["--detector", &format!("yolo={detector}")])
        .args(["--detr", &format!("detr={detr}")])
        .arg("--images")
        .arg(repo_root().join("tests/images"))
        .arg("--scratch")
        .arg(&scratch)
        .args(["--small-http", &host_port(&small)])
        .args(["--small-grpc", &grpc_host_port(&small)])
        .args(["--small-queue", &SMALL_QUEUE.to_string()])
        .env("FOVEA_HOME", shared_home())
        .env("PYTHONUNBUFFERED", "1");
    if let Ok(only) = std::env::var("FOVEA_INTEROP_ONLY") {
        cmd.args(["--only", &only]);
    }
    if let Some(p) = &pythonpath {
        cmd.env("PYTHONPATH", p);
    }
    let out = cmd.output().expect("run the interop script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}{stderr}");
    let tail = |s: &Server| {
        let lines = s.log.lock().unwrap().clone();
        lines[lines.len().saturating_sub(40)..].join("\n")
    };
    assert!(
        out.status.success(),
        "tests/interop/triton_clients.py failed ({}):\n{stdout}{stderr}\n\
         main server log (tail):\n{}\nsmall server log (tail):\n{}",
        out.status,
        tail(&main),
        tail(&small)
    );
    assert!(
        stdout.contains("all checks passed"),
        "the script exited 0 without passing: {stdout}"
    );
    let _ = std::fs::remove_dir_all(&scratch);
}
