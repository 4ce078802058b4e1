"""The node's model store (`infra models`), the plm plan checks, the weights in the experiment id, the
store and cache mounts of a plm job, and the embedding cache's housekeeping (`infra prune --cache`,
`infra node`). Host tier: model folders are config.json plus bytes in a *.safetensors file (the store
never loads them)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers import cli


def model_dir(where: Path, weights: bytes = b"weights-a", **extra: bytes) -> Path:
    """A Hugging Face-shaped folder: config.json, a safetensors file, tokenizer files, a subfolder."""
    where.mkdir(parents=True)
    (where / "config.json").write_text('{"model_type": "esm"}')
    (where / "model.safetensors").write_bytes(weights)
    (where / "vocab.txt").write_text("<cls>\n<pad>\nA\nC\n")
    (where / "extra").mkdir()
    (where / "extra" / "notes.md").write_text("a subfolder is copied too")
    for name, data in extra.items():
        (where / name.replace("__", ".")).write_bytes(data)
    return where


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    """The node's model store, set through the environment (as INFRA_MODEL_STORE)."""
    path = tmp_path / "store"
    monkeypatch.setenv("INFRA_MODEL_STORE", str(path))
    return path


def plm_plan(folder: Path, db: Path, model: str = "tiny", name: str = "plm", **extra) -> Path:
    doc = {
        "name": name,
        "data": {"db": str(db)},
        "embeddings": {"name": "plm", "params": {"model": model, "pooling": "mean"}},
        "model": {"name": "ridge"},
        **extra,
    }
    path = folder / f"{name}-{model}.json"
    path.write_text(json.dumps(doc))
    return path


def store_entries(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir() if p.name != ".lock")


# --- infra models add / list / rm -----------------------------------------------------------------


def test_models_add_list_rm_through_the_cli(tmp_path, store):
    src = model_dir(tmp_path / "tiny-src")
    added = cli("models", "add", "tiny", str(src), "--json")
    assert added.returncode == 0, added.stderr
    doc = json.loads(added.stdout)
    assert doc["outcome"] == "added" and doc["name"] == "tiny" and doc["path"] == str(store / "tiny")
    assert sorted(doc["files"]) == ["config.json", "extra/notes.md", "model.safetensors", "vocab.txt"]
    assert doc["bytes"] == sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    from runner.modelstore import model_sha256

    assert doc["sha256"] == model_sha256(src) == model_sha256(store / "tiny")
    manifest = json.loads((store / "tiny" / "infra-model.json").read_text())
    assert manifest == {k: doc[k] for k in ("name", "sha256", "bytes", "files", "added_at")}
    # the training's uid (another user when infra runs as root) reads the store, whatever the umask
    assert (store / "tiny" / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert (store / "tiny" / "extra").stat().st_mode & 0o777 == 0o755

    listed = cli("models", "list")
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert header.split() == ["NAME", "SIZE", "SHA256", "ADDED"]
    assert row.split()[0] == "tiny" and doc["sha256"][:12] in row.split()
    as_json = json.loads(cli("models", "list", "--json").stdout)
    assert as_json["store"] == str(store) and [m["name"] for m in as_json["models"]] == ["tiny"]

    again = cli("models", "add", "tiny", str(src))
    assert again.returncode == 0 and again.stderr.startswith("unchanged model tiny")

    removed = cli("models", "rm", "tiny")
    assert removed.returncode == 0, removed.stderr
    assert store_entries(store) == []
    gone = cli("models", "rm", "tiny")
    assert gone.returncode == 2
    assert gone.stderr.strip() == (
        f"infra: error: no model 'tiny' in the model store {store}: add it with 'infra models add tiny DIR'"
    )


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".pkl", ".ckpt", ".pickle", ".joblib", ".BIN"])
def test_pickled_weights_are_refused_naming_the_file(tmp_path, store, suffix):
    src = model_dir(tmp_path / "src", **{f"pytorch_model{suffix.replace('.', '__')}": b"\x80\x04pickle"})
    result = cli("models", "add", "tiny", str(src))
    assert result.returncode == 2
    assert result.stderr.startswith(f"infra: error: {src / ('pytorch_model' + suffix)}: pickled weights")
    assert not store.exists() or store_entries(store) == []


