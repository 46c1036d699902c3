//! `fovea bench`: forward-pass throughput of a model, or end-to-end HTTP
//! throughput against a running server. Prints figures; asserts nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use serde_json::json;

pub use crate::cli::BenchArgs;

pub fn bench(args: BenchArgs) -> anyhow::Result<()> {
    match (&args.model, &args.http) {
        (Some(_), None) => bench_forward(&args),
        (None, Some(url)) => bench_http(&args, url),
        _ => {
            bail!("give either --model SPEC (forward pass) or --http URL --image FILE (end to end)")
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn bench_forward(args: &BenchArgs) -> anyhow::Result<()> {
    let model_args = crate::cli::ModelArgs {
        model: args.model.clone(),
        device: args.device.clone(),
        dtype: args.dtype.clone(),
        home: args.home.clone(),
    };
    let model = super::load(
        &model_args,
        crate::cli::DEFAULT_MODEL,
        None,
        &Default::default(),
    )?;
    let (h, w) = match args.size {
        Some(s) => (s, s),
        None => {
            let (h, w) = model.pipeline.nominal_input_size();
            (h as usize, w as usize)
        }
    };
    let variant = model.network.variant();
    let threads = candle_core::utils::get_num_threads();
    let mut rows = Vec::new();
    for &batch in &args.batch {
        let x = Tensor::rand(0f32, 1f32, (batch, 3, h, w), &Device::Cpu)?
            .to_dtype(model.dtype)?
            .to_device(&model.device)?;
        let run = || -> anyhow::Result<()> {
            // Wait for the device: copy the (small) results back.
            for y in model.network.run(&x, None)? {
                y.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
            }
            Ok(())
        };
        let warm = Instant::now();
        let mut warm_runs = 0;
        while warm_runs < 2 || warm.elapsed() < Duration::from_secs(1) {
            run()?;
            warm_runs += 1;
        }
        let mut times = Vec::new();
        let start = Instant::now();
        while times.len() < 3 || start.elapsed().as_secs_f64() < args.seconds {
            let t = Instant::now();
            run()?;
            times.push(t.elapsed().as_secs_f64());
        }
        let med = median(times.clone());
        let row = json!({
            "batch": batch,
            "runs": times.len(),
            "median_ms": med * 1e3,
            "min_ms": times.iter().copied().fold(f64::INFINITY, f64::min) * 1e3,
            "images_per_s": batch as f64 / med,
        });
        if !args.json {
            println!(
                "{} {}  batch {:>3}  median {:>9.2} ms  min {:>9.2} ms  {:>8.2} img/s  ({} runs)",
                variant,
                format_args!("{h}x{w}"),
                batch,
                med * 1e3,
                row["min_ms"].as_f64().unwrap_or(0.0),
                batch as f64 / med,
                times.len()
            );
        }
        rows.push(row);
        if args.profile {
            print_profile(batch, &model.device, &run)?;
        }
    }
    if args.json {
        let out = json!({
            "model": args.model, "variant": variant, "input": [h, w], "device": args.device,
            "dtype": args.dtype, "threads": threads, "results": rows,
        });
        println!("{out}");
    }
    Ok(())
}

/// Runs the forward pass 3 times with the per-layer profile on and prints
/// each kind of layer's share, slowest first.
fn print_profile(
    batch: usize,
    device: &Device,
    run: &dyn Fn() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    const RUNS: u32 = 3;
    fovea_model_core::profile::enable_on(device);
    let start = Instant::now();
    let outcome = (0..RUNS).try_for_each(|_| run());
    let total = start.elapsed().as_secs_f64() / RUNS as f64;
    let rows = fovea_model_core::profile::entries();
    fovea_model_core::profile::enable(false);
    outcome?;
    println!(
        "profile, batch {batch}: {:.2} ms per forward pass",
        total * 1e3
    );
    println!(
        "{:>9} {:>6} {:>6} {:>8}  layer",
        "ms/pass", "%", "calls", "GFLOP/s"
    );
    let mut profiled = 0.0;
    for (key, e) in &rows {
        let t = e.time.as_secs_f64();
        profiled += t / RUNS as f64;
        let gflops = if e.flops > 0 {
            format!("{:8.1}", e.flops as f64 / t / 1e9)
        } else {
            format!("{:>8}", "-")
        };
        println!(
            "{:9.2} {:6.1} {:6} {gflops}  {key}",
            t / RUNS as f64 * 1e3,
            t / RUNS as f64 / total * 100.0,
            e.calls / RUNS as u64,
        );
    }
    let rest = total - profiled;
    println!(
        "{:9.2} {:6.1} {:>6} {:>8}  everything else",
        rest * 1e3,
        rest / total * 100.0,
        "",
        "-"
    );
    Ok(())
}

fn content_type_for(path: &std::path::Path) -> &'static str {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .as_deref()
    {
        Some("png") => "image/png",
        Some("webp") => "image/webp",
        Some("bmp") => "image/bmp",
        Some("gif") => "image/gif",
        Some("tif" | "tiff") => "image/tiff",
        _ => "image/jpeg",
    }
}

/// A closed loop: `concurrency` clients, each sending the next request as
/// soon as the last is answered, for `seconds` after one second of warm-up.
fn bench_http(args: &BenchArgs, url: &str) -> anyhow::Result<()> {
    let image = args.image.as_ref().context("--http needs --image FILE")?;
    let body = std::fs::read(image).with_context(|| format!("reading {}", image.display()))?;
    let content_type = content_type_for(image);
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()?;
    // One request first: fail fast on a wrong URL.
    let first = client
        .post(url)
        .header("content-type", content_type)
        .body(body.clone())
        .send()?;
    if !first.status().is_success() {
        bail!(
            "{url} answered {}: {}",
            first.status(),
            first.text().unwrap_or_default()
        );
    }

    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..args.concurrency.max(1))
        .map(|_| {
            let (client, url, body) = (client.clone(), url.to_string(), body.clone());
            let (measuring, stop, ok, failed, latencies) = (
                measuring.clone(),
                stop.clone(),
                ok.clone(),
                failed.clone(),
                latencies.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let result = client
                        .post(&url)
                        .header("content-type", content_type)
                        .body(body.clone())
                        .send();
                    let good = matches!(&result, Ok(r) if r.status().is_success());
                    if let Ok(r) = result {
                        let _ = r.bytes();
                    }
                    if measuring.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
                        if good {
                            ok.fetch_add(1, Ordering::Relaxed);
                            latencies.lock().unwrap().push(t.elapsed().as_secs_f64());
                        } else {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    measuring.store(true, Ordering::SeqCst);
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(args.seconds));
    stop.store(true, Ordering::SeqCst);
    let elapsed = start.elapsed().as_secs_f64();
    for w in workers {
        let _ = w.join();
    }
    let mut lat = latencies.lock().unwrap().clone();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        if lat.is_empty() {
            0.0
        } else {
            lat[((lat.len() - 1) as f64 * p) as usize] * 1e3
        }
    };
    let n = ok.load(Ordering::SeqCst);
    let out = json!({
        "url": url, "image": image, "concurrency": args.concurrency, "seconds": elapsed,
        "requests_ok": n, "requests_failed": failed.load(Ordering::SeqCst),
        "images_per_s": n as f64 / elapsed,
        "latency_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99)},
    });
    if args.json {
        println!("{out}");
    } else {
        println!(
            "{url}  concurrency {}  {:.2} img/s  p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  ({} ok, {} failed)",
            args.concurrency, n as f64 / elapsed, pct(0.5), pct(0.9), pct(0.99), n, failed.load(Ordering::SeqCst)
        );
    }
    Ok(())
}
