#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one script for a machine that has the
# driver, CUDA 13 libraries and PyTorch but no Rust toolchain and no network.
#
#   deploy/cuda/gpu-check.sh [--bin DIR] [--out DIR] [--seconds S] [--device D]
#                            [--batches B,...] [--models M,...]
#                            [--bench-limit S] [--base-bin DIR]
#                            [--profile-batch N] STAGE...
#
# STAGE is any of:
#   env          the GPU, the driver, and that every library the binaries need
#                resolves (always run first);
#   conformance  generates the full-size fixtures with the repository's
#                generators (PyTorch, on the CPU) and runs the device
#                conformance test on cuda:0 in f32, f16 and bf16: every family
#                against its reference;
#   fixtures     only the fixture generation of `conformance`;
#   bench        server/bench/compare.py on the GPU: Fovea and PyTorch eager,
#                f32 and bf16, batch 1, 8, 32 and 64, for ResNet-50,
#                EfficientNet-B0, ViT-B/16, YOLOv8s and DETR-R50; then the
#                server under HTTP load (ResNet-50, YOLOv8s) with the batch
#                sizes it formed, read from its own metrics;
#   profile      `fovea bench --profile` of each family at batch 32
#                (--profile-batch), f32 and bf16, on the fixtures' weights:
#                where a pass spends its time on the device, layer by layer
#                (profiles.txt);
#   all          all of them in one call, to fit a short lease: the fixtures
#                are generated on the upper half of the CPU cores while the
#                bench runs pinned to the lower half (the fixtures use no GPU),
#                then the conformance test and the profiles run on the GPU
#                alone.
#
# --base-bin DIR: a second build's binaries (the same layout as --bin), checked
# by the conformance test too and timed beside the first in the bench's 'Base'
# column: e.g. --bin target/cuda/cudnn/gpu --base-bin target/cuda/gpu.
# --bench-limit S stops the bench after S seconds (its rows so far are kept in
# bench.log), so that the conformance test after it still runs.
# --bin: the folder with `fovea` and `device_conformance` (each may be
# .xz-compressed), by default target/cuda/gpu, where `deploy/cuda/toolkit.sh
# --tests` leaves them compressed. --out: where the logs and JSON go (default
# $OUT, else target/gpu-check); at most 8 files, as some lending tools return
# no more. --device cpu (with the CPU build's binaries and small --batches)
# rehearses the script on a machine without a GPU. Python packages the
# machine lacks (ultralytics) are installed from the wheels in .whl/ when that
# folder exists.
set -uo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
bin="$root/target/cuda/gpu"
out="${OUT:-$root/target/gpu-check}"
seconds=2
device=cuda:0
batches=1,8,32,64
models=resnet50,efficientnet_b0,vit_b16,yolov8s,detr_resnet50
bench_limit=0
base=
profile_batch=32
stages=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --bin) bin="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --seconds) seconds="$2"; shift 2 ;;
        --device) device="$2"; shift 2 ;;
        --batches) batches="$2"; shift 2 ;;
        --models) models="$2"; shift 2 ;;
        --bench-limit) bench_limit="$2"; shift 2 ;;
        --base-bin) base="$2"; shift 2 ;;
        --profile-batch) profile_batch="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        env|fixtures|conformance|bench|profile|all) stages+=("$1"); shift ;;
        *) echo "gpu-check.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
mkdir -p "$out"
bin="$(cd "$bin" && pwd)"
[[ -z $base ]] || base="$(cd "$base" && pwd)"
status=0
log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$out/summary.txt"; }

# --- env ------------------------------------------------------------------
log "env"
if [[ $device == cuda* ]]; then
    nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv | tee "$out/gpu.txt"