def test_links_and_special_files_are_refused(tmp_path, store):
    outside = tmp_path / "secret.txt"
    outside.write_text("not the model's")
    linked = model_dir(tmp_path / "linked")
    (linked / "tokenizer.json").symlink_to(outside)
    result = cli("models", "add", "tiny", str(linked))
    assert result.returncode == 2
    assert f"{linked / 'tokenizer.json'} is a symbolic link" in result.stderr
    assert "--local-dir" in result.stderr  # how to get a folder without links

    folder_link = model_dir(tmp_path / "folder-link")
    (folder_link / "sub").symlink_to(tmp_path, target_is_directory=True)
    assert cli("models", "add", "tiny", str(folder_link)).returncode == 2

    fifo = model_dir(tmp_path / "fifo")
    os.mkfifo(fifo / "pipe")  # reading it would hang the add
    result = cli("models", "add", "tiny", str(fifo))
    assert result.returncode == 2 and f"{fifo / 'pipe'} is not a regular file" in result.stderr

    as_link = tmp_path / "as-link"
    as_link.symlink_to(model_dir(tmp_path / "real"), target_is_directory=True)
    result = cli("models", "add", "tiny", str(as_link))
    assert result.returncode == 2 and f"{as_link} is a symbolic link" in result.stderr
    assert not store.exists() or store_entries(store) == []


def test_a_folder_without_config_or_safetensors_is_refused(tmp_path, store):
    no_config = model_dir(tmp_path / "no-config")
    (no_config / "config.json").unlink()
    result = cli("models", "add", "tiny", str(no_config))
    assert result.returncode == 2 and result.stderr.strip().endswith(
        f"{no_config} has no config.json: give the folder of a Hugging Face-format model"
    )
    no_weights = model_dir(tmp_path / "no-weights")
    (no_weights / "model.safetensors").unlink()
    result = cli("models", "add", "tiny", str(no_weights))
    assert result.returncode == 2 and "has no *.safetensors weights" in result.stderr
    missing = cli("models", "add", "tiny", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "is missing: give the folder" in missing.stderr


@pytest.mark.parametrize(
    ("name", "hint"), [("ESM2", "use 'esm2'"), ("_x", None), ("a/b", None), ("x" * 65, None), ("..", None)]
)
def test_bad_model_names_are_refused(tmp_path, store, name, hint):
    result = cli("models", "add", name, str(model_dir(tmp_path / "src")))
    assert result.returncode == 2
    assert "use 1-64 of a-z 0-9 . _ - starting with a letter or digit" in result.stderr
    assert (hint in result.stderr) if hint else "; use '" not in result.stderr
    assert not store.exists()


def test_no_store_set_or_an_unusable_store_exits_3(tmp_path):
    src = model_dir(tmp_path / "src")
    for args in (("add", "tiny", str(src)), ("list",), ("rm", "tiny")):
        result = cli("models", *args)
        assert result.returncode == 3, args
        assert "no model store is set on this node: run 'infra config set model_store PATH'" in result.stderr
    not_a_folder = tmp_path / "store-file"
    not_a_folder.write_text("a file where the store should be")
    result = cli("models", "add", "tiny", str(src), env={"INFRA_MODEL_STORE": str(not_a_folder)})
    assert result.returncode == 3 and f"cannot create the model store {not_a_folder}" in result.stderr


def test_model_store_is_a_node_setting(tmp_path):
    result = cli("config", "set", "model_store", str(tmp_path / "models"))
    assert result.returncode == 0, result.stderr
    src = model_dir(tmp_path / "src")
    assert cli("models", "add", "tiny", str(src)).returncode == 0
    assert (tmp_path / "models" / "tiny" / "infra-model.json").is_file()


def test_a_failing_add_leaves_nothing_and_keeps_the_old_model(tmp_path, store):
    first = model_dir(tmp_path / "a", weights=b"weights-a")
    assert cli("models", "add", "tiny", str(first)).returncode == 0
    before = json.loads((store / "tiny" / "infra-model.json").read_text())
    other = model_dir(tmp_path / "b", weights=b"weights-b")
    # the copy is complete when the name is found taken: it must vanish, the old model stay whole
    result = cli("models", "add", "tiny", str(other))
    assert result.returncode == 2
    assert "already in the store with other weights" in result.stderr and "--replace" in result.stderr
    assert store_entries(store) == ["tiny"]
    assert (store / "tiny" / "model.safetensors").read_bytes() == b"weights-a"
    assert json.loads((store / "tiny" / "infra-model.json").read_text()) == before

    replaced = cli("models", "add", "tiny", str(other), "--replace", "--json")
    assert replaced.returncode == 0, replaced.stderr
    assert json.loads(replaced.stdout)["outcome"] == "replaced"
    assert store_entries(store) == ["tiny"]
    assert (store / "tiny" / "model.safetensors").read_bytes() == b"weights-b"


def test_a_model_folder_without_a_manifest_is_damaged_not_a_model(tmp_path, store):
    (store / "half").mkdir(parents=True)
    (store / "half" / "model.safetensors").write_bytes(b"x")
    result = cli("models", "list")
    assert result.returncode == 2
    assert f"model folder {store / 'half'} has no infra-model.json" in result.stderr
    (store / "half" / "infra-model.json").write_text('["not", "a", "manifest"]')
    assert "has a infra-model.json infra did not write" in cli("models", "list").stderr
    (store / "half" / "infra-model.json").write_bytes(b" " * ((1 << 20) + 1))
    assert "over 1 MiB" in cli("models", "list").stderr
    assert cli("models", "rm", "half").returncode == 2  # removed by hand: it is not infra's


# --- plans: validation, experiment ids, mounts ---------------------------------------------------------


def test_validate_names_the_missing_model_and_the_store(tmp_path, store, mini_db):
    plan = plm_plan(tmp_path, mini_db, model="esm2-small")
    result = cli("validate", str(plan))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"infra: error: {plan}: embeddings.params.model: no model 'esm2-small' in the model store {store}: "
        "add it with 'infra models add esm2-small DIR'"
    )
    assert cli("models", "add", "esm2-small", str(model_dir(tmp_path / "src"))).returncode == 0
    assert cli("validate", str(plan)).returncode == 0
    no_model = tmp_path / "no-model.json"
    no_model.write_text(json.dumps({**json.loads(plan.read_text()), "embeddings": {"name": "plm"}}))
    result = cli("validate", str(no_model))
    assert result.returncode == 2 and "embeddings.params.model: name a model of the model store" in result.stderr


