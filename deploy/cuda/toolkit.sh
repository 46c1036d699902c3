#!/usr/bin/env bash
# Build `fovea` with CUDA on a machine that has neither a GPU nor a CUDA
# toolkit: the toolkit is put together from NVIDIA's PyPI wheels.
#
#   deploy/cuda/toolkit.sh [--cudnn] [--tests] [--dir DIR] [--out OUT_DIR]
#
# 1. Installs the CUDA 13.0 wheels (compiler, headers, runtime, cuBLAS, cuRAND,
#    NVRTC; cuDNN with --cudnn) into a virtual environment under DIR
#    (default: target/cuda-toolkit).
# 2. Lays them out as a CUDA_HOME of symbolic links (bin/, include/, nvvm/,
#    lib64/) and adds the unversioned library names the linker looks for.
# 3. Compiles a link-time stand-in for the driver library (libcuda.so.1): every
#    driver function returns CUDA_ERROR_STUB_LIBRARY. The real one comes with
#    the NVIDIA driver where the binary runs; never put lib64/stubs on
#    LD_LIBRARY_PATH there.
# 4. Builds `fovea --features cuda` (or cudnn) with deploy/build.sh into its own
#    target directory (target/cuda), so the CPU build is left alone, and copies
#    the binary to OUT_DIR (default target/cuda/bin, with --cudnn
#    target/cuda/cudnn/bin). With --tests, also the device conformance test
#    (model-core/tests/device_conformance.rs) as OUT_DIR/device_conformance,
#    and both xz-compressed into OUT_DIR/../gpu (target/cuda/gpu; 8 MB in all)
#    for carrying to a GPU machine, where
#    deploy/cuda/gpu-check.sh runs them.
#
# Environment: CUDA_COMPUTE_CAP (default 90: H100/H200, compiled for sm_90a),
# PYTHON (default python3). CUDA 13.0 needs driver 580 or newer where it runs;
# deploy/cuda/gpu-check.sh runs the checks on a GPU machine.
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
dir="$root/target/cuda-toolkit"
out=
features=cuda
tests=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --cudnn) features=cudnn; shift ;;
        --tests) tests=1; shift ;;
        --dir) dir="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "toolkit.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
# The cuDNN build shares the target directory (and candle's compiled
# kernels) but keeps its binaries apart.
if [[ -n $out ]]; then :
elif [[ $features == cudnn ]]; then out="$root/target/cuda/cudnn/bin"
else out="$root/target/cuda/bin"
fi

# CUDA 13.0 Update 2, pinned so that every part is from the same release.
wheels=(
    nvidia-cuda-nvcc==13.0.88    # nvcc, ptxas, fatbinary, nvlink
    nvidia-nvvm==13.0.88         # cicc and libdevice, which nvcc runs
    nvidia-cuda-crt==13.0.88     # crt/ headers
    nvidia-cuda-runtime==13.0.96 # cuda.h, cuda_runtime.h, libcudart.so.13
    nvidia-cuda-cccl==13.0.85    # cub, thrust, libcu++
    nvidia-cublas==13.1.0.3      # libcublas.so.13, libcublasLt.so.13
    nvidia-curand==10.4.0.35     # libcurand.so.10
    nvidia-cuda-nvrtc==13.0.88   # libnvrtc.so.13
)
[[ $features == cudnn ]] && wheels+=(nvidia-cudnn-cu13==9.13.0.50)

mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
[[ -x $dir/venv/bin/pip ]] || "${PYTHON:-python3}" -m venv "$dir/venv"
"$dir/venv/bin/pip" install -q --no-deps "${wheels[@]}"
nvidia="$("$dir/venv/bin/python" -c 'import nvidia; print(list(nvidia.__path__)[0])')"
cu="$nvidia/cu13"

home="$dir/cuda"
rm -rf "$home"
mkdir -p "$home/bin" "$home/lib64/stubs"
ln -s "$cu"/bin/* "$home/bin/"
ln -s "$cu/include" "$home/include"
ln -s "$cu/nvvm" "$home/nvvm"
ln -s "$cu"/lib/* "$home/lib64/"
[[ $features == cudnn ]] && ln -s "$nvidia"/cudnn/lib/* "$home/lib64/"
ln -s lib64 "$home/lib"
# The wheels carry only the versioned names (libcublas.so.13); -lcublas wants
# libcublas.so.
for lib in "$home"/lib64/lib*.so.*; do
    name="$(basename "$lib")"
    [[ -e $home/lib64/${name%%.so.*}.so ]] || ln -s "$name" "$home/lib64/${name%%.so.*}.so"
done

# The driver stand-in: the cu* functions that cuda.h declares (after its _v2
# renames) and those that cudarc loads by name.
(cd "$root" && cargo fetch --locked -q)
stub="$dir/stub"
mkdir -p "$stub"
echo '#include <cuda.h>' | gcc -E -P -I"$home/include" -x c - \
    | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d ' (' >"$stub/names"
find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -path '*/cudarc-*/src/driver/sys/*.rs' \
    -exec grep -ohE '"cu[A-Z][A-Za-z0-9_]*"' {} + | tr -d '"' >>"$stub/names" || true
sort -u "$stub/names" | sed 's/.*/int &(void) { return 34; }/' >"$stub/libcuda.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$home/lib64/stubs/libcuda.so" "$stub/libcuda.c"
# Under its run-time name too, for the start-up checks below (never where a
# GPU is).
ln -sf libcuda.so "$home/lib64/stubs/libcuda.so.1"

# cudarc reads the CUDA version from `nvcc --version` and links from
# CUDA_HOME/lib64 and lib64/stubs; candle's kernels are compiled by nvcc for
# CUDA_COMPUTE_CAP (there is no nvidia-smi to ask).
export CUDA_HOME="$home" CUDA_PATH="$home" NVCC="$home/bin/nvcc" PATH="$home/bin:$PATH"
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target/cuda}"
mkdir -p "$out"
cd "$root"
# build.sh runs `fovea --version` as its check: here that loads the stand-in
# driver, which is enough for a program that touches no GPU.
LD_LIBRARY_PATH="$home/lib64:$home/lib64/stubs" deploy/build.sh --features "$features" build "$out"
echo "built $out/fovea (features: $features, compute capability $CUDA_COMPUTE_CAP)"
readelf -d "$out/fovea" | grep NEEDED
# Without a GPU, asking for one must be a clear error at start-up.
if LD_LIBRARY_PATH="$home/lib64:$home/lib64/stubs" "$out/fovea" bench --model resnet50 \
    --device cuda:0 --seconds 1 >"$dir/no-gpu.log" 2>&1; then
    echo "toolkit.sh: fovea ran on cuda:0 with the stand-in driver?" >&2
    exit 1
fi
echo "without a GPU, --device cuda:0 says: $(grep -m1 -i cuda "$dir/no-gpu.log")"

if [[ $tests == 1 ]]; then
    test_bin="$(cargo test --locked --release -p fovea-model-core --features "$features" \
        --test device_conformance --no-run --message-format=json \
        | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)"
    [[ -x $test_bin ]] || { echo "toolkit.sh: no device_conformance test binary" >&2; exit 1; }
    cp "$test_bin" "$out/device_conformance"
    carry="$(dirname "$out")/gpu"
    mkdir -p "$carry"
    for f in fovea device_conformance; do xz -T0 -6 -c "$out/$f" >"$carry/$f.xz"; done
    ls -l "$carry"
fi
