#!/usr/bin/env bash
# The bundled demo, end to end on a fresh machine: install infra, start Docker, make the local base
# image (nothing can be pulled here), build the demo database from the bundled BLAT_ECOLX scan, run
# the template workdir's demo plan in a container, and end with the 10 single substitutions the
# trained model predicts best (infra predict --saturation --top 10). Run as root (it installs
# Debian packages).
#
#   bash scripts/demo.sh            # workdir: ./demo-workdir (made from plugins_template/)
#   INFRA_DEMO_WORKDIR=/path bash scripts/demo.sh
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
PYTHON=${PYTHON:-python3}
WORK=${INFRA_DEMO_WORKDIR:-$ROOT/demo-workdir}

need=()
for pkg in docker.io debootstrap curl; do dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg"); done
if ((${#need[@]})); then apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; fi
"$PYTHON" -m pip install -q -e .          # the host needs no torch: training runs in the container

bash scripts/start-services.sh docker
bash scripts/make-base-os-image.sh        # debootstrap → docker import (infra-os:bookworm)
bash scripts/make-wheelhouse.sh           # offline wheels for the image build (CPU torch)
# Keep the local base OS and the CPU torch pin in the node's config file (unless it already has its
# own), so every later command typed by hand builds and finds the same base image; INFRA_* still win.
for setting in base_os=infra-os:bookworm torch_spec=torch==2.13.0; do
    key=${setting%%=*}
    stored=$(infra config get "$key" --json | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["stored"] or "")')
    [ -n "$stored" ] || infra config set "$key" "${setting#*=}"
done

[ -d "$WORK" ] || cp -r plugins_template "$WORK"
[ -f "$WORK/data/blat_ecolx.db" ] || infra data demo --db "$WORK/data/blat_ecolx.db"
infra run "$WORK/plans/demo.json" --workdir "$WORK"    # the progress view: build, one line per epoch, a summary
# the same plan now names the same experiment (its images exist): ask for its id without running anything
EXP_ID=$(infra run "$WORK/plans/demo.json" --workdir "$WORK" --dry-run --json | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["experiment_id"])')
# the usual first design question: which single substitutions does the trained model like best?
# --out - on a terminal: a readable table (mutant, prediction, measured, in_train; --sequences adds them);
# into a pipe or with --out FILE the same rows are a CSV with the full sequences
infra predict "$EXP_ID" --saturation --top 10 --workdir "$WORK" --out - --table