def test_validate_without_a_store_says_to_set_model_store(tmp_path, mini_db):
    plan = plm_plan(tmp_path, mini_db)
    for command in (("validate", str(plan)), ("run", str(plan), "--dry-run", "--backend", "local")):
        result = cli(*command, workdir=tmp_path)
        assert result.returncode == 2, command
        assert result.stderr.strip() == (
            f"infra: error: {plan}: embeddings.params.model: no model store is set on this node: run "
            "'infra config set model_store PATH' (or set INFRA_MODEL_STORE), then 'infra models add NAME DIR'"
        )
    onehot = tmp_path / "onehot.json"
    onehot.write_text(json.dumps({"name": "x", "data": {"db": str(mini_db)}, "model": {"name": "ridge"}}))
    assert cli("validate", str(onehot)).returncode == 0  # other embeddings need no store


def dry_run(plan: Path, workdir: Path, backend: str = "local") -> dict:
    result = cli("run", str(plan), "--dry-run", "--json", "--backend", backend, workdir=workdir)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_experiment_id_includes_the_weights_hash(tmp_path, store, mini_db, monkeypatch):
    wd = tmp_path / "wd"
    wd.mkdir()
    plan = plm_plan(tmp_path, mini_db)
    assert cli("models", "add", "tiny", str(model_dir(tmp_path / "a", weights=b"weights-a"))).returncode == 0
    first = dry_run(plan, wd)["experiment_id"]
    assert first.startswith("plm-")
    assert dry_run(plan, wd)["experiment_id"] == first  # stable

    other = model_dir(tmp_path / "b", weights=b"weights-b")
    assert cli("models", "add", "tiny", str(other), "--replace").returncode == 0
    second = dry_run(plan, wd)["experiment_id"]
    assert second != first  # other weights under the same name: another experiment

    assert cli("models", "rm", "tiny").returncode == 0
    assert cli("models", "add", "tiny", str(tmp_path / "a")).returncode == 0
    assert dry_run(plan, wd)["experiment_id"] == first  # the same weights again: the same experiment

    from runner.run.records import derive_experiment_id

    onehot = {"name": "x", "data": {"db": str(mini_db)}, "embeddings": {"name": "onehot", "params": {}}}
    with_store = derive_experiment_id(onehot, "h")
    monkeypatch.setenv("INFRA_MODEL_STORE", str(tmp_path / "no-such-store"))  # consulted, it would fail
    assert derive_experiment_id(onehot, "h") == with_store  # a plan without plm: no store consulted