fi
for dir in "$bin" $base; do
    for f in "$dir"/*.xz; do [[ -e $f ]] && xz -dkf "$f"; done
    chmod +x "$dir"/fovea "$dir"/device_conformance 2>/dev/null
done
# The CUDA 13 libraries of PyTorch's wheels (cuBLAS, cuRAND, cuDNN, the runtime).
nvidia="$(python3 -c 'import nvidia, sys; sys.stdout.write(list(nvidia.__path__)[0])' 2>/dev/null)"
for lib in "$nvidia/cu13/lib" "$nvidia/cudnn/lib" /usr/local/cuda/lib64; do
    [[ -d $lib ]] && LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
export LD_LIBRARY_PATH
for dir in "$bin" $base; do
    if ldd "$dir/fovea" | grep -q "not found"; then
        ldd "$dir/fovea" | grep "not found"
        log "env: libraries missing for $dir/fovea"; exit 1
    fi
done
ldd "$bin/fovea" | grep -E "libcuda|cublas|curand|cudnn|cudart" | tee -a "$out/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))' \
    | tee -a "$out/gpu.txt"
if [[ -d $root/.whl ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$root"/.whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# Ultralytics: no settings written to $HOME, nothing fetched.
export YOLO_CONFIG_DIR=/tmp/ultralytics YOLO_OFFLINE=1 PYTHONUNBUFFERED=1

# --- conformance ------------------------------------------------------------
fixtures_dir=/tmp/fovea-full-fixtures
fixtures() {
    local gen="$root/model-core/tests/fixtures" ok=1
    log "fixtures: generating the full-size fixtures"
    for g in make_model_fixtures make_vit_fixtures make_detr_fixtures make_yolo_fixtures; do
        local only=()
        [[ $g == make_yolo_fixtures ]] && only=(--only yolov8n_random,yolov8s_random)
        echo "== $g" >>"$out/fixtures.log"
        (cd "$gen" && python3 "$g.py" --full "$fixtures_dir" "${only[@]}") >>"$out/fixtures.log" 2>&1 \
            || { log "fixtures: $g failed (see fixtures.log)"; ok=0; }
    done
    [[ $ok == 1 ]] && touch "$fixtures_dir/.complete"
    log "fixtures: done"
    [[ $ok == 1 ]]
}

# The fixtures, unless they are there or were tried in this run already.
generated=0
need_fixtures() {
    [[ -e $fixtures_dir/.complete || $generated == 1 ]] && return
    generated=1
    fixtures || status=1
}

conformance() {
    need_fixtures
    test_on_device "$bin" conformance
    [[ -z $base ]] || test_on_device "$base" conformance-base
}

# The device conformance test of the build in $1, logged to $2.log.
test_on_device() {
    log "$2: $device, f32 f16 bf16"
    FOVEA_TEST_DEVICE="$device" FOVEA_FULL_FIXTURES="$fixtures_dir" \
        FOVEA_SMALL_FIXTURES="$root/model-core/tests/fixtures/models" \
        "$1/device_conformance" --exact every_family_matches_on_the_test_device --nocapture \
        >"$out/$2.log" 2>&1
    local rc=$?
    grep -E "^(fixture|[a-z].* (F32|F16|BF16) )|test result|over|changed" "$out/$2.log" | tail -80
    log "$2: exit $rc"
    [[ $rc == 0 ]] || status=1
}

# --- profile ----------------------------------------------------------------
profile() {
    need_fixtures
    log "profile: $device, batch $profile_batch"
    local f=$fixtures_dir spec dtype
    for spec in resnet50:$f/torchvision_resnet50 efficientnet_b0:$f/timm_efficientnet_b0 \
        vit_base_patch16_224:$f/timm_vit_base_patch16_224 yolov8s:$f/yolov8s_random \
        detr_resnet50:$f/detr_resnet_50; do
        for dtype in f32 bf16; do
            echo "== ${spec%%:*} $dtype" >>"$out/profiles.txt"
            "$bin/fovea" bench --model "$spec/model.safetensors" --device "$device" --dtype "$dtype" \
                --batch "$profile_batch" --seconds 0.5 --profile >>"$out/profiles.txt" 2>&1 \
                || { log "profile: ${spec%%:*} $dtype failed"; status=1; }
        done
    done
    log "profile: done"
}

# --- bench ------------------------------------------------------------------
bench() {
    log "bench: Fovea and PyTorch eager on $device"
    local limit=() also=()
    [[ -z $base ]] || also=(--fovea-base "$base/fovea")
    [[ $bench_limit != 0 ]] && limit=(timeout "$bench_limit")
    "${limit[@]}" python3 "$root/server/bench/compare.py" --fovea "$bin/fovea" --device "$device" --dtypes f32,bf16 \
        --batches "$batches" --no-onnx --seconds "$seconds" --threads "$(nproc)" --http \
        --models "$models" "${also[@]}" \
        --json "$out/bench.json" 2>&1 | tee "$out/bench.log"
    local rc=${PIPESTATUS[0]}
    log "bench: exit $rc"
    [[ $rc == 0 ]] || status=1
}

for stage in "${stages[@]}"; do
    case "$stage" in
        fixtures) fixtures || status=1 ;;
        conformance) conformance ;;
        bench) bench ;;
        profile) profile ;;
        all)
            # Where the sandbox allows it, pin the two halves apart (taskset
            # failing only leaves them unpinned).
            cores=$(nproc)
            half=$((cores / 2))
            (
                taskset -pc "$half-$((cores - 1))" $BASHPID >/dev/null 2>&1
                OMP_NUM_THREADS=$((cores - half)) fixtures
            ) &
            fixtures_pid=$!
            taskset -pc "0-$((half - 1))" $$ >/dev/null 2>&1
            bench
            wait "$fixtures_pid" || status=1
            generated=1
            taskset -pc "0-$((cores - 1))" $$ >/dev/null 2>&1
            conformance
            profile
            ;;
    esac
done
log "done, status $status"
exit $status
