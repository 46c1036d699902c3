#!/usr/bin/env python3
"""Static checks of deploy/: the Kubernetes manifests, the KServe and
Prometheus Operator resources, the Prometheus adapter's rules, compose, the
Dockerfiles and the Grafana dashboard. Run by deploy/check.sh.

usage: check_manifests.py DEPLOY_DIR RENDER_OUT_DIR
Writes the rendered overlays (cpu.yaml, gpu.yaml) and fovea.toml (from the
ConfigMap) to RENDER_OUT_DIR for the live check. Exits non-zero with every
failure listed.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kustomize_lite  # noqa: E402

K8S_VERSION = os.environ.get("FOVEA_K8S_VERSION", "1.30.0")
failures = []
checks = 0


def check(cond, what):
    global checks
    checks += 1
    if not cond:
        failures.append(what)
    return cond


def by_kind(docs):
    out = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


def validate_k8s(doc, where):
    import kubernetes_validate
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        check(True, "")
    except kubernetes_validate.ValidationError as e:
        check(False, f"{where}: {doc['kind']}/{doc['metadata'].get('name')}: {e.message} at {list(e.path)}")
    except kubernetes_validate.SchemaNotFoundError as e:
        check(False, f"{where}: no schema for {doc['kind']} ({e})")


def labels_match(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def pod_containers(pod_spec):
    return (pod_spec.get("initContainers") or []) + (pod_spec.get("containers") or [])


def check_overlay(name, docs, adapter_metrics, out_dir):
    where = f"overlay {name}"
    start = len(failures)
    kinds = by_kind(docs)
    for kind in ("ConfigMap", "Deployment", "Service", "PodDisruptionBudget",
                 "HorizontalPodAutoscaler", "ServiceMonitor"):
        check(len(kinds.get(kind, [])) == 1, f"{where}: expected one {kind}, found {len(kinds.get(kind, []))}")
    for d in docs:
        check(d["metadata"].get("namespace") == "fovea", f"{where}: {d['kind']} not in namespace fovea")
        if d["apiVersion"] != "monitoring.coreos.com/v1":
            validate_k8s(d, where)
    if len(failures) > start:
        return  # the cross-checks below assume well-formed resources
    (dep,) = kinds["Deployment"]
    (svc,) = kinds["Service"]
    (cm,) = kinds["ConfigMap"]
    (pdb,) = kinds["PodDisruptionBudget"]
    (hpa,) = kinds["HorizontalPodAutoscaler"]
    (sm,) = kinds["ServiceMonitor"]
    pod = dep["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    spec = pod["spec"]
    check(labels_match(dep["spec"]["selector"]["matchLabels"], pod_labels), f"{where}: Deployment selector misses its pods")
    check(labels_match(svc["spec"]["selector"], pod_labels), f"{where}: Service selector misses the pods")
    check(labels_match(pdb["spec"]["selector"]["matchLabels"], pod_labels), f"{where}: PDB selector misses the pods")
    check(hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": dep["metadata"]["name"]},
          f"{where}: HPA scaleTargetRef is not the Deployment")

    # fovea.toml: parsed for real later (fovea serve --config); here, the
    # values the manifests depend on.
    toml_text = cm["data"]["fovea.toml"]
    conf = tomllib.loads(toml_text)
    with open(os.path.join(out_dir, f"fovea-{name}.toml"), "w") as f:
        f.write(toml_text)
    drain = conf.get("shutdown_timeout_s", 30)
    (main,) = [c for c in spec["containers"] if c["name"] == "fovea"]
    prestop = main.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pause = int(prestop[1]) if prestop[:1] == ["sleep"] else 0
    check(spec["terminationGracePeriodSeconds"] > drain + pause,
          f"{where}: terminationGracePeriodSeconds {spec['terminationGracePeriodSeconds']} <= drain {drain} + preStop {pause}")
    check(conf.get("home") is not None and any(m["mountPath"] == conf["home"] for m in main["volumeMounts"]),
          f"{where}: fovea.toml home is not a mounted volume")
    check(conf.get("pull") is False, f"{where}: the serving container should not pull (the init container does)")
    config_arg = main["args"][main["args"].index("--config") + 1]
    check(any(m["mountPath"] == os.path.dirname(config_arg) for m in main["volumeMounts"]),
          f"{where}: --config {config_arg} is not under a mounted volume")

    # Ports, probes.
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    check(set(ports) >= {"http", "grpc"}, f"{where}: container ports must be named http and grpc")
    http_port = int(conf.get("http_addr", "0.0.0.0:8080").rsplit(":", 1)[1])
    check(ports.get("http") == http_port, f"{where}: port http {ports.get('http')} is not fovea.toml's {http_port}")
    svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    check(set(svc_ports) == {"http", "grpc"}, f"{where}: Service ports must be http and grpc")
    for pname, p in svc_ports.items():
        check(p.get("targetPort") in ports, f"{where}: Service port {pname} targets unknown {p.get('targetPort')}")
        check("appProtocol" in p, f"{where}: Service port {pname} has no appProtocol")
    probes = {k: main.get(k, {}).get("httpGet", {}) for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    check(probes["readinessProbe"].get("path") == "/readyz", f"{where}: readiness must be /readyz")
    check(probes["livenessProbe"].get("path") == "/healthz", f"{where}: liveness must be /healthz")
    check(probes["startupProbe"].get("path") == "/readyz", f"{where}: the startup probe must wait for /readyz")
    sp = main["startupProbe"]
    check(sp["periodSeconds"] * sp["failureThreshold"] >= 300, f"{where}: the startup probe allows under 5 min for loading")
    for k, p in probes.items():
        check(p.get("port") in ports or p.get("port") in ports.values(), f"{where}: {k} port {p.get('port')} unknown")

    # Security and resources, every container.
    psc = spec.get("securityContext", {})
    check(psc.get("runAsNonRoot") is True and psc.get("runAsUser", 0) != 0, f"{where}: pod must run as non-root")
    for c in pod_containers(spec):
        sc = c.get("securityContext", {})
        check(sc.get("readOnlyRootFilesystem") is True, f"{where}: {c['name']} root file system not read-only")
        check(sc.get("allowPrivilegeEscalation") is False, f"{where}: {c['name']} may escalate privileges")
        check(any(m["mountPath"] == "/tmp" for m in c.get("volumeMounts", [])), f"{where}: {c['name']} has no writable /tmp")
        res = c.get("resources", {})
        check("requests" in res and "memory" in res.get("limits", {}), f"{where}: {c['name']} lacks requests or a memory limit")
    (init,) = spec["initContainers"]
    script = " ".join(init.get("command", []) + init.get("args", []))
    check("fovea pull" in script, f"{where}: the init container does not run fovea pull")
    for model in conf.get("models", []):
        check(model["spec"] in script, f"{where}: model {model['spec']} of fovea.toml is not pulled by the init container")
    init_home = {e["name"]: e.get("value") for e in init.get("env", [])}.get("FOVEA_HOME")
    check(init_home == conf["home"], f"{where}: the init container pulls into {init_home}, fovea reads {conf['home']}")
    vols = {v["name"] for v in spec["volumes"]}
    for c in pod_containers(spec):
        for m in c.get("volumeMounts", []):
            check(m["name"] in vols, f"{where}: {c['name']} mounts unknown volume {m['name']}")

    # Autoscaling: custom metrics that the adapter serves, CPU as fallback.
    pods_metrics = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    check(pods_metrics and all(n in adapter_metrics for n in pods_metrics),
          f"{where}: HPA metrics {pods_metrics} not all served by the adapter rules {sorted(adapter_metrics)}")
    check(any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"]),
          f"{where}: HPA has no CPU fallback")
    check(hpa["spec"]["minReplicas"] >= 2, f"{where}: HPA minReplicas < 2 defeats the PDB")

    # ServiceMonitor (no schema offline: the fields the operator needs).
    smspec = sm["spec"]
    check(labels_match(smspec["selector"]["matchLabels"], svc["metadata"]["labels"]), f"{where}: ServiceMonitor selects no Service")
    for ep in smspec["endpoints"]:
        check(ep.get("port") in svc_ports, f"{where}: ServiceMonitor port {ep.get('port')} is no Service port")
        check(ep.get("path", "/metrics") == "/metrics", f"{where}: ServiceMonitor path")
        check(re.fullmatch(r"\d+[smh]", ep.get("interval", "30s")) is not None, f"{where}: ServiceMonitor interval")
    check(set(smspec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels", "podTargetLabels"},
          f"{where}: ServiceMonitor spec has unexpected fields {sorted(smspec)}")

    # Overlay specifics.
    images = [c["image"] for c in pod_containers(spec)]
    check(all(i.startswith("registry.example.com/") for i in images), f"{where}: images not set by the overlay: {images}")
    gpu_limit = main["resources"].get("limits", {}).get("nvidia.com/gpu")
    if name == "gpu":
        check(gpu_limit == 1, f"{where}: no nvidia.com/gpu limit")
        check(main["args"][main["args"].index("--device") + 1] == "cuda:0" if "--device" in main["args"] else False,
              f"{where}: no --device cuda:0")
        check(any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", [])), f"{where}: no GPU toleration")
        check(all("cuda" in i for i in images), f"{where}: GPU overlay images are not the CUDA ones")
    else:
        check(gpu_limit is None and "--device" not in main["args"], f"{where}: the CPU overlay asks for a GPU")


def check_adapter(path):
    (cm,) = kustomize_lite.load_yaml_docs(path)
    validate_k8s(cm, "prometheus-adapter")
    conf = yaml.safe_load(cm["data"]["config.yaml"])
    names = {}
    for rule in conf["rules"]:
        check(set(rule) <= {"seriesQuery", "seriesFilters", "resources", "name", "metricsQuery"},
              f"adapter rule has unknown fields {sorted(rule)}")
        over = rule["resources"]["overrides"]
        check(over.get("namespace", {}).get("resource") == "namespace" and over.get("pod", {}).get("resource") == "pod",
              "adapter rule must map the namespace and pod labels")
        m = re.match(r"^(\w+)\{", rule["seriesQuery"])
        check(m is not None, f"adapter seriesQuery {rule['seriesQuery']!r} names no metric")
        series = m.group(1) if m else ""
        check(re.search(rule["name"]["matches"], series) is not None, f"adapter name.matches misses {series}")
        for token in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
            check(token in rule["metricsQuery"], f"adapter metricsQuery lacks {token}")
        names[rule["name"]["as"]] = {"series": series, "metricsQuery": rule["metricsQuery"]}
    return names


def check_kserve(kdir):
    (sr,) = kustomize_lite.load_yaml_docs(os.path.join(kdir, "servingruntime.yaml"))
    (isvc,) = kustomize_lite.load_yaml_docs(os.path.join(kdir, "inferenceservice.yaml"))
    check(sr["apiVersion"] == "serving.kserve.io/v1alpha1" and sr["kind"] == "ServingRuntime", "ServingRuntime apiVersion/kind")
    check(isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService", "InferenceService apiVersion/kind")
    spec = sr["spec"]
    check("v2" in spec.get("protocolVersions", []), "ServingRuntime does not declare protocol v2")
    check("grpc-v2" in spec.get("protocolVersions", []), "ServingRuntime does not declare grpc-v2")
    formats = {f["name"] for f in spec["supportedModelFormats"]}
    (c,) = spec["containers"]
    check(c["name"] == "kserve-container", "ServingRuntime container must be kserve-container")
    port_names = {p.get("name") for p in c["ports"]}
    check("h2c" in port_names, "ServingRuntime has no gRPC (h2c) port")
    check("/mnt/models" in " ".join(c["args"]), "ServingRuntime does not serve /mnt/models")
    # fovea listens where the ports say: REST on http1, V2 gRPC on h2c.
    ports = {p.get("name"): p["containerPort"] for p in c["ports"]}
    args = c["args"]
    for flag, port in (("--http-addr", "http1"), ("--grpc-addr", "h2c")):
        check(flag in args and args[args.index(flag) + 1].endswith(f":{ports.get(port)}"),
              f"ServingRuntime: {flag} does not match its {port} port")
    # Its containers are core/v1 Containers: validate them inside a Pod.
    validate_k8s({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "servingruntime-containers"},
                  "spec": {"containers": spec["containers"]}}, "ServingRuntime")
    model = isvc["spec"]["predictor"]["model"]
    check(model["runtime"] == sr["metadata"]["name"], "InferenceService does not use the fovea runtime")
    check(model["modelFormat"]["name"] in formats, "InferenceService model format unsupported by the runtime")
    check(model.get("protocolVersion") == "v2", "InferenceService does not ask for v2")
    check(re.match(r"^(pvc|s3|gs|https?|hf)://", model["storageUri"]) is not None, "InferenceService storageUri scheme")
    validate_k8s({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "isvc-resources"},
                  "spec": {"containers": [{"name": "m", "image": "x", "resources": model["resources"]}]}}, "InferenceService")


def dockerfile_stages(path):
    text = open(path).read()
    stages = re.findall(r"^FROM\s+\S+(?:\s+AS\s+(\S+))?", text, re.M | re.I)
    return text, [s for s in stages if s]


def check_docker(deploy):
    for name in ("Dockerfile", "Dockerfile.cuda"):
        text, stages = dockerfile_stages(os.path.join(deploy, name))
        for s in ("planner", "deps", "build", "runtime-pull", "runtime"):
            check(s in stages, f"{name}: no stage {s}")
        check(stages[-1] == "runtime", f"{name}: the last (default) stage must be runtime")
        check(re.search(r"^RUN\b.*\bcargo\s", text, re.M) is None, f"{name}: runs cargo itself: go through deploy/build.sh")
        for cmd in ("plan", "deps", "build"):
            check(re.search(rf"RUN deploy/build\.sh .*\b{cmd}\b", text), f"{name}: does not run build.sh {cmd}")
        check("HEALTHCHECK" in text and "USER 10001" in text, f"{name}: HEALTHCHECK or non-root USER missing")
        for src in re.findall(r"^COPY\s+(deploy/\S+)", text, re.M):
            check(os.path.exists(os.path.join(deploy, "..", src)), f"{name}: COPY of missing {src}")
        check(os.path.isfile(os.path.join(deploy, name + ".dockerignore")), f"{name}: no {name}.dockerignore")
    cuda = open(os.path.join(deploy, "Dockerfile.cuda")).read()
    check("ARG CUDA_COMPUTE_CAP" in cuda and "nvidia/cuda:" in cuda, "Dockerfile.cuda: CUDA_COMPUTE_CAP / nvidia/cuda base")
    check(len(re.findall(r"^ARG FEATURES=cuda$", cuda, re.M)) == 2, "Dockerfile.cuda: deps and build not both on the cuda feature")
    check(re.search(r"FROM nvidia/cuda:\S+-runtime-\S+ AS base", cuda) is not None, "Dockerfile.cuda: runtime not on the CUDA runtime image")


def check_compose(deploy):
    cdir = os.path.join(deploy, "compose")
    comp = yaml.safe_load(open(os.path.join(cdir, "compose.yaml")))
    services = comp["services"]
    check(set(services) >= {"fovea", "prometheus", "grafana"}, "compose: services fovea, prometheus, grafana")
    build = services["fovea"]["build"]
    ctx = os.path.normpath(os.path.join(cdir, build["context"]))
    check(os.path.isfile(os.path.join(ctx, build["dockerfile"])), "compose: Dockerfile not found")
    _, stages = dockerfile_stages(os.path.join(ctx, build["dockerfile"]))
    check(build.get("target") in stages, f"compose: no stage {build.get('target')}")
    named = set(comp.get("volumes", {}))
    for sname, s in services.items():
        for v in s.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("."):
                check(os.path.exists(os.path.join(cdir, src)), f"compose: {sname} mounts missing {src}")
            else:
                check(src in named, f"compose: {sname} uses undeclared volume {src}")
    prom = yaml.safe_load(open(os.path.join(deploy, "prometheus", "prometheus.yml")))
    targets = [t for sc in prom["scrape_configs"] for st in sc.get("static_configs", []) for t in st["targets"]]
    check(any(t.startswith("fovea:") for t in targets), "prometheus.yml does not scrape the compose fovea service")
    ds = yaml.safe_load(open(os.path.join(cdir, "grafana/provisioning/datasources/prometheus.yml")))
    uids = {d["uid"] for d in ds["datasources"]}
    dash = json.load(open(os.path.join(cdir, "grafana/dashboards/fovea.json")))
    for p in dash["panels"]:
        check(p["datasource"]["uid"] in uids, f"dashboard panel {p['title']!r}: unknown data source")
        check(p["targets"] and all(t.get("expr") for t in p["targets"]), f"dashboard panel {p['title']!r}: no query")
    prov = yaml.safe_load(open(os.path.join(cdir, "grafana/provisioning/dashboards/fovea.yml")))
    check(any(v.endswith(":" + prov["providers"][0]["options"]["path"] + ":ro") for v in services["grafana"]["volumes"]),
          "compose: the dashboards folder is not mounted where the provider reads")


def main():
    deploy, out_dir = sys.argv[1], sys.argv[2]
    os.makedirs(out_dir, exist_ok=True)
    adapter = check_adapter(os.path.join(deploy, "k8s/prometheus-adapter/adapter-config.yaml"))
    with open(os.path.join(out_dir, "adapter-rules.json"), "w") as f:
        json.dump(adapter, f)
    kubectl = shutil.which("kubectl")
    for name in ("cpu", "gpu"):
        odir = os.path.join(deploy, "k8s/overlays", name)
        docs = kustomize_lite.build(odir)
        with open(os.path.join(out_dir, f"{name}.yaml"), "w") as f:
            yaml.safe_dump_all(docs, f, sort_keys=True)
        if kubectl:
            real = subprocess.run([kubectl, "kustomize", odir], capture_output=True, text=True)
            if check(real.returncode == 0, f"kubectl kustomize {odir}: {real.stderr.strip()}"):
                key = lambda d: (d["apiVersion"], d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"])
                ours = {key(d): d for d in docs}
                theirs = {key(d): d for d in yaml.safe_load_all(real.stdout) if d}
                check(ours == theirs, f"overlay {name}: kustomize_lite differs from kubectl kustomize")
                print(f"overlay {name}: kustomize_lite output equals kubectl kustomize's")
        before = len(failures)
        check_overlay(name, docs, adapter, out_dir)
        verdict = "validated" if len(failures) == before else f"FAILED {len(failures) - before} checks"
        print(f"overlay {name}: {len(docs)} resources rendered, {verdict} (Kubernetes {K8S_VERSION} schemas, strict)")
    check_kserve(os.path.join(deploy, "kserve"))
    check_docker(deploy)
    check_compose(deploy)
    if failures:
        print(f"check_manifests: {len(failures)} of {checks} checks FAILED:", file=sys.stderr)
        for f in failures:
            print("  - " + f, file=sys.stderr)
        sys.exit(1)
    print(f"check_manifests: {checks} checks passed")


if __name__ == "__main__":
    main()
