#!/usr/bin/env python3
"""A real Prometheus scraping a real `fovea serve` under load.

Starts fovea with the Kubernetes ConfigMap's fovea.toml (so that file is
parsed by fovea itself; flags replace its models, home and address with a
tiny fixture model and loopback), checks the Docker HEALTHCHECK script
against it, starts Prometheus with deploy/prometheus/prometheus.yml (its
target, intervals and rule path adapted; the target labelled with the
namespace and pod labels the Prometheus Operator would add) and the alerting
rules, sends classification requests (and a few bad ones), then asks
Prometheus's HTTP API:
  - the FPS query of the dashboard and the adapter's per-pod FPS query (what
    the HPA scales on) return a positive value;
  - every dashboard panel query, every adapter query and every alert
    expression is accepted (status success), and every rule evaluates (health ok);
  - the scrape target is up.
Finally fovea gets SIGTERM and must drain and exit 0. Every process started
here is stopped on the way out.

usage: check_live.py --fovea BIN --deploy DIR --render DIR --work DIR [--load-seconds N]
"""
import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import yaml

TINY_MODEL = "model-core/tests/fixtures/models/timm_efficientnet_b0_tiny/model.safetensors"
IMAGE = "tests/images/coffee.png"
POD_LABELS = {"namespace": "ci", "pod": "fovea-ci-0"}


def fail(msg):
    raise SystemExit(f"check_live: FAILED: {msg}")


