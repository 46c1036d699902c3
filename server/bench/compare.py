#!/usr/bin/env python3
"""Fovea against PyTorch eager and ONNX Runtime, same models, same machine, same run.

For ResNet-50 (torchvision), EfficientNet-B0 (timm), ViT-B/16 (timm), YOLOv8n/s
(Ultralytics, batch norm fused into the convolutions as Ultralytics' predictor does)
and DETR-R50 (transformers, at 800x1066, the size DetrImageProcessor gives a 4:3
photo) with seeded random weights (speed does not depend on the values), this script
  1. saves the weights as safetensors in their original key names (YOLO: an
     Ultralytics-style .pt checkpoint, converted with `fovea import`),
  2. times PyTorch eager and ONNX Runtime (CPU, the same thread count) at batch 1 and 8,
  3. times `fovea bench --model ARCH:weights.safetensors` at batch 1 and 8,
  4. optionally (--http) serves the ResNet-50 with `fovea serve` and measures end-to-end
     HTTP throughput with a JPEG photo (`fovea bench --http`),
and prints images/s with the ratios Fovea / PyTorch and Fovea / ONNX Runtime.

On a GPU (`--device cuda:0`, with a `fovea` built with `--features cuda`) it compares
Fovea with PyTorch eager on the same GPU in each of `--dtypes` (f32 with TF32 off in
both, bf16, f16) at each of `--batches`; ONNX Runtime is left out there.

Usage:
    python server/bench/compare.py --fovea target/release/fovea [--seconds 10] [--threads 2] [--http]
        [--models resnet50,efficientnet_b0,vit_b16,yolov8n,yolov8s,detr_resnet50]
    python server/bench/compare.py --fovea FOVEA_CUDA --device cuda:0 --dtypes f32,bf16 \
        --batches 1,8,32,64 --no-onnx --models resnet50,efficientnet_b0,vit_b16,yolov8s,detr_resnet50
Needs: torch, torchvision, timm, ultralytics, onnxruntime, onnx, safetensors, pillow (see README).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class YoloRaw(torch.nn.Module):
    """Ultralytics' DetectionModel returns (output, features) in eval mode: keep the output."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        y = self.model(x)
        return y[0] if isinstance(y, (list, tuple)) else y


class DetrRaw(torch.nn.Module):
    """transformers' DETR returns a ModelOutput: keep (logits, pred_boxes)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(pixel_values=x)
        return out.logits, out.pred_boxes


def build(name: str):
    """(model, fovea arch prefix, input (height, width))."""
    torch.manual_seed(0)
    if name.startswith("yolov8"):
        from ultralytics.nn.tasks import DetectionModel

        model = DetectionModel(f"{name}.yaml", nc=80, verbose=False).eval()
        return model, "yolo", (640, 640)
    if name == "resnet50":
        import torchvision

        return torchvision.models.resnet50(weights=None).eval(), "resnet50", (224, 224)
    if name == "detr_resnet50":
        from transformers import DetrConfig, DetrForObjectDetection

        return DetrForObjectDetection(DetrConfig()).eval(), "detr", (800, 1066)
    import timm

    arch = {"efficientnet_b0": "efficientnet_b0", "vit_b16": "vit_base_patch16_224"}[name]
    return timm.create_model(arch, pretrained=False).eval(), arch, (224, 224)


def save_for_fovea(fovea, model, arch, name, tmp):
    """The weights as Fovea loads them: safetensors in the original key names; for YOLO,
    an Ultralytics checkpoint (a pickled module, fp16, as Ultralytics saves it) imported
    with `fovea import`."""
    if arch == "detr":
        # The published checkpoints' layout, as save_pretrained writes it.
        model.save_pretrained(os.path.join(tmp, name))
        return os.path.join(tmp, name, "model.safetensors")
    if arch != "yolo":
        weights = os.path.join(tmp, f"{name}.safetensors")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
        return f"{arch}:{weights}"
    import copy

    pt = os.path.join(tmp, f"{name}.pt")
    torch.save({"model": copy.deepcopy(model).half(), "epoch": -1, "date": None}, pt)
    weights = os.path.join(tmp, f"{name}.safetensors")
    subprocess.run([fovea, "import", pt, weights], check=True, capture_output=True)
    return weights


def prepare_torch(model, arch):
    """What runs in PyTorch: YOLO fused (Conv+BN) as Ultralytics' predictor runs it."""
    if arch == "yolo":
        return YoloRaw(model.fuse(verbose=False)).eval()
    if arch == "detr":
        return DetrRaw(model).eval()
    return model