def test_a_run_under_a_fixed_id_refuses_other_weights(tmp_path, store, mini_db):
    from runner.plan.load import load_plan
    from runner.plan.models import GpuRequest
    from runner.run.launch import Target, refuse_other_plan

    assert cli("models", "add", "tiny", str(model_dir(tmp_path / "a"))).returncode == 0
    loaded = load_plan(str(plm_plan(tmp_path, mini_db, experiment_id="fixed")))
    target = Target.of(loaded, tmp_path, "hash", GpuRequest())
    assert target.weights == json.loads((store / "tiny" / "infra-model.json").read_text())["sha256"]
    refuse_other_plan(target, {"plan_sha256": target.plan_sha, "model_sha256": target.weights})
    from runner.errors import UsageError

    with pytest.raises(UsageError, match="ran with other weights of model 'tiny'"):
        refuse_other_plan(target, {"plan_sha256": target.plan_sha, "model_sha256": "0" * 64})


@pytest.mark.docker
def test_dry_run_mounts_the_store_read_only_and_the_cache_read_write(tmp_path, store, mini_db, docker_client):
    wd = tmp_path / "wd"
    wd.mkdir()
    assert cli("models", "add", "tiny", str(model_dir(tmp_path / "a"))).returncode == 0
    plan = plm_plan(tmp_path, mini_db)
    container = dry_run(plan, wd, backend="docker")["container"]
    assert f"{store}:/models:ro" in container["mounts"]
    assert f"{wd / 'cache' / 'embeddings'}:/cache/embeddings:rw" in container["mounts"]
    env = container["environment"]
    assert env["INFRA_MODEL_STORE"] == "/models" and env["INFRA_EMBED_CACHE"] == "/cache/embeddings"
    assert container["network"] == "none"
    assert not (wd / "cache").exists()  # a dry run creates nothing

    local = dry_run(plan, wd, backend="local")["process"]["environment"]
    assert local["INFRA_MODEL_STORE"] == str(store)
    assert local["INFRA_EMBED_CACHE"] == str(wd / "cache" / "embeddings")

    onehot = tmp_path / "onehot.json"
    onehot.write_text(json.dumps({"name": "x", "data": {"db": str(mini_db)}, "model": {"name": "ridge"}}))
    plain = dry_run(onehot, wd, backend="docker")["container"]
    assert not any(":/models:" in m or ":/cache/embeddings:" in m for m in plain["mounts"])
    assert "INFRA_MODEL_STORE" not in plain["environment"]


def test_study_slots_and_predictions_get_the_store_and_the_cache(tmp_path, store, mini_db):
    from runner.plan.load import load_plan
    from runner.plan.models import GpuRequest
    from runner.run.jobs import Limits, PredictMember, plm_places, predict_job, slot_job

    assert cli("models", "add", "tiny", str(model_dir(tmp_path / "a"))).returncode == 0
    plm = load_plan(str(plm_plan(tmp_path, mini_db))).plan
    onehot = plm.model_copy(update={"embeddings": plm.embeddings.model_copy(update={"name": "onehot"})})
    wd = tmp_path / "wd"
    wd.mkdir()
    assert plm_places([onehot], wd) is None
    models = plm_places([onehot, plm], wd)  # any point with plm: the slot gets both
    assert (wd / "cache" / "embeddings").is_dir()
    slot = slot_job(slot_dir=tmp_path / "slot", dbs=(mini_db,), workdir=wd, name="s", gpus=GpuRequest(),
                    limits=Limits(), labels={}, idle_exit_s=1, alive_timeout_s=1, models=models)  # fmt: skip
    member = PredictMember("e", tmp_path / "e", "ckpts/best.ckpt", (), tmp_path / "out")
    predict = predict_job(members=(member,), source=None, result_name="r.csv", summary_name="s.json",
                          core_args=(), workdir=wd, labels={}, name="p", limits=Limits(), timeout_s=10,
                          models=models)  # fmt: skip
    for job in (slot, predict):
        places = {p.inside: p for p in job.places}
        assert places["/models"].host == store and places["/models"].read_only
        assert places["/cache/embeddings"].host == wd / "cache" / "embeddings"
        assert not places["/cache/embeddings"].read_only
        assert dict((k, p.inside) for k, p in job.env_places) == {
            "INFRA_MODEL_STORE": "/models",
            "INFRA_EMBED_CACHE": "/cache/embeddings",
        }