def http(method, url, body=None, headers=None, timeout=30):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, fn, timeout, procs=()):
    start = time.time()
    while time.time() - start < timeout:
        for p, name in procs:
            if p.poll() is not None:
                fail(f"{name} exited ({p.returncode}) while waiting for {what}")
        try:
            v = fn()
            if v:
                return v
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.25)
    fail(f"timed out after {timeout}s waiting for {what}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fovea", required=True)
    ap.add_argument("--deploy", required=True)
    ap.add_argument("--render", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--load-seconds", type=float, default=12)
    args = ap.parse_args()
    root = os.path.abspath(os.path.join(args.deploy, ".."))
    args.render = os.path.abspath(args.render)
    procs = []
    try:
        run(args, root, procs)
    finally:
        for p, name in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def run(args, root, procs):
    work = os.path.abspath(args.work)
    # fovea on a port of its own choosing; the log tells which.
    fovea_log = open(os.path.join(work, "fovea.log"), "w+")
    env = dict(os.environ, FOVEA_LOG_FORMAT="text", FOVEA_LOG="info")
    for k in ("FOVEA_MODELS", "FOVEA_CONFIG", "FOVEA_HTTP_ADDR", "FOVEA_HOME", "FOVEA_DEVICE"):
        env.pop(k, None)
    cmd = [os.path.abspath(args.fovea), "serve", "--config", os.path.join(args.render, "fovea-cpu.toml"),
           "--model", f"tiny=efficientnet_b0:{os.path.join(root, TINY_MODEL)}",
           "--home", os.path.join(work, "home"), "--http-addr", "127.0.0.1:0",
           "--grpc-addr", "127.0.0.1:0", "--no-pull"]
    fovea = subprocess.Popen(cmd, stdout=fovea_log, stderr=subprocess.STDOUT, env=env, cwd=work)
    procs.append((fovea, "fovea"))

    def listening():
        fovea_log.seek(0)
        m = re.search(r"(?<!grpc )listening.*addr=(\S+)", fovea_log.read())
        return m and m.group(1)

    addr = wait_for("fovea to listen", listening, 60, [(fovea, "fovea")])
    base = f"http://{addr}"
    wait_for("fovea /readyz", lambda: http("GET", base + "/readyz")[0] == 200, 120, [(fovea, "fovea")])
    print(f"fovea ready on {addr} (the ConfigMap's fovea.toml, a tiny model)")

    # The image's HEALTHCHECK script, against the live server and a dead port.
    hc = os.path.join(args.deploy, "healthcheck.sh")
    ok = subprocess.run(["bash", hc], env=dict(os.environ, FOVEA_HTTP_ADDR=addr), timeout=10)
    bad = subprocess.run(["bash", hc], env=dict(os.environ, FOVEA_HTTP_ADDR=f"127.0.0.1:{free_port()}"),
                         timeout=10, stderr=subprocess.DEVNULL)
    if ok.returncode != 0 or bad.returncode == 0:
        fail(f"healthcheck.sh: {ok.returncode} against fovea (want 0), {bad.returncode} against a closed port (want non-zero)")
    print("healthcheck.sh: healthy against fovea, unhealthy against a closed port")

    # Prometheus, from the committed configuration.
    prom_conf = yaml.safe_load(open(os.path.join(args.deploy, "prometheus/prometheus.yml")))
    prom_conf["global"].update({"scrape_interval": "1s", "evaluation_interval": "1s"})
    prom_conf["rule_files"] = [os.path.join(os.path.abspath(args.deploy), "prometheus", f) for f in prom_conf["rule_files"]]
    (job,) = [j for j in prom_conf["scrape_configs"] if j["job_name"] == "fovea"]
    job["scrape_interval"] = "1s"
    job["static_configs"] = [{"targets": [addr], "labels": POD_LABELS}]
    conf_path = os.path.join(work, "prometheus.yml")
    with open(conf_path, "w") as f:
        yaml.safe_dump(prom_conf, f)
    pport = free_port()
    prom_url = f"http://127.0.0.1:{pport}"
    prom_log = open(os.path.join(work, "prometheus.log"), "w")
    prom = subprocess.Popen(["prometheus", f"--config.file={conf_path}", f"--storage.tsdb.path={work}/tsdb",
                             f"--web.listen-address=127.0.0.1:{pport}", "--log.level=warn"],
                            stdout=prom_log, stderr=subprocess.STDOUT, cwd=work)
    procs.append((prom, "prometheus"))
    both = [(fovea, "fovea"), (prom, "prometheus")]
    wait_for("prometheus /-/ready", lambda: http("GET", prom_url + "/-/ready")[0] == 200, 60, both)
    print(f"prometheus ready on 127.0.0.1:{pport}")

    def query(expr, at=None):
        q = {"query": expr}
        if at:
            q["time"] = str(at)
        status, body = http("GET", prom_url + "/api/v1/query?" + urllib.parse.urlencode(q))
        data = json.loads(body)
        if status != 200 or data.get("status") != "success":
            fail(f"Prometheus refused {expr!r}: {data.get('errorType')}: {data.get('error')}")
        return data["data"]

    # Load: a few clients classifying, and some requests that must fail.
    image = open(os.path.join(root, IMAGE), "rb").read()
    counts = {}
    lock = threading.Lock()
    stop = time.time() + args.load_seconds

    def client(i):
        n = 0
        while time.time() < stop:
            if i == 0 and n % 10 == 5:
                status, _ = http("POST", base + "/v1/classify", b"hi", {"Content-Type": "text/plain"})
            elif i == 0 and n % 10 == 7:
                status, _ = http("POST", base + "/v1/classify?model=missing", image, {"Content-Type": "image/png"})
            else:
                status, _ = http("POST", base + "/v1/classify?top_k=3", image, {"Content-Type": "image/png"})
            with lock:
                counts[status] = counts.get(status, 0) + 1
            n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"load: {sum(counts.values())} requests in {args.load_seconds:.0f}s, by status {dict(sorted(counts.items()))}")
    if counts.get(200, 0) < 5:
        fail(f"too few successful classifications: {counts}")

    # Let Prometheus scrape the end of the load, then evaluate at that time.
    time.sleep(2.5)
    at = time.time()

    def subst(expr):
        return expr.replace("$__rate_interval", "1m").replace("$model", ".+")

    dash = json.load(open(os.path.join(args.deploy, "compose/grafana/dashboards/fovea.json")))
    fps_expr = None
    n = 0
    for panel in dash["panels"]:
        for t in panel["targets"]:
            data = query(subst(t["expr"]), at)
            n += 1
            if "FPS" in panel["title"] and fps_expr is None:
                fps_expr = subst(t["expr"])
                values = {r["metric"].get("model"): float(r["value"][1]) for r in data["result"]}
                if not values.get("tiny", 0) > 0:
                    fail(f"dashboard FPS query {fps_expr!r} gave {values}, want a positive value for model tiny")
                print(f"dashboard FPS query: {values} images/s")
    if fps_expr is None:
        fail("the dashboard has no FPS panel")
    for var in dash.get("templating", {}).get("list", []):
        m = re.match(r"label_values\((\w+), *(\w+)\)", var["query"]["query"])
        if not m or "tiny" not in [r["metric"].get(m.group(2)) for r in query(m.group(1), at)["result"]]:
            fail(f"dashboard variable {var['name']} finds no model")
    print(f"dashboard: all {n} panel queries accepted")

    # The adapter's queries, as it renders them for the HPA's pods.
    rules = json.load(open(os.path.join(args.render, "adapter-rules.json")))
    matchers = ",".join(f'{k}="{v}"' if k == "namespace" else f'{k}=~"{v}"' for k, v in POD_LABELS.items())
    for name, rule in rules.items():
        expr = (rule["metricsQuery"].replace("<<.Series>>", rule["series"])
                .replace("<<.LabelMatchers>>", matchers).replace("<<.GroupBy>>", "pod"))
        result = query(expr, at)["result"]
        values = {r["metric"].get("pod"): float(r["value"][1]) for r in result}
        if POD_LABELS["pod"] not in values:
            fail(f"adapter metric {name} ({expr}) has no value for the pod: {result}")
        if name == "fovea_images_per_second" and not values[POD_LABELS["pod"]] > 0:
            fail(f"adapter metric {name} ({expr}) is not positive: {values}")
        print(f"adapter metric {name}: {values}")
    if "fovea_images_per_second" not in rules:
        fail("the adapter serves no fovea_images_per_second")

    # Alert expressions accepted, and every rule evaluated without error.
    alerts = yaml.safe_load(open(os.path.join(args.deploy, "prometheus/alerts.yml")))
    exprs = [r["expr"] for g in alerts["groups"] for r in g["rules"]]
    for e in exprs:
        query(e, at)

    def rules_evaluated():
        data = json.loads(http("GET", prom_url + "/api/v1/rules")[1])["data"]
        rs = [r for g in data["groups"] for r in g["rules"]]
        return len(rs) == len(exprs) and all(r.get("lastEvaluation", "0001").startswith("20") for r in rs) and rs

    rs = wait_for("every alert rule to be evaluated", rules_evaluated, 30, both)
    bad = [(r["name"], r.get("lastError")) for r in rs if r["health"] != "ok"]
    if bad:
        fail(f"alert rules failing: {bad}")
    print(f"alerts: {len(rs)} rules loaded and evaluated ({', '.join(sorted(r['name'] + '=' + r['state'] for r in rs))})")
    targets = json.loads(http("GET", prom_url + "/api/v1/targets")[1])["data"]["activeTargets"]
    if not targets or any(t["health"] != "up" for t in targets):
        fail(f"scrape targets not up: {[(t['scrapeUrl'], t['health'], t.get('lastError')) for t in targets]}")

    # Graceful shutdown within the drain time the manifests allow for.
    fovea.send_signal(signal.SIGTERM)
    try:
        rc = fovea.wait(timeout=40)
    except subprocess.TimeoutExpired:
        fail("fovea did not exit within 40 s of SIGTERM")
    if rc != 0:
        fail(f"fovea exited {rc} after SIGTERM")
    print("fovea: SIGTERM, drained, exit 0")
    print("check_live: passed")


if __name__ == "__main__":
    main()
