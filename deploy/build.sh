#!/usr/bin/env bash
# The one build of the `fovea` binary. The Dockerfiles run it, and CI runs it
# outside Docker, so the image build and the checked build cannot drift.
#
#   deploy/build.sh [--profile P] [--features F] plan DIR
#       Copy the workspace's manifests, Cargo.lock and this script to DIR, with
#       stub sources in place of the crates' code: what the dependency layer is
#       built from (it changes only when a manifest or the lock file does).
#   deploy/build.sh [--profile P] [--features F] [--no-clean] deps
#       Run in a tree made by `plan`: compile every dependency with the exact
#       cargo command line of `build`, then forget the stub crates (cargo clean)
#       so the real sources are compiled afresh on top.
#   deploy/build.sh [--profile P] [--features F] build OUT_DIR
#       Compile the fovea binary from the real sources, copy it to OUT_DIR and
#       check that it runs.
#
# --profile: a cargo profile, `release` (the default; the images) or `dev`
# (what CI uses: the same command line, compiled in the profile the test suite
# already built). --features: cargo features of the fovea package, e.g. `cuda`
# or `cudnn`. CARGO_TARGET_DIR is honoured.
set -euo pipefail

profile=release
features=""
clean=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --profile) profile="$2"; shift 2 ;;
        --profile=*) profile="${1#*=}"; shift ;;
        --features) features="$2"; shift 2 ;;
        --features=*) features="${1#*=}"; shift ;;
        --no-clean) clean=0; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "build.sh: unknown option $1" >&2; exit 2 ;;
        *) break ;;
    esac
done
command="${1:-}"
[[ -n "$command" ]] || { echo "usage: build.sh [--profile P] [--features F] plan DIR | deps | build OUT_DIR" >&2; exit 2; }
shift

[[ -f Cargo.toml && -f Cargo.lock ]] || { echo "build.sh: run it from the workspace root" >&2; exit 2; }

# The cargo command line, the same for the dependency layer and the binary.
cargo_args=(build --locked -p fovea --bin fovea --profile "$profile")
[[ -n "$features" ]] && cargo_args+=(--features "$features")
profile_dir="$profile"
[[ "$profile" == dev || "$profile" == test ]] && profile_dir=debug
[[ "$profile" == bench ]] && profile_dir=release
target_dir="${CARGO_TARGET_DIR:-target}"

# The workspace members, from the root manifest's `members = [...]`.
members() {
    tr '\n' ' ' <Cargo.toml | sed -n 's/.*members *= *\[\([^]]*\)\].*/\1/p' | tr -d ' "' | tr ',' '\n' | sed '/^$/d'
}

package_name() {
    sed -n 's/^name *= *"\([^"]*\)".*/\1/p' "$1/Cargo.toml" | head -n 1
}

case "$command" in
plan)
    dest="${1:?plan needs a destination directory}"
    mkdir -p "$dest/deploy"
    cp Cargo.toml Cargo.lock "$dest/"
    for f in rust-toolchain rust-toolchain.toml .cargo/config.toml; do
        [[ -f "$f" ]] && { mkdir -p "$dest/$(dirname "$f")"; cp "$f" "$dest/$f"; }
    done
    cp "$0" "$dest/deploy/build.sh"
    for member in $(members); do
        mkdir -p "$dest/$member"
        cp "$member/Cargo.toml" "$dest/$member/Cargo.toml"
        [[ -f "$member/build.rs" ]] && cp "$member/build.rs" "$dest/$member/build.rs"
        # Every target source cargo will look for: the conventional ones that
        # exist, and any `path = "....rs"` of the manifest.
        sources=()
        for conventional in src/lib.rs src/main.rs; do
            [[ -f "$member/$conventional" ]] && sources+=("$conventional")
        done
        while read -r path; do
            [[ -n "$path" ]] && sources+=("$path")
        done < <(sed -n 's/^ *path *= *"\([^"]*\.rs\)".*/\1/p' "$member/Cargo.toml")
        for src in "${sources[@]}"; do
            mkdir -p "$dest/$member/$(dirname "$src")"
            if grep -q 'fn main' "$member/$src" 2>/dev/null; then
                echo 'fn main() {}' >"$dest/$member/$src"
            else
                echo '// stub: dependencies are compiled before the sources are copied' >"$dest/$member/$src"
            fi
        done
    done
    echo "build.sh: plan written to $dest"
    ;;
deps)
    echo "+ cargo ${cargo_args[*]}  (stub sources: dependencies only)"
    cargo "${cargo_args[@]}"
    if [[ "$clean" == 1 ]]; then
        # The stub crates must not pass for the real ones (their outputs are
        # newer than the real sources' mtimes).
        for member in $(members); do
            cargo clean --locked -q --profile "$profile" -p "$(package_name "$member")"
        done
    fi
    ;;
build)
    out="${1:?build needs an output directory}"
    echo "+ cargo ${cargo_args[*]}"
    cargo "${cargo_args[@]}"
    mkdir -p "$out"
    cp "$target_dir/$profile_dir/fovea" "$out/fovea"
    # A stub binary (stale dependency-layer outputs) would print nothing.
    version="$("$out/fovea" --version)"
    [[ "$version" == fovea\ * ]] || { echo "build.sh: $out/fovea --version printed '$version'" >&2; exit 1; }
    echo "$version"
    ;;
*)
    echo "build.sh: unknown command $command (plan, deps, build)" >&2
    exit 2
    ;;
esac