def test_predict_refuses_weights_other_than_the_trainings(tmp_path, store, mini_db):
    from runner.errors import UsageError
    from runner.plan.load import load_plan
    from runner.run.predict import plan_models

    assert cli("models", "add", "tiny", str(model_dir(tmp_path / "a"))).returncode == 0
    plan = load_plan(str(plm_plan(tmp_path, mini_db))).plan
    sha = json.loads((store / "tiny" / "infra-model.json").read_text())["sha256"]
    assert plan_models(plan, {"experiment_id": "e", "model_sha256": sha}, tmp_path).store.host == store
    assert cli("models", "add", "tiny", str(model_dir(tmp_path / "b", weights=b"b")), "--replace").returncode == 0
    with pytest.raises(UsageError, match="was trained with other weights of model 'tiny'"):
        plan_models(plan, {"experiment_id": "e", "model_sha256": sha}, tmp_path)


def test_a_cache_folder_replaced_by_a_link_is_not_mounted(tmp_path, store, mini_db):
    from runner import safefs
    from runner.plan.load import load_plan
    from runner.run.jobs import plm_places

    assert cli("models", "add", "tiny", str(model_dir(tmp_path / "a"))).returncode == 0
    plan = load_plan(str(plm_plan(tmp_path, mini_db))).plan
    wd = tmp_path / "wd"
    (wd / "cache").mkdir(parents=True)
    (wd / "cache" / "embeddings").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(safefs.Tampered):
        plm_places([plan], wd)


# --- the embedding cache: prune and node -----------------------------------------------------------------


def test_prune_cache_empties_it_and_follows_no_link(tmp_path):
    wd = tmp_path / "wd"
    cache = wd / "cache" / "embeddings"
    cache.mkdir(parents=True)
    (cache / "k1.npy").write_bytes(b"x" * 4000)
    (cache / "k1.json").write_bytes(b"{}")
    (cache / "deep").mkdir()
    (cache / "deep" / "more.npy").write_bytes(b"y" * 1000)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("the host's file")
    (cache / "planted").symlink_to(victim, target_is_directory=True)  # a container may plant one

    dry = cli("prune", "--cache", "--dry-run", "--json", workdir=wd)
    assert dry.returncode == 0, dry.stderr
    doc = json.loads(dry.stdout)["cache"]
    assert doc["path"] == str(cache) and doc["bytes"] == 4000 + 2 + 1000
    assert {e["name"]: (e["bytes"], e["removed"]) for e in doc["entries"]} == {
        "deep": (1000, False),
        "k1.json": (2, False),
        "k1.npy": (4000, False),
        "planted": (0, False),
    }
    assert sorted(p.name for p in cache.iterdir()) == ["deep", "k1.json", "k1.npy", "planted"]

    done = cli("prune", "--cache", workdir=wd)
    assert done.returncode == 0, done.stderr
    assert f"removed 4 embedding cache file(s) in {cache} (4.9 KiB)" in done.stderr
    assert cache.is_dir() and list(cache.iterdir()) == []  # the folder stays: containers may have it mounted
    assert (victim / "keep.txt").read_text() == "the host's file"

    assert json.loads(cli("prune", "--json", workdir=wd).stdout).keys() >= {"experiments", "bytes"}
    assert "cache" not in json.loads(cli("prune", "--json", workdir=wd).stdout)
    assert cli("prune", "--cache", workdir=tmp_path).returncode == 0  # no cache: nothing to do


