#!/usr/bin/env bash
# Download the wheels the base image needs, for building it where containers cannot reach an index.
#
#   bash scripts/make-wheelhouse.sh [DIR]     # default DIR: wheelhouse/ at the repository root
#
# Reads pyproject.toml (build-system requires, dependencies and the `core` extra) and runs
# `pip download` on the host for the container's Python (3.11, manylinux x86_64, glibc 2.36 of
# Debian bookworm), so the host's pip settings (proxy, CA, local find-links) do the fetching.
# torch is pinned first and explicitly (INFRA_TORCH_SPEC, default torch==2.13.0, the CPU build on
# this machine): an unpinned `torch` resolves to a several-GB CUDA build. The project itself keeps a
# range (torch>=2.2) so a CUDA node installs its own build.
# Skips the download when DIR already holds a wheel for every requirement (a stamp of the inputs).
# Env: INFRA_TORCH_SPEC, INFRA_PYTHON_VERSION (3.11), INFRA_GLIBC_MINOR (36: glibc 2.36),
#      PYTHON (the host interpreter running pip).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${1:-$ROOT/wheelhouse}
TORCH_SPEC=${INFRA_TORCH_SPEC:-torch==2.13.0}
PYVER=${INFRA_PYTHON_VERSION:-3.11}
# pip does not widen a manylinux_2_36 platform to older glibc tags by itself: list them all.
GLIBC_MINOR=${INFRA_GLIBC_MINOR:-36}
PYTHON=${PYTHON:-python3}

mkdir -p "$DIR"
REQS=$("$PYTHON" - "$ROOT/pyproject.toml" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    doc = tomllib.load(f)
# pip evaluates environment markers with the host's interpreter, not the container's: the image's
# Python is Debian's 3.11.2, for which redis needs async-timeout (python_full_version < 3.11.3).
reqs = list(doc.get("build-system", {}).get("requires", [])) + ["wheel", "async-timeout>=4.0.3"]
reqs += doc["project"].get("dependencies", [])
reqs += doc["project"].get("optional-dependencies", {}).get("core", [])
print("\n".join(reqs))
EOF
)
STAMP="$DIR/.inputs"
PLATFORM_ARGS=()
for ((minor = GLIBC_MINOR; minor >= 17; minor--)); do
    PLATFORM_ARGS+=(--platform "manylinux_2_${minor}_x86_64")
done
PLATFORM_ARGS+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
WANT=$(printf '%s\n%s\n%s %s\n' "$TORCH_SPEC" "$REQS" "$PYVER" "$GLIBC_MINOR")
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    exit 0
fi

LOG=$(mktemp /tmp/infra-wheelhouse.XXXXXX.log)
trap 'rm -f "$LOG"' EXIT
pip_download() {
    if ! "$PYTHON" -m pip download --quiet --dest "$DIR" --only-binary=:all: \
        --python-version "$PYVER" "${PLATFORM_ARGS[@]}" --implementation cp "$@" >"$LOG" 2>&1; then
        tail -n 30 "$LOG" >&2
        echo "make-wheelhouse: pip download $* failed (is the package index reachable from this host?)" >&2
        exit 1
    fi
}
# torch alone first: its pin must win over the `torch>=2.2` range below.
pip_download "$TORCH_SPEC"
mapfile -t REQ_ARRAY <<<"$REQS"
pip_download "$TORCH_SPEC" "${REQ_ARRAY[@]}"
printf '%s' "$WANT" >"$STAMP"