def timed(fn, seconds: float, min_runs: int = 3) -> float:
    """Median seconds per call after a warm-up of at least 2 calls / 1 s."""
    t0 = time.perf_counter()
    n = 0
    while n < 2 or time.perf_counter() - t0 < 1.0:
        fn()
        n += 1
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def bench_torch(model, batches, seconds, size, device="cpu", dtype="f32"):
    out = {}
    model = model.to(device=device, dtype=TORCH_DTYPES[dtype])

    def run(x):
        model(x)
        if device != "cpu":
            torch.cuda.synchronize()

    with torch.inference_mode():
        for b in batches:
            x = torch.rand(b, 3, *size, device=device, dtype=TORCH_DTYPES[dtype])
            out[b] = b / timed(lambda: run(x), seconds)
    model.to(device="cpu", dtype=torch.float32)
    return out


def bench_ort(model, batches, seconds, threads, tmp, name, size):
    import onnxruntime as ort

    path = os.path.join(tmp, f"{name}.onnx")
    torch.onnx.export(model, (torch.rand(1, 3, *size),), path, input_names=["x"],
                      dynamic_axes={"x": {0: "b"}}, opset_version=17, dynamo=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    out = {}
    for b in batches:
        x = torch.rand(b, 3, *size).numpy()
        out[b] = b / timed(lambda: sess.run(None, {"x": x}), seconds)
    return out


def bench_fovea(fovea, spec, batches, seconds, threads, device="cpu", dtype="f32"):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    cmd = [fovea, "bench", "--model", spec, "--batch", ",".join(map(str, batches)), "--seconds", str(seconds),
           "--device", device, "--dtype", dtype, "--json"]
    res = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
    return {r["batch"]: r["images_per_s"] for r in res["results"]}


def each_batch(what, run):
    """`run` all batch sizes at once (one process, one model load) and, if that fails,
    one at a time: a size that fails (out of GPU memory, say) is reported and left out."""
    def runner(batches):
        try:
            return run(batches)
        except Exception as e:  # noqa: BLE001 - retried size by size below
            print(f"{what}: {type(e).__name__}; trying each batch size alone", file=sys.stderr)
        out = {}
        for b in batches:
            try:
                out.update(run([b]))
            except Exception as e:  # noqa: BLE001 - report and go on with the other sizes
                detail = getattr(e, "stderr", None) or str(e)
                print(f"{what} batch {b} failed: {type(e).__name__}: {str(detail)[-400:]}", file=sys.stderr)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        return out
    return runner


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape_batches(port):
    """The server's own counts: images and forward passes so far, device memory in use."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    values = {}
    for line in text.splitlines():
        for name in ("fovea_batch_size_sum", "fovea_batch_size_count", "fovea_device_memory_used_bytes"):
            if line.startswith(name + "{"):
                values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def bench_http(fovea, spec, seconds, threads, tmp, route, device="cpu", dtype="f32"):
    from PIL import Image

    jpeg = os.path.join(tmp, "coffee.jpg")
    Image.open(os.path.join(REPO, "tests", "images", "coffee.png")).convert("RGB").save(jpeg, quality=90)
    port = free_port()
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), FOVEA_HOME=os.path.join(tmp, "home"))
    max_batch = "8" if device == "cpu" else "32"
    server = subprocess.Popen([fovea, "serve", "--http-addr", f"127.0.0.1:{port}", "--model", f"bench={spec}",
                               "--device", device, "--dtype", dtype,
                               "--max-batch-size", max_batch, "--max-queue-delay-ms", "5"], env=env,
                              stderr=subprocess.DEVNULL)
    try:
        import urllib.request

        for _ in range(600):
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz").status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        rows = {}
        for conc in (1, 4, 16) if device == "cpu" else (1, 16, 64):
            before = scrape_batches(port)
            out = subprocess.run([fovea, "bench", "--http", f"http://127.0.0.1:{port}{route}", "--image", jpeg,
                                  "--concurrency", str(conc), "--seconds", str(seconds), "--json"],
                                 check=True, capture_output=True, text=True).stdout
            rows[conc] = json.loads(out)
            after = scrape_batches(port)
            # The batches the server formed under this load (its warm-up second included).
            delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
            passes = delta.get("fovea_batch_size_count", 0.0)
            rows[conc]["server"] = {
                "mean_batch": delta.get("fovea_batch_size_sum", 0.0) / passes if passes else None,
                "device_memory_used_bytes": after.get("fovea_device_memory_used_bytes"),
            }
        return rows
    finally:
        server.terminate()
        server.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fovea", default=os.path.join(REPO, "target", "release", "fovea"))
    ap.add_argument("--fovea-base", help="a second fovea (another build, e.g. without cuDNN) timed on the "
                    "same weights in the same run: the 'Base' column")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="resnet50,efficientnet_b0")
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--http", action="store_true",
                    help="also measure end-to-end HTTP throughput (ResNet-50 classify, YOLOv8n detect)")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--device", default="cpu", help="cpu or cuda:N (Fovea built with --features cuda)")
    ap.add_argument("--dtypes", default="f32", help="comma-separated: f32, f16, bf16")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    on_gpu = args.device != "cpu"
    if on_gpu:
        # Plain f32 on both sides: candle's f32 matmuls do not use TF32.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    batches = [int(b) for b in args.batches.split(",")]
    dtypes = args.dtypes.split(",")
    results = {"threads": args.threads, "torch": torch.__version__, "device": args.device, "models": {}}
    if on_gpu:
        results["gpu"] = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory(prefix="fovea_bench_") as tmp:
        for name in args.models.split(","):
            model, arch, size = build(name)
            spec = save_for_fovea(args.fovea, model, arch, name, tmp)
            model = prepare_torch(model, arch)
            for dtype in dtypes:
                key = name if dtype == "f32" else f"{name} {dtype}"
                torch_run = lambda bs: bench_torch(model, bs, args.seconds, size, args.device, dtype)  # noqa: E731
                fovea_run = lambda bs: bench_fovea(args.fovea, spec, bs, args.seconds, args.threads,  # noqa: E731
                                                   args.device, dtype)
                base_run = lambda bs: bench_fovea(args.fovea_base, spec, bs, args.seconds,  # noqa: E731
                                                  args.threads, args.device, dtype)
                if on_gpu:
                    # One batch size at a time: one that does not fit leaves the others.
                    torch_run = each_batch(f"{key} PyTorch", torch_run)
                    fovea_run = each_batch(f"{key} Fovea", fovea_run)
                    base_run = each_batch(f"{key} Fovea base", base_run)
                row = {"torch": torch_run(batches)}
                if not args.no_onnx and not on_gpu and dtype == "f32":
                    try:
                        row["onnxruntime"] = bench_ort(model, batches, args.seconds, args.threads, tmp, name, size)
                    except Exception as e:  # noqa: BLE001 - an export failure leaves that column empty
                        print(f"{name}: no ONNX Runtime figure ({type(e).__name__}: {e})", file=sys.stderr)
                row["fovea"] = fovea_run(batches)
                if args.fovea_base:
                    row["fovea_base"] = base_run(batches)
                results["models"][key] = row
                print(json.dumps({key: row}), flush=True)
            if args.http and name in ("resnet50", "yolov8n", "yolov8s"):
                route = "/v1/detect" if arch == "yolo" else "/v1/classify"
                # On a GPU the server runs in the last dtype given (bf16 in gpu-check.sh).
                results[f"http_{name}"] = bench_http(args.fovea, spec, args.seconds, args.threads, tmp, route,
                                                     args.device, dtypes[-1] if on_gpu else "f32")

    where = results.get("gpu", f"{args.threads} threads")
    base = args.fovea_base is not None
    print(f"\nimages/s, {where} (higher is better); ratio = Fovea / other")
    print(f"{'model':22s} {'batch':>5s} {'Fovea':>8s} {'PyTorch':>8s} {'ORT':>8s} {'/PyTorch':>9s} {'/ORT':>6s}"
          + (f" {'Base':>8s} {'/Base':>6s}" if base else ""))
    cell = lambda v, w: f"{v:{w}.2f}" if v else f"{'-':>{w}s}"  # noqa: E731
    for name, row in results["models"].items():
        for b in batches:
            f, t = row["fovea"].get(b), row["torch"].get(b)
            o = row.get("onnxruntime", {}).get(b)
            line = (f"{name:22s} {b:5d} {cell(f, 8)} {cell(t, 8)} {cell(o, 8)} "
                    f"{cell(f and t and f / t, 9)} {cell(f and o and f / o, 6)}")
            if base:
                fb = row.get("fovea_base", {}).get(b)
                line += f" {cell(fb, 8)} {cell(f and fb and f / fb, 6)}"
            print(line)
    for name in ("resnet50", "yolov8n", "yolov8s"):
        if f"http_{name}" not in results:
            continue
        route = "/v1/detect" if name.startswith("yolo") else "/v1/classify"
        print(f"\nend to end, {name}, 600x400 JPEG per request, POST {route}:")
        for conc, r in results[f"http_{name}"].items():
            lat = r["latency_ms"]
            batch = r.get("server", {}).get("mean_batch")
            formed = f", mean batch {batch:.1f}" if batch else ""
            print(f"  concurrency {conc}: {r['images_per_s']:.2f} img/s, p50 {lat['p50']:.0f} ms, "
                  f"p99 {lat['p99']:.0f} ms ({r['requests_failed']} failed){formed}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