def test_prune_cache_leaves_a_key_an_experiment_is_computing(tmp_path):
    """The files of a key whose lock is held (a run computing it: runner.core.plm holds `<key>.lock`
    with filelock) are kept and said; removing its temporary file would make that run fail (review of
    issue 24). The lock is held by this test with the same library, then released."""
    from filelock import FileLock

    wd = tmp_path / "wd"
    cache = wd / "cache" / "embeddings"
    cache.mkdir(parents=True)
    (cache / "busykey.lock").write_bytes(b"")
    (cache / ".busykey.ab12.npy.tmp").write_bytes(b"x" * 100)
    (cache / "donekey.npy").write_bytes(b"y" * 10)
    lock = FileLock(str(cache / "busykey.lock"))
    with lock:
        done = cli("prune", "--cache", "--json", workdir=wd)
    assert done.returncode == 0, done.stderr
    entries = {e["name"]: e for e in json.loads(done.stdout)["cache"]["entries"]}
    assert entries[".busykey.ab12.npy.tmp"]["busy"] and entries["busykey.lock"]["busy"]
    assert entries["donekey.npy"]["removed"]
    assert sorted(p.name for p in cache.iterdir()) == [".busykey.ab12.npy.tmp", "busykey.lock"]
    assert "kept 2 embedding cache file(s) an experiment is computing now" in done.stderr
    again = cli("prune", "--cache", workdir=wd)  # the lock released: the leftovers go
    assert again.returncode == 0 and list(cache.iterdir()) == []


def test_node_shows_the_store_and_the_cache(tmp_path, store):
    wd = tmp_path / "wd"
    (wd / "cache" / "embeddings").mkdir(parents=True)
    (wd / "cache" / "embeddings" / "k.npy").write_bytes(b"z" * 3 * 2**20)
    assert cli("models", "add", "tiny", str(model_dir(tmp_path / "a"))).returncode == 0
    doc = json.loads(cli("node", "--json", workdir=wd).stdout)
    assert doc["model_store"] == {"path": str(store), "models": 1}
    assert doc["embed_cache"] == {"path": str(wd / "cache" / "embeddings"), "bytes": 3 * 2**20}
    text = cli("node", workdir=wd).stdout
    assert f"models    1 in {store}" in text
    assert f"cache     3.0 MiB of embeddings in {wd / 'cache' / 'embeddings'}" in text
    os.environ.pop("INFRA_MODEL_STORE")
    assert "models    no model store (infra config set model_store PATH)" in cli("node", workdir=wd).stdout


def test_download_metadata_is_not_part_of_the_model_and_odd_names_are_refused(tmp_path, store):
    """`huggingface-cli download --local-dir` leaves `.cache/huggingface/…` with timestamps: the same
    weights downloaded twice must be the same model (review of issue 24). A name that is not UTF-8 is
    one line, and a source folder that holds the store (or lies in it) is refused."""
    import os

    from runner.modelstore import model_sha256

    a, b = model_dir(tmp_path / "a"), model_dir(tmp_path / "b")
    for folder, stamp in ((a, b"2026-01-01"), (b, b"2026-12-06")):
        (folder / ".cache" / "huggingface").mkdir(parents=True)
        (folder / ".cache" / "huggingface" / "model.safetensors.metadata").write_bytes(stamp)
        (folder / ".gitattributes").write_bytes(stamp)
    assert model_sha256(a) == model_sha256(b)
    assert cli("models", "add", "tiny", str(a)).returncode == 0
    assert not (store / "tiny" / ".cache").exists() and not (store / "tiny" / ".gitattributes").exists()
    assert "unchanged" in cli("models", "add", "tiny", str(b)).stderr

    odd = model_dir(tmp_path / "odd")
    (odd / os.fsdecode(b"bad\xffname.txt")).write_bytes(b"x")
    result = cli("models", "add", "odd", str(odd))
    assert result.returncode == 2 and "is not UTF-8; rename that file" in result.stderr
    assert "Traceback" not in result.stderr

    result = cli("models", "add", "whole", str(store.parent))
    assert result.returncode == 2 and "must not contain each other" in result.stderr
