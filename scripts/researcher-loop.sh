#!/usr/bin/env bash
# The researcher's loop on the demo workdir (run scripts/demo.sh first): a 5-fold study logged live to a
# loopback MLflow server, an ensemble prediction of its folds with --top, the MLflow runs read back
# through the server's REST API while the study runs and after it, and TensorBoard's event files read
# back. Nothing here is a test (tests/test_tracking_live.py, test_predict_ensemble.py and
# test_core_tensorboard.py are); it shows the whole loop in one transcript.
#
#   bash scripts/researcher-loop.sh            # docker backend (as a user would)
#   INFRA_LOOP_BACKEND=local bash scripts/researcher-loop.sh
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${INFRA_DEMO_WORKDIR:-$ROOT/demo-workdir}
BACKEND=${INFRA_LOOP_BACKEND:-docker}
PYTHON=${PYTHON:-python3}
[ -f "$WORK/data/blat_ecolx.db" ] || { echo "run scripts/demo.sh first (no $WORK/data/blat_ecolx.db)" >&2; exit 2; }
TMP=$(mktemp -d /tmp/infra-loop-XXXXXX)
PORT=$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
URI=http://127.0.0.1:$PORT
"$PYTHON" -m mlflow server --backend-store-uri "sqlite:///$TMP/mlflow.db" --artifacts-destination "$TMP/artifacts" \
    --host 127.0.0.1 --port "$PORT" --workers 1 >"$TMP/mlflow.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; [ -n "${WATCH:-}" ] && kill $WATCH 2>/dev/null; true' EXIT
until curl -sf "$URI/health" >/dev/null; do sleep 1; done
export INFRA_TRACKING_HOSTS=http://127.0.0.1:$PORT   # this node may send results to that server only

# the plan: the demo's, 5 random folds, logged to MLflow
"$PYTHON" - "$WORK/plans/demo.json" "$TMP/plan.json" "$URI" <<'EOF'
import json, os, sys
plan = json.load(open(sys.argv[1]))
plan["data"]["db"] = os.path.abspath(os.path.join(os.path.dirname(sys.argv[1]), plan["data"]["db"]))
plan["name"] = "blat-cv-f{split.fold}"
plan["split"] = {"strategy": "random", "n_folds": 5, "fold": "all", "val_fraction": 0.1, "seed": 0}
plan["train"].update(max_epochs=40, early_stopping_patience=40)  # long enough to be read mid-training
plan["tracking"] = {"mlflow_uri": sys.argv[3], "experiment": "blat-loop"}
json.dump(plan, open(sys.argv[2], "w"), indent=2)
EOF

# a watcher that reads the MLflow server while the study runs: the first RUNNING run that has epoch
# metrics but no test metrics yet (so it is read mid-training, not while its end is being logged)
"$PYTHON" - "$URI" >"$TMP/live.txt" <<'EOF' &
import json, sys, time, urllib.request
uri = sys.argv[1]
def call(path, body=None):
    req = urllib.request.Request(uri + path, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=5))
while True:
    time.sleep(1)
    try:
        exp = call("/api/2.0/mlflow/experiments/get-by-name?experiment_name=blat-loop")["experiment"]
        runs = call("/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]]}).get("runs", [])
    except Exception:
        continue
    for run in runs:
        info, metrics = run["info"], run.get("data", {}).get("metrics", [])
        names = sorted({m["key"] for m in metrics})
        if info["status"] == "RUNNING" and "val_spearman" in names and "test_spearman" not in names:
            history = call(f"/api/2.0/mlflow/metrics/get-history?run_id={info['run_id']}&metric_key=val_spearman")
            steps = [(m["step"], round(m["value"], 4)) for m in history.get("metrics", [])]
            print(f"while running: MLflow run {info['run_name']} status RUNNING, no test metrics yet; "
                  f"val_spearman by epoch so far: {steps}", flush=True)
            sys.exit(0)
EOF
WATCH=$!

echo "\$ infra run plan.json --backend $BACKEND  (5 folds, a study, tracked live)"
infra run "$TMP/plan.json" --workdir "$WORK" --backend "$BACKEND"
kill $WATCH 2>/dev/null || true   # it has ended when it saw a run mid-training
wait $WATCH 2>/dev/null || true
WATCH=
cat "$TMP/live.txt"
[ -s "$TMP/live.txt" ] || echo "(the watcher saw no run mid-training)"
STUDY=$(infra ls --studies --workdir "$WORK" --json | "$PYTHON" -c '
import json, sys
print(next(s["study_id"] for s in json.load(sys.stdin)["studies"] if s["study_id"].startswith("blat-cv")))')

echo; echo "\$ infra predict --study $STUDY --saturation --top 10 --rank ucb:1.0 --table"
infra predict --study "$STUDY" --saturation --top 10 --rank ucb:1.0 --workdir "$WORK" --out "$TMP/top10.csv" --table
echo; echo "\$ head -3 top10.csv"; head -3 "$TMP/top10.csv"

echo; echo "the MLflow runs, read back through the REST API:"
"$PYTHON" - "$URI" <<'EOF'
import json, sys, urllib.request
uri = sys.argv[1]
def call(path, body=None):
    req = urllib.request.Request(uri + path, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=10))
exp = call("/api/2.0/mlflow/experiments/get-by-name?experiment_name=blat-loop")["experiment"]
runs = call("/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
for run in sorted(runs, key=lambda r: r["info"]["run_name"]):
    info, data = run["info"], run["data"]
    params = {p["key"]: p["value"] for p in data.get("params", [])}
    metrics = {m["key"]: m["value"] for m in data.get("metrics", [])}
    history = call(f"/api/2.0/mlflow/metrics/get-history?run_id={info['run_id']}&metric_key=val_spearman")["metrics"]
    files = [f["path"] for f in call(f"/api/2.0/mlflow/artifacts/list?run_id={info['run_id']}").get("files", [])]
    print(f"{info['run_name']}: {info['status']}, {(info['end_time'] - info['start_time']) / 1000:.1f} s, "
          f"test_spearman {metrics.get('test_spearman', float('nan')):.4f}, val_spearman x{len(history)} epochs, "
          f"data.db {params.get('data.db')} sha256 {params.get('data.db_sha256', '?')[:12]}, artifacts {files}")
EOF

echo; echo "TensorBoard's files of the first fold, read back:"
EXP=$WORK/experiments/$(infra ls --study "$STUDY" --workdir "$WORK" --json | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["experiments"][0]["experiment_id"])')
"$PYTHON" - "$EXP" <<'EOF'
import glob, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
for version in sorted(glob.glob(sys.argv[1] + "/logs/tensorboard/version_*")):
    acc = EventAccumulator(version, size_guidance={"scalars": 0}).Reload()
    tags = acc.Tags()["scalars"]
    print(f"{version.rsplit('/', 1)[-1]}: scalars {', '.join(f'{t} x{len(acc.Scalars(t))}' for t in sorted(tags))}")
    content = acc.PluginTagToContent("hparams")
    for tag, blob in content.items():
        data = plugin_data_pb2.HParamsPluginData.FromString(blob)
        if data.HasField("session_start_info"):
            hp = data.session_start_info.hparams
            keys = ("train.seed", "split.fold", "split.n_folds", "model.name", "train.batch_size")
            shown = {k: (hp[k].number_value if hp[k].HasField("number_value") else hp[k].string_value) for k in keys if k in hp}
            print(f"  hparams ({len(hp)} keys): {shown}")
EOF
