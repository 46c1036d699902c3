#!/usr/bin/env python3
"""Fovea's KServe V2 / Open Inference Protocol surface, driven by NVIDIA's
real Triton clients (tritonclient.http and tritonclient.grpc) and by raw
HTTP / gRPC requests for what the clients refuse to send.

Every output is compared with `fovea run` on the same input, or with the
server's own /v1 answers for encoded images: no expected number is written
here. All checks run; the failures are listed at the end and the exit
status is 1 if there is any.

Run by tests/tests/kserve_interop.rs, which starts the servers:
  main server:  a classifier, a YOLO detector and a DETR (names and specs
                given with --classifier, --detector, --detr NAME=SPEC);
  small server: the classifier alone, with max_batch_size 1 and a tiny
                queue (--small-http, --small-grpc, --small-queue).
"""

import argparse
import base64
import concurrent.futures
import hashlib
import http.client
import json
import os
import subprocess
import sys
import threading
import time
import traceback

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from safetensors.numpy import load_file, save_file
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

TOL = 1e-5  # max|diff| / max|ref|
SCORE_TOL = 1e-5
BOX_TOL_PX = 1e-3
# DETR's pixel_values size (within the main server's DETR input sizes).
DETR_HW = (160, 208)


class CheckFailed(Exception):
    pass


def ensure(cond, msg):
    if not cond:
        raise CheckFailed(msg)


def parse_spec(text):
    name, sep, spec = text.partition("=")
    if not sep or not name or not spec:
        raise SystemExit(f"expected NAME=SPEC, got {text!r}")
    return name, spec


def split_addr(addr):
    host, _, port = addr.rpartition(":")
    return host, int(port)


# ---------------------------------------------------------------- helpers


class Ctx:
    def __init__(self, args):
        self.args = args
        self.protocols = tuple(p for p in args.protocols.split(",") if p)
        ensure(set(self.protocols) <= {"http", "grpc"} and self.protocols, f"--protocols {args.protocols!r}")
        self.fovea = args.fovea
        self.scratch = args.scratch
        os.makedirs(self.scratch, exist_ok=True)
        self.cls_name, self.cls_spec = parse_spec(args.classifier)
        self.yolo_name, self.yolo_spec = parse_spec(args.detector)
        self.detr_name, self.detr_spec = parse_spec(args.detr)
        self.specs = {
            self.cls_name: self.cls_spec,
            self.yolo_name: self.yolo_spec,
            self.detr_name: self.detr_spec,
        }
        self.http = httpclient.InferenceServerClient(args.http, network_timeout=120.0)
        self.grpc = grpcclient.InferenceServerClient(args.grpc)
        self.images = {
            name: open(os.path.join(args.images, name), "rb").read()
            for name in sorted(os.listdir(args.images))
            if name.lower().endswith((".png", ".jpg", ".jpeg"))
        }
        ensure(len(self.images) >= 3, f"need 3 images in {args.images}")
        self._runs = {}
        self._v1 = {}

    def has(self, proto):
        return proto in self.protocols

    # -- /v1 and raw HTTP

    def raw(self, method, path, body=None, headers=None, addr=None, timeout=120):
        host, port = split_addr(addr or self.args.http)
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            conn.close()

    def v1_model(self, name):
        key = ("model", name)
        if key not in self._v1:
            status, _, body = self.raw("GET", f"/v1/models/{name}")
            ensure(status == 200, f"GET /v1/models/{name}: {status} {body[:300]!r}")
            self._v1[key] = json.loads(body)
        return self._v1[key]

    def v1_post(self, route, image, query):
        key = (route, image, query)
        if key not in self._v1:
            ctype = "image/jpeg" if image.lower().endswith((".jpg", ".jpeg")) else "image/png"
            status, _, body = self.raw(
                "POST", f"{route}?{query}", self.images[image], {"Content-Type": ctype}
            )
            ensure(status == 200, f"POST {route}?{query} {image}: {status} {body[:300]!r}")
            self._v1[key] = json.loads(body)
        return self._v1[key]

    # -- the reference: `fovea run`

    def fovea_run(self, model, inputs):
        """`fovea run --model SPEC` on these inputs (name -> array)."""
        digest = hashlib.sha1()
        for k in sorted(inputs):
            digest.update(k.encode())
            digest.update(str(inputs[k].shape).encode())
            digest.update(np.ascontiguousarray(inputs[k]).tobytes())
        key = (model, digest.hexdigest())
        if key not in self._runs:
            stem = os.path.join(self.scratch, f"{model}-{key[1][:12]}")
            save_file({k: np.ascontiguousarray(v) for k, v in inputs.items()}, stem + ".in.safetensors")
            cmd = [
                self.fovea, "run", "--model", self.specs[model],
                "--input", stem + ".in.safetensors", "--output", stem + ".out.safetensors",
            ]
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            ensure(p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
            self._runs[key] = load_file(stem + ".out.safetensors")
        return self._runs[key]

    # -- V2 inference through the clients

    def infer_http(self, model, inputs, outputs=None, binary=True, class_count=0,
                   parameters=None, client=None, **kw):
        ins = []
        for name, arr in inputs.items():
            dtype = "BYTES" if arr.dtype == np.object_ else DTYPES[arr.dtype]
            i = httpclient.InferInput(name, list(arr.shape), dtype)
            i.set_data_from_numpy(arr, binary_data=binary)
            ins.append(i)
        outs = None
        if outputs is not None:
            outs = [
                httpclient.InferRequestedOutput(o, binary_data=binary,
                                                class_count=class_count if o == "logits" else 0)
                for o in outputs
            ]
        r = (client or self.http).infer(model, ins, outputs=outs, parameters=parameters, **kw)
        return r, {o["name"]: r.as_numpy(o["name"]) for o in r.get_response()["outputs"]}

    def infer_grpc(self, model, inputs, outputs=None, class_count=0, parameters=None,
                   client=None, **kw):
        ins = []
        for name, arr in inputs.items():
            dtype = "BYTES" if arr.dtype == np.object_ else DTYPES[arr.dtype]
            i = grpcclient.InferInput(name, list(arr.shape), dtype)
            i.set_data_from_numpy(arr)
            ins.append(i)
        outs = None
        if outputs is not None:
            outs = [
                grpcclient.InferRequestedOutput(o, class_count=class_count if o == "logits" else 0)
                for o in outputs
            ]
        r = (client or self.grpc).infer(model, ins, outputs=outs, parameters=parameters,
                                        client_timeout=120.0, **kw)
        resp = r.get_response()
        return r, {o.name: r.as_numpy(o.name) for o in resp.outputs}


DTYPES = {
    np.dtype(np.float32): "FP32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.int32): "INT32",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.bool_): "BOOL",
}


def pick(c, ways):
    """The ways (name, ...) whose name starts with a protocol under test."""
    return [w for w in ways if w[0].split()[0].rstrip(",") in c.protocols]


def rel_diff(got, want):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    diff = float(np.max(np.abs(got - want))) if want.size else 0.0
    return diff / scale if scale > 0 else diff


def assert_close(what, got, want):
    ensure(got is not None, f"{what}: output missing")
    ensure(tuple(got.shape) == tuple(want.shape), f"{what}: shape {got.shape} != fovea run's {want.shape}")
    ensure(got.dtype == np.float32, f"{what}: dtype {got.dtype}, want float32")
    d = rel_diff(got, want)
    ensure(d <= TOL, f"{what}: max|diff|/max|ref| = {d:.3g} > {TOL}")


def pixels(seed, b, h, w):
    """Random preprocessed-looking pixels, in quarters so that JSON stays
    short (a YOLO batch of 3 at 640x640 is 3.7M numbers)."""
    x = np.random.default_rng(seed).standard_normal((b, 3, h, w))
    return (np.round(x * 4) / 4).astype(np.float32)


def expect_error(what, fn, http_status=None, grpc_status=None):
    """fn() must raise InferenceServerException with this status; returns it."""
    try:
        fn()
    except InferenceServerException as e:
        want = http_status if http_status is not None else grpc_status
        ensure(e.status() == want,
               f"{what}: status {e.status()!r}, want {want!r} (message: {e.message()!r})")
        ensure(e.message(), f"{what}: empty error message")
        return e
    raise CheckFailed(f"{what}: succeeded, want {http_status or grpc_status}")


# ---------------------------------------------------------------- checks


def check_health(c):
    for proto, cl in pick(c, (("http", c.http), ("grpc", c.grpc))):
        ensure(cl.is_server_live(), f"{proto}: server not live")
        ensure(cl.is_server_ready(), f"{proto}: server not ready")
        for m in c.specs:
            ensure(cl.is_model_ready(m), f"{proto}: model {m} not ready")
            ensure(cl.is_model_ready(m, model_version="1"), f"{proto}: model {m} version 1 not ready")
        try:
            unknown_ready = cl.is_model_ready("no-such-model")
        except InferenceServerException as e:  # gRPC may answer NOT_FOUND instead
            ensure(e.status() == "StatusCode.NOT_FOUND", f"{proto}: unknown model ready: {e.status()} {e.message()}")
            unknown_ready = False
        ensure(not unknown_ready, f"{proto}: an unknown model is ready")
    status, _, body = c.raw("GET", "/v2/health/live")
    ensure(status == 200 and json.loads(body) == {"live": True}, f"/v2/health/live: {status} {body!r}")
    status, _, body = c.raw("GET", "/v2/health/ready")
    ensure(status == 200 and json.loads(body) == {"ready": True}, f"/v2/health/ready: {status} {body!r}")
    for m in c.specs:
        status, _, body = c.raw("GET", f"/v2/models/{m}/ready")
        ensure(status == 200 and json.loads(body) == {"name": m, "ready": True},
               f"/v2/models/{m}/ready: {status} {body!r}")


def check_server_metadata(c):
    h = c.http.get_server_metadata()
    ensure(h.get("name") == "fovea", f"http server metadata name: {h}")
    ensure(h.get("version"), f"http server metadata version: {h}")
    if c.has("grpc"):
        g = c.grpc.get_server_metadata()
        ensure(g.name == "fovea", f"grpc server metadata name: {g}")
        ensure(h["version"] == g.version, f"versions: http {h} grpc {g}")
        ensure(set(g.extensions) == {"binary_tensor_data", "classification"},
               f"grpc extensions {list(g.extensions)}")
    p = subprocess.run([c.fovea, "--version"], capture_output=True, text=True)
    if p.returncode == 0:
        ensure(h["version"] in p.stdout, f"version {h['version']!r} is not `fovea --version`'s {p.stdout!r}")
    want = {"binary_tensor_data", "classification"}
    ensure(set(h.get("extensions", [])) == want, f"http extensions {h.get('extensions')}, want {sorted(want)}")


def tensors(meta_list):
    """name -> (datatype, shape) from HTTP metadata dicts or gRPC messages."""
    out = {}
    for t in meta_list:
        if isinstance(t, dict):
            out[t["name"]] = (t["datatype"], [int(d) for d in t["shape"]])
        else:
            out[t.name] = (t.datatype, [int(d) for d in t.shape])
    return out


def expected_metadata(c, model):
    """(inputs, outputs) as the contract describes them, with sizes from
    /v1/models and from `fovea run`'s output shapes."""
    info = c.v1_model(model)
    if model == c.detr_name:
        ref = c.fovea_run(model, {"pixel_values": pixels(0, 1, *DETR_HW)})
        q, k = ref["logits"].shape[1:]
        ensure(ref["pred_boxes"].shape[1:] == (q, 4), f"fovea run pred_boxes {ref['pred_boxes'].shape}")
        inputs = {
            "pixel_values": ("FP32", [-1, 3, -1, -1]),
            "pixel_mask": ("INT64", [-1, -1, -1]),
            "images": ("BYTES", [-1]),
        }
        outputs = {
            "logits": ("FP32", [-1, q, k]),
            "pred_boxes": ("FP32", [-1, q, 4]),
            "detections": ("BYTES", [-1]),
        }
        return inputs, outputs
    size = info.get("input_size")
    ensure(isinstance(size, list) and len(size) == 2, f"/v1/models/{model} input_size {size!r}")
    h, w = size
    inputs = {"pixel_values": ("FP32", [-1, 3, h, w]), "images": ("BYTES", [-1])}
    if model == c.cls_name:
        outputs = {"logits": ("FP32", [-1, int(info["num_classes"])])}
    else:
        ref = c.fovea_run(model, {"pixel_values": pixels(0, 1, h, w)})
        rows, anchors = ref["output"].shape[1:]
        ensure(rows == 4 + int(info["num_classes"]), f"fovea run output {ref['output'].shape} vs {info['num_classes']} classes")
        outputs = {"output": ("FP32", [-1, rows, anchors]), "detections": ("BYTES", [-1])}
    return inputs, outputs


def check_model_metadata(c):
    for m in c.specs:
        want_in, want_out = expected_metadata(c, m)
        h = c.http.get_model_metadata(m)
        h1 = c.http.get_model_metadata(m, model_version="1")
        ensure(h == h1, f"{m}: /versions/1 metadata differs: {h} vs {h1}")
        ensure(h.get("name") == m, f"{m}: http name {h.get('name')}")
        ensure(h.get("versions") == ["1"], f"{m}: http versions {h.get('versions')}")
        ensure(h.get("platform") == "fovea", f"{m}: http platform {h.get('platform')}")
        seen = [("http", tensors(h["inputs"]), tensors(h["outputs"]))]
        if c.has("grpc"):
            g = c.grpc.get_model_metadata(m)
            ensure(g.name == m, f"{m}: grpc name {g.name}")
            ensure(list(g.versions) == ["1"], f"{m}: grpc versions {list(g.versions)}")
            ensure(g.platform == "fovea", f"{m}: grpc platform {g.platform}")
            seen.append(("grpc", tensors(g.inputs), tensors(g.outputs)))
        for proto, got_in, got_out in seen:
            ensure(got_in == want_in, f"{proto} {m} inputs {got_in}, want {want_in}")
            ensure(got_out == want_out, f"{proto} {m} outputs {got_out}, want {want_out}")


def input_hw(c, model):
    if model == c.detr_name:
        return DETR_HW
    return tuple(c.v1_model(model)["input_size"])


def raw_outputs(c, model):
    return {c.cls_name: ["logits"], c.yolo_name: ["output"], c.detr_name: ["logits", "pred_boxes"]}[model]


def check_tensor_inference(c, model):
    h, w = input_hw(c, model)
    for b, seed in ((1, 11), (3, 12)):
        x = pixels(seed, b, h, w)
        inputs = {"pixel_values": x}
        if model == c.detr_name:
            inputs["pixel_mask"] = np.ones((b, h, w), dtype=np.int64)
        ref = c.fovea_run(model, inputs)
        names = raw_outputs(c, model)
        ways = [
            ("http binary", lambda: c.infer_http(model, inputs, names, binary=True)),
            ("http json", lambda: c.infer_http(model, inputs, names, binary=False)),
            ("http binary, no outputs named", lambda: c.infer_http(model, inputs, None)),
            ("grpc raw_input_contents", lambda: c.infer_grpc(model, inputs, names)),
            ("grpc, no outputs named", lambda: c.infer_grpc(model, inputs, None)),
        ]
        for way, call in pick(c, ways):
            _, got = call()
            ensure(set(got) == set(names),
                   f"{model} {way} batch {b}: outputs {sorted(got)}, want {sorted(names)}")
            for n in names:
                assert_close(f"{model} {way} batch {b} {n}", got[n], ref[n])


def check_detr_padding_and_mask_types(c):
    """A padded image (ones in its top-left rectangle) is computed alone at
    its unpadded size: equal to `fovea run` on the crop. The other mask
    datatypes the contract accepts give the same answer."""
    m = c.detr_name
    h, w = DETR_HW
    x = pixels(21, 2, h, w)
    ch, cw = h - 32, w - 48
    x[1, :, ch:, :] = 0
    x[1, :, :, cw:] = 0
    mask = np.ones((2, h, w), dtype=np.int64)
    mask[1, ch:, :] = 0
    mask[1, :, cw:] = 0
    full = c.fovea_run(m, {"pixel_values": x[:1]})
    crop = c.fovea_run(m, {"pixel_values": np.ascontiguousarray(x[1:, :, :ch, :cw])})
    for dt in (np.int64, np.int32, np.uint8, np.bool_):
        inputs = {"pixel_values": x, "pixel_mask": mask.astype(dt)}
        for way, call in pick(c, (
            ("http", lambda: c.infer_http(m, inputs, ["logits", "pred_boxes"])),
            ("grpc", lambda: c.infer_grpc(m, inputs, ["logits", "pred_boxes"])),
        )):
            _, got = call()
            for n in ("logits", "pred_boxes"):
                assert_close(f"detr {way} mask {DTYPES[np.dtype(dt)]} image 0 {n}", got[n][:1], full[n])
                assert_close(f"detr {way} mask {DTYPES[np.dtype(dt)]} padded image 1 {n}", got[n][1:], crop[n])


def parse_classification(entry):
    text = entry.decode() if isinstance(entry, bytes) else str(entry)
    value, index, label = text.split(":", 2)
    return float(value), int(index), label


def check_classification(c):
    m = c.cls_name
    h, w = input_hw(c, m)
    x = pixels(31, 2, h, w)
    ref = c.fovea_run(m, {"pixel_values": x})["logits"]
    # Labels from /v1/classify (every class of one image).
    n = int(c.v1_model(m)["num_classes"])
    first = sorted(c.images)[0]
    preds = c.v1_post("/v1/classify", first, f"model={m}&top_k={n}")["results"][0]["predictions"]
    labels = {p["class_id"]: p["label"] for p in preds}
    for way, call in pick(c, (
        ("http binary", lambda: c.infer_http(m, {"pixel_values": x}, ["logits"], class_count=3)),
        ("http json", lambda: c.infer_http(m, {"pixel_values": x}, ["logits"], binary=False, class_count=3)),
        ("grpc", lambda: c.infer_grpc(m, {"pixel_values": x}, ["logits"], class_count=3)),
    )):
        _, got = call()
        cls = got.get("logits")
        ensure(cls is not None and cls.shape == (2, 3), f"classification {way}: {None if cls is None else cls.shape}")
        for b in range(2):
            top = np.argsort(-ref[b], kind="stable")[:3]
            entries = [parse_classification(e) for e in cls[b]]
            ensure([e[1] for e in entries] == [int(i) for i in top],
                   f"classification {way} image {b}: indices {[e[1] for e in entries]}, want {list(top)} ({cls[b]})")
            scale = float(np.max(np.abs(ref[b])))
            for value, index, label in entries:
                ensure(abs(value - float(ref[b, index])) <= TOL * scale,
                       f"classification {way} image {b}: {value} vs logit {ref[b, index]}")
                ensure(label == labels.get(index), f"classification {way}: label {label!r}, /v1 says {labels.get(index)!r}")


def image_batch(c, names, binary):
    if binary:
        return np.array([c.images[n] for n in names], dtype=np.object_)
    return np.array([base64.b64encode(c.images[n]).decode() for n in names], dtype=np.object_)


def v1_detections(result):
    return [
        (d["class_id"], d["score"], [d["box"][k] for k in ("x1", "y1", "x2", "y2")])
        for d in result["detections"]
    ]


def same_detections(what, got, want):
    ensure(len(got) == len(want), f"{what}: {len(got)} detections, /v1 has {len(want)}")
    free = [True] * len(got)
    for wd in want:
        hit = next(
            (i for i, gd in enumerate(got)
             if free[i] and gd[0] == wd[0] and abs(gd[1] - wd[1]) <= SCORE_TOL
             and all(abs(a - b) <= BOX_TOL_PX for a, b in zip(gd[2], wd[2]))),
            None,
        )
        ensure(hit is not None, f"{what}: no match for /v1's {wd} in {got[:5]}...")
        free[hit] = False


def check_detector_images(c, model, confidence):
    names = sorted(c.images)[:3]
    params = None if confidence is None else {"confidence": confidence}
    query = f"model={model}" + ("" if confidence is None else f"&confidence={confidence}")
    want = [c.v1_post("/v1/detect", n, query)["results"][0] for n in names]
    if confidence is not None:
        ensure(any(w["detections"] for w in want), f"/v1/detect {query}: no detections at all")
    for batch in (names[:1], names):
        for way, call in pick(c, (
            ("http binary", lambda: c.infer_http(model, {"images": image_batch(c, batch, True)}, ["detections"], parameters=params)),
            ("http json", lambda: c.infer_http(model, {"images": image_batch(c, batch, False)}, ["detections"], binary=False, parameters=params)),
            ("grpc", lambda: c.infer_grpc(model, {"images": image_batch(c, batch, True)}, ["detections"], parameters=params)),
            ("grpc, no outputs named", lambda: c.infer_grpc(model, {"images": image_batch(c, batch, True)}, None, parameters=params)),
        )):
            _, got = call()
            det = got.get("detections")
            what = f"{model} images {way} batch {len(batch)} confidence {confidence}"
            ensure(det is not None and det.shape == (len(batch),), f"{what}: detections {None if det is None else det.shape}")
            if "no outputs" in way:
                raw = raw_outputs(c, model)
                ensure(set(got) == set(raw) | {"detections"}, f"{what}: outputs {sorted(got)}")
                for n in raw:
                    ensure(got[n].shape[0] == len(batch), f"{what}: {n} shape {got[n].shape}")
            for i, n in enumerate(batch):
                entry = det[i]
                obj = json.loads(entry.decode() if isinstance(entry, bytes) else entry)
                ensure((obj.get("width"), obj.get("height")) == (want[i]["width"], want[i]["height"]),
                       f"{what} {n}: size {obj.get('width')}x{obj.get('height')}, /v1 {want[i]['width']}x{want[i]['height']}")
                labels_ok = all(d.get("label") == wd["label"] for d, wd in zip(
                    sorted(obj["detections"], key=lambda d: (d["class_id"], -d["score"])),
                    sorted(want[i]["detections"], key=lambda d: (d["class_id"], -d["score"]))))
                ensure(labels_ok, f"{what} {n}: labels differ from /v1")
                same_detections(f"{what} {n}", v1_detections(obj), v1_detections(want[i]))


def softmax_top(logits, k):
    z = logits.astype(np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    top = np.argsort(-p, kind="stable")[:k]
    return [(int(i), float(p[i])) for i in top]


def check_classifier_images(c):
    m = c.cls_name
    names = sorted(c.images)[:3]
    want = [c.v1_post("/v1/classify", n, f"model={m}&top_k=5")["results"][0]["predictions"] for n in names]
    for batch in (names[:1], names):
        for way, call in pick(c, (
            ("http binary", lambda: c.infer_http(m, {"images": image_batch(c, batch, True)}, ["logits"])),
            ("http json", lambda: c.infer_http(m, {"images": image_batch(c, batch, False)}, ["logits"], binary=False)),
            ("grpc", lambda: c.infer_grpc(m, {"images": image_batch(c, batch, True)}, ["logits"])),
        )):
            _, got = call()
            logits = got.get("logits")
            what = f"classifier images {way} batch {len(batch)}"
            ensure(logits is not None and logits.shape[0] == len(batch), f"{what}: logits {None if logits is None else logits.shape}")
            for i, n in enumerate(batch):
                top = softmax_top(logits[i], 5)
                ids = [p["class_id"] for p in want[i]]
                ensure([t[0] for t in top] == ids, f"{what} {n}: top-5 {[t[0] for t in top]}, /v1 {ids}")
                for (_, s), p in zip(top, want[i]):
                    ensure(abs(s - p["score"]) <= SCORE_TOL, f"{what} {n}: score {s} vs /v1 {p['score']}")


def check_unknown_model(c):
    x = pixels(41, 1, *input_hw(c, c.cls_name))
    e = expect_error("http infer unknown model",
                     lambda: c.infer_http("no-such-model", {"pixel_values": x}, ["logits"]), http_status="404")
    expect_error("http metadata unknown model", lambda: c.http.get_model_metadata("no-such-model"), http_status="404")
    expect_error("http infer unknown version",
                 lambda: c.infer_http(c.cls_name, {"pixel_values": x}, ["logits"], model_version="2"), http_status="404")
    ensure("no-such-model" in e.message(), f"404 message does not name the model: {e.message()!r}")
    if c.has("grpc"):
        g = expect_error("grpc infer unknown model",
                         lambda: c.infer_grpc("no-such-model", {"pixel_values": x}, ["logits"]),
                         grpc_status="StatusCode.NOT_FOUND")
        expect_error("grpc metadata unknown model", lambda: c.grpc.get_model_metadata("no-such-model"),
                     grpc_status="StatusCode.NOT_FOUND")
        expect_error("grpc infer unknown version",
                     lambda: c.infer_grpc(c.cls_name, {"pixel_values": x}, ["logits"], model_version="2"),
                     grpc_status="StatusCode.NOT_FOUND")
        ensure("no-such-model" in g.message(), f"NOT_FOUND message does not name the model: {g.message()!r}")
    status, _, body = c.raw("GET", "/v2/models/no-such-model")
    ensure(status == 404, f"GET /v2/models/no-such-model: {status}")
    ensure(isinstance(json.loads(body).get("error"), str), f"404 body is not {{\"error\": \"...\"}}: {body!r}")


def check_parameters(c):
    m = c.cls_name
    x = pixels(51, 1, *input_hw(c, m))
    ref = c.fovea_run(m, {"pixel_values": x})["logits"]
    # Triton's standard parameters are accepted (timeout in microseconds).
    _, got = c.infer_http(m, {"pixel_values": x}, ["logits"], priority=1, timeout=60_000_000)
    assert_close("http priority+timeout", got["logits"], ref)
    if c.has("grpc"):
        _, got = c.infer_grpc(m, {"pixel_values": x}, ["logits"], priority=1, timeout=60_000_000)
        assert_close("grpc priority+timeout", got["logits"], ref)
    # Version "1" by name.
    _, got = c.infer_http(m, {"pixel_values": x}, ["logits"], model_version="1")
    assert_close("http /versions/1/infer", got["logits"], ref)
    if c.has("grpc"):
        _, got = c.infer_grpc(m, {"pixel_values": x}, ["logits"], model_version="1")
        assert_close("grpc version 1", got["logits"], ref)
    # Nested JSON data (tritonclient sends it flat).
    body = json.dumps({"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": list(x.shape),
                                    "data": x.tolist()}]}).encode()
    status, _, resp = c.raw("POST", f"/v2/models/{m}/infer", body, {"Content-Type": "application/json"})
    ensure(status == 200, f"nested JSON data: {status} {resp[:300]!r}")
    out = {o["name"]: o for o in json.loads(resp)["outputs"]}
    ensure(out["logits"]["datatype"] == "FP32" and out["logits"]["shape"] == list(ref.shape),
           f"nested JSON data: {out['logits']['datatype']} {out['logits']['shape']}")
    assert_close("nested JSON data", np.array(out["logits"]["data"], dtype=np.float32).reshape(ref.shape), ref)
    # A deadline of 1 microsecond (Triton's `timeout`) has passed before the
    # image is computed: 504 / DEADLINE_EXCEEDED.
    expect_error("http timeout=1us", lambda: c.infer_http(m, {"pixel_values": x}, ["logits"], timeout=1),
                 http_status="504")
    if c.has("grpc"):
        expect_error("grpc timeout=1us", lambda: c.infer_grpc(m, {"pixel_values": x}, ["logits"], timeout=1),
                     grpc_status="StatusCode.DEADLINE_EXCEEDED")
    # Unknown ones are refused.
    expect_error("http unknown parameter",
                 lambda: c.infer_http(m, {"pixel_values": x}, ["logits"], parameters={"bogus": 1}),
                 http_status="400")
    if c.has("grpc"):
        expect_error("grpc unknown parameter",
                     lambda: c.infer_grpc(m, {"pixel_values": x}, ["logits"], parameters={"bogus": 1}),
                     grpc_status="StatusCode.INVALID_ARGUMENT")


def check_queue_full(c):
    a = c.args
    m = c.cls_name
    small_http = httpclient.InferenceServerClient(a.small_http, network_timeout=120.0)
    small_grpc = grpcclient.InferenceServerClient(a.small_grpc)
    h, w = input_hw(c, m)
    # A request with more images than the whole queue holds is refused as a
    # full queue, every time (the batcher admits a request's images all or none).
    big = pixels(61, a.small_queue + 1, h, w)
    expect_error("http request larger than the queue",
                 lambda: c.infer_http(m, {"pixel_values": big}, ["logits"], client=small_http), http_status="429")
    if c.has("grpc"):
        expect_error("grpc request larger than the queue",
                     lambda: c.infer_grpc(m, {"pixel_values": big}, ["logits"], client=small_grpc),
                     grpc_status="StatusCode.RESOURCE_EXHAUSTED")
    # The raw answer: {"error": "..."} and Retry-After.
    raw = big.tobytes()
    body, headers = v2_body({"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": list(big.shape),
                                         "parameters": {"binary_data_size": len(raw)}}]}, raw)
    status, headers, resp = c.raw("POST", f"/v2/models/{m}/infer", body, headers, addr=a.small_http)
    ensure(status == 429, f"raw 429: {status} {resp[:300]!r}")
    ensure(isinstance(json.loads(resp).get("error"), str), f"429 body: {resp[:300]!r}")
    ensure(any(k.lower() == "retry-after" for k in headers), f"429 without Retry-After: {headers}")

    # Concurrent single-image requests: each either succeeds with the right
    # answer or is refused as a full queue; bursts until some are refused.
    x = pixels(62, 1, h, w)
    ref = c.fovea_run(m, {"pixel_values": x})["logits"]
    refused = {"http": 0, "grpc": 0}
    ok = {"http": 0, "grpc": 0}
    lock = threading.Lock()
    # tritonclient.http's client is not thread-safe: one client per thread.
    local = threading.local()

    def one(proto):
        if not hasattr(local, "http"):
            local.http = httpclient.InferenceServerClient(a.small_http, network_timeout=120.0)
            local.grpc = grpcclient.InferenceServerClient(a.small_grpc)
        try:
            if proto == "http":
                _, got = c.infer_http(m, {"pixel_values": x}, ["logits"], client=local.http)
            else:
                _, got = c.infer_grpc(m, {"pixel_values": x}, ["logits"], client=local.grpc)
        except InferenceServerException as e:
            want = "429" if proto == "http" else "StatusCode.RESOURCE_EXHAUSTED"
            ensure(e.status() == want, f"{proto} under load: {e.status()} {e.message()!r}, want {want}")
            with lock:
                refused[proto] += 1
            return
        assert_close(f"{proto} accepted under load", got["logits"], ref)
        with lock:
            ok[proto] += 1

    for _ in range(10):
        with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
            futures = [pool.submit(one, p) for p in c.protocols * (32 // len(c.protocols))]
            for f in futures:
                f.result()
        if all(refused[p] and ok[p] for p in c.protocols):
            break
    print(f"      under load: refused {refused}, accepted {ok}", flush=True)
    ensure(all(refused[p] for p in c.protocols), f"no refusals under load: refused {refused}, ok {ok}")
    ensure(all(ok[p] for p in c.protocols), f"nothing accepted under load: refused {refused}, ok {ok}")
    # And it serves again once the queue drains.
    _, got = c.infer_http(m, {"pixel_values": x}, ["logits"], client=small_http)
    assert_close("http after the load", got["logits"], ref)
    small_http.close()
    small_grpc.close()


# -- bad input, raw requests


def still_serves(c, what):
    m = c.cls_name
    x = pixels(71, 1, *input_hw(c, m))
    ref = c.fovea_run(m, {"pixel_values": x})["logits"]
    try:
        _, got = c.infer_http(m, {"pixel_values": x}, ["logits"])
        assert_close(f"good http request after {what}", got["logits"], ref)
        if c.has("grpc"):
            _, got = c.infer_grpc(m, {"pixel_values": x}, ["logits"])
            assert_close(f"good grpc request after {what}", got["logits"], ref)
    except InferenceServerException as e:
        raise CheckFailed(f"good request after {what}: {e.status()} {e.message()}")


def v2_body(header, binary=b""):
    head = json.dumps(header).encode()
    headers = {"Content-Type": "application/octet-stream" if binary else "application/json"}
    if binary:
        headers["Inference-Header-Content-Length"] = str(len(head))
    return head + binary, headers


def check_bad_http(c):
    m = c.cls_name
    h, w = input_hw(c, m)
    x = pixels(81, 1, h, w)
    xb = x.tobytes()
    path = f"/v2/models/{m}/infer"

    def tensor(name="pixel_values", datatype="FP32", shape=(1, 3, h, w), size=None, data=None):
        t = {"name": name, "datatype": datatype, "shape": list(shape)}
        if size is not None:
            t["parameters"] = {"binary_data_size": size}
        if data is not None:
            t["data"] = data
        return t

    cases = [
        ("wrong datatype (INT32 data)", "pixel_values",
         *v2_body({"inputs": [tensor(datatype="INT32", data=[0] * (3 * h * w))]})),
        ("wrong datatype (binary FP64)", "pixel_values",
         *v2_body({"inputs": [tensor(datatype="FP64", size=len(xb) * 2)]}, x.astype(np.float64).tobytes())),
        ("wrong shape (H+1)", "pixel_values",
         *v2_body({"inputs": [tensor(shape=(1, 3, h + 1, w), size=3 * (h + 1) * w * 4)]},
                  np.zeros((1, 3, h + 1, w), np.float32).tobytes())),
        ("wrong shape (4 channels)", "pixel_values",
         *v2_body({"inputs": [tensor(shape=(1, 4, h, w), size=4 * h * w * 4)]},
                  np.zeros((1, 4, h, w), np.float32).tobytes())),
        ("wrong rank", "pixel_values",
         *v2_body({"inputs": [tensor(shape=(3, h, w), size=len(xb))]}, xb)),
        ("JSON data shorter than the shape", "pixel_values",
         *v2_body({"inputs": [tensor(data=[0.0] * 10)]})),
        ("binary_data_size smaller than the shape needs", "pixel_values",
         *v2_body({"inputs": [tensor(size=len(xb) // 2)]}, xb[: len(xb) // 2])),
        ("truncated binary data", None,
         *v2_body({"inputs": [tensor(size=len(xb))]}, xb[:-100])),
    ]
    # An Inference-Header-Content-Length larger than the body.
    body, headers = v2_body({"inputs": [tensor(size=len(xb))]}, xb)
    headers["Inference-Header-Content-Length"] = str(len(body) + 1000)
    cases.append(("Inference-Header-Content-Length larger than the body", None, body, headers))
    # Huge declared shapes with a tiny body: refused before allocating.
    cases.append(("huge shape, binary", None,
                  *v2_body({"inputs": [tensor(shape=(100000, 3, 4096, 4096), size=16)]}, b"\0" * 16)))
    cases.append(("huge shape, JSON", None,
                  *v2_body({"inputs": [tensor(shape=(100000, 3, 4096, 4096), data=[0.0, 1.0])]})))
    cases.append(("huge shape, images", None,
                  *v2_body({"inputs": [tensor(name="images", datatype="BYTES", shape=(1 << 40,), data=["AA=="])]})))
    cases.append(("shape overflowing u64", None,
                  *v2_body({"inputs": [tensor(shape=(1 << 62, 3, 1 << 20, 1 << 20), size=16)]}, b"\0" * 16)))
    cases.append(("negative dimension", None,
                  *v2_body({"inputs": [tensor(shape=(-1, 3, h, w), size=len(xb))]}, xb)))
    cases.append(("not JSON", None, b"{not json", {"Content-Type": "application/json"}))
    cases.append(("no inputs", None, *v2_body({"inputs": []})))
    cases.append(("unknown input name", "nonsense",
                  *v2_body({"inputs": [tensor(name="nonsense", size=len(xb))]}, xb)))
    cases.append(("both pixel_values and images", None,
                  *v2_body({"inputs": [tensor(data=x.flatten().tolist()),
                                       tensor(name="images", datatype="BYTES", shape=(1,),
                                              data=[base64.b64encode(c.images[sorted(c.images)[0]]).decode()])]})))
    cases.append(("images that are not images", None,
                  *v2_body({"inputs": [tensor(name="images", datatype="BYTES", shape=(1,),
                                              data=[base64.b64encode(b"definitely not an image").decode()])]})))
    cases.append(("unknown output", "nonsense",
                  *v2_body({"inputs": [tensor(size=len(xb))], "outputs": [{"name": "nonsense"}]}, xb)))
    cases.append(("classification on a detector", None, None, None))
    failures = []
    for what, names, body, headers in cases:
        target = path
        if what == "classification on a detector":
            y = pixels(82, 1, *input_hw(c, c.yolo_name)).tobytes()
            body, headers = v2_body({"inputs": [tensor(shape=(1, 3, *input_hw(c, c.yolo_name)), size=len(y))],
                                     "outputs": [{"name": "output", "parameters": {"classification": 3}}]}, y)
            target = f"/v2/models/{c.yolo_name}/infer"
        try:
            started = time.monotonic()
            status, _, resp = c.raw("POST", target, body, headers, timeout=30)
            took = time.monotonic() - started
            ensure(status == 400, f"{status} {resp[:300]!r}, want 400")
            try:
                msg = json.loads(resp).get("error")
            except ValueError:
                msg = None
            ensure(isinstance(msg, str) and msg, f"body is not {{\"error\": \"...\"}}: {resp[:300]!r}")
            if names:
                ensure(names in msg, f"message does not name {names!r}: {msg!r}")
            print(f"      http {what}: {status} {msg[:150]!r}", flush=True)
            if what.startswith("huge"):
                ensure(took < 5, f"took {took:.1f}s")
            still_serves(c, what)
        except (CheckFailed, OSError) as e:
            failures.append(f"http bad input [{what}]: {e}")
    ensure(not failures, "\n    ".join(failures))


def check_bad_grpc(c):
    if not c.has("grpc"):
        return
    m = c.cls_name
    h, w = input_hw(c, m)
    x = pixels(91, 1, h, w)
    xb = x.tobytes()
    host = c.args.grpc
    channel = grpc.insecure_channel(host, options=[("grpc.max_send_message_length", 64 << 20)])
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

    def req(inputs, raw=(), outputs=(), model=m, params=None):
        r = service_pb2.ModelInferRequest(model_name=model)
        for name, datatype, shape in inputs:
            t = r.inputs.add()
            t.name, t.datatype = name, datatype
            t.shape.extend(shape)
        r.raw_input_contents.extend(raw)
        for name, cls in outputs:
            o = r.outputs.add()
            o.name = name
            if cls:
                o.parameters["classification"].int64_param = cls
        for k, v in (params or {}).items():
            r.parameters[k].string_param = v
        return r

    def contents_req(datatype, shape, field, values):
        r = req([("pixel_values", datatype, shape)])
        getattr(r.inputs[0].contents, field).extend(values)
        return r

    yh, yw = input_hw(c, c.yolo_name)
    cases = [
        ("wrong datatype (INT32 raw)", "pixel_values",
         req([("pixel_values", "INT32", [1, 3, h, w])], [np.zeros((1, 3, h, w), np.int32).tobytes()])),
        ("wrong datatype (FP64 contents)", "pixel_values", contents_req("FP64", [1, 3, h, w], "fp64_contents", [0.0] * (3 * h * w))),
        ("wrong shape (H+1)", "pixel_values",
         req([("pixel_values", "FP32", [1, 3, h + 1, w])], [np.zeros((1, 3, h + 1, w), np.float32).tobytes()])),
        ("wrong rank", "pixel_values", req([("pixel_values", "FP32", [3, h, w])], [xb])),
        ("truncated raw_input_contents", None, req([("pixel_values", "FP32", [1, 3, h, w])], [xb[:-100]])),
        ("raw contents longer than the shape", None, req([("pixel_values", "FP32", [1, 3, h, w])], [xb + b"\0" * 64])),
        ("contents shorter than the shape", None, contents_req("FP32", [1, 3, h, w], "fp32_contents", [0.0] * 10)),
        ("huge shape, tiny raw content", None, req([("pixel_values", "FP32", [100000, 3, 4096, 4096])], [b"\0" * 16])),
        ("huge shape, images", None, req([("images", "BYTES", [1 << 40])], [b"\0\0\0\0"])),
        ("shape overflowing u64", None, req([("pixel_values", "FP32", [1 << 62, 3, 1 << 20, 1 << 20])], [b"\0" * 16])),
        ("more raw contents than inputs", None, req([("pixel_values", "FP32", [1, 3, h, w])], [xb, xb])),
        ("no inputs", None, req([])),
        ("unknown input name", "nonsense", req([("nonsense", "FP32", [1, 3, h, w])], [xb])),
        ("images that are not images", None, req([("images", "BYTES", [1])], [len(b"junk").to_bytes(4, "little") + b"junk"])),
        ("malformed BYTES serialization", None, req([("images", "BYTES", [1])], [(1000).to_bytes(4, "little") + b"junk"])),
        ("unknown output", "nonsense", req([("pixel_values", "FP32", [1, 3, h, w])], [xb], outputs=[("nonsense", 0)])),
        ("classification on a detector", None,
         req([("pixel_values", "FP32", [1, 3, yh, yw])], [pixels(92, 1, yh, yw).tobytes()],
             outputs=[("output", 3)], model=c.yolo_name)),
        ("unknown parameter", "bogus", req([("pixel_values", "FP32", [1, 3, h, w])], [xb], params={"bogus": "1"})),
    ]
    failures = []
    for what, names, request in cases:
        try:
            started = time.monotonic()
            try:
                stub.ModelInfer(request, timeout=30)
                raise CheckFailed("succeeded, want INVALID_ARGUMENT")
            except grpc.RpcError as e:
                took = time.monotonic() - started
                ensure(e.code() == grpc.StatusCode.INVALID_ARGUMENT,
                       f"{e.code()} {e.details()!r}, want INVALID_ARGUMENT")
                ensure(e.details(), "empty message")
                if names:
                    ensure(names in e.details(), f"message does not name {names!r}: {e.details()!r}")
                print(f"      grpc {what}: {e.code().name} {e.details()[:150]!r}", flush=True)
                if what.startswith("huge"):
                    ensure(took < 5, f"took {took:.1f}s")
            still_serves(c, what)
        except CheckFailed as e:
            failures.append(f"grpc bad input [{what}]: {e}")
    channel.close()
    ensure(not failures, "\n    ".join(failures))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--http", required=True, help="main server's HTTP address, HOST:PORT")
    ap.add_argument("--grpc", required=True, help="main server's gRPC address, HOST:PORT")
    ap.add_argument("--fovea", required=True, help="the fovea binary (for `fovea run`)")
    ap.add_argument("--classifier", required=True, help="NAME=SPEC of the classifier served")
    ap.add_argument("--detector", required=True, help="NAME=SPEC of the YOLO detector served")
    ap.add_argument("--detr", required=True, help="NAME=SPEC of the DETR served")
    ap.add_argument("--images", required=True, help="directory of encoded images")
    ap.add_argument("--scratch", required=True, help="scratch directory")
    ap.add_argument("--small-http", required=True, help="HTTP address of the small-queue server")
    ap.add_argument("--small-grpc", required=True, help="gRPC address of the small-queue server")
    ap.add_argument("--small-queue", type=int, required=True, help="its queue_capacity (it serves the classifier under the same name)")
    ap.add_argument("--protocols", default="http,grpc", help="comma-separated: http, grpc (default both)")
    ap.add_argument("--only", default="", help="comma-separated check names to run (default: all)")
    args = ap.parse_args()
    c = Ctx(args)

    checks = [
        ("health", check_health),
        ("server metadata", check_server_metadata),
        ("model metadata", check_model_metadata),
        ("classifier tensors", lambda c: check_tensor_inference(c, c.cls_name)),
        ("yolo tensors", lambda c: check_tensor_inference(c, c.yolo_name)),
        ("detr tensors", lambda c: check_tensor_inference(c, c.detr_name)),
        ("detr padding and mask types", check_detr_padding_and_mask_types),
        ("classification extension", check_classification),
        ("yolo images", lambda c: check_detector_images(c, c.yolo_name, None)),
        ("yolo images, low confidence", lambda c: check_detector_images(c, c.yolo_name, 0.05)),
        ("detr images", lambda c: check_detector_images(c, c.detr_name, 0.0)),
        ("classifier images", check_classifier_images),
        ("unknown model", check_unknown_model),
        ("parameters", check_parameters),
        ("queue full", check_queue_full),
        ("bad input over http", check_bad_http),
        ("bad input over grpc", check_bad_grpc),
    ]
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    failures = []
    for name, fn in checks:
        if only and name not in only:
            continue
        started = time.monotonic()
        try:
            fn(c)
            print(f"ok    {name} ({time.monotonic() - started:.1f}s)", flush=True)
        except CheckFailed as e:
            failures.append((name, str(e)))
            print(f"FAIL  {name}: {e}", flush=True)
        except InferenceServerException as e:
            failures.append((name, f"server answered {e.status()}: {e.message()}"))
            print(f"FAIL  {name}: server answered {e.status()}: {e.message()}", flush=True)
        except Exception as e:  # a crash of the check itself, or a broken connection
            failures.append((name, f"{type(e).__name__}: {e}"))
            print(f"FAIL  {name}: {type(e).__name__}: {e}\n{traceback.format_exc()}", flush=True)
    if failures:
        print(f"\n{len(failures)} check(s) failed:", flush=True)
        for name, msg in failures:
            print(f"  - {name}: {msg.splitlines()[0][:300]}", flush=True)
        sys.exit(1)
    print("\nall checks passed", flush=True)


if __name__ == "__main__":
    main()
