"""Every core container has a read-only image filesystem and a private, capped /tmp (issue 23, low):
scratch a plugin writes cannot fill the node's disk behind `min_free_bytes`. The spec is what the
engine receives (`engine.container_args`); tests/test_run_docker.py trains in such a container.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from runner import engine
from runner.plan.models import GpuRequest
from runner.run.backends import backend_for
from runner.run.jobs import Limits, slot_job, train_job


def _engine_args(job) -> dict:
    spec = backend_for("docker").spec(job.with_image("img", None))
    return engine.container_args(
        spec.image, list(spec.command), **{k: v for k, v in spec.engine_kwargs().items() if k != "command"}
    )


@pytest.mark.parametrize("kind", ["train", "slot"])
def test_training_and_slot_containers_have_a_read_only_root_and_a_capped_tmp(tmp_path: Path, kind):
    common = {"workdir": tmp_path, "gpus": GpuRequest.parse(None), "limits": Limits(memory="2g"), "labels": {}}
    if kind == "train":
        job = train_job(experiment_id="e-1", exp_root=tmp_path / "e-1", db=tmp_path / "x.db", name="infra-e-1",
                        output_dirs=("metrics",), **common)  # fmt: skip
    else:
        job = slot_job(slot_dir=tmp_path / "slot", dbs=(tmp_path / "x.db",), name="infra-slot", idle_exit_s=60,
                       alive_timeout_s=60, **common)  # fmt: skip
    args = _engine_args(job)
    assert args["read_only"] is True
    assert args["tmpfs"] == {"/tmp": "rw,nosuid,nodev,size=1g,mode=1777"}
    assert args["mem_limit"] == "2g"  # the tmpfs counts against it


def test_a_wait_that_times_out_is_a_timeout_and_an_engine_failure_is_not():
    """run_once (prediction, discovery) said "did not finish within --timeout" for any engine error
    (review of issue 23): only the wait's own timeout is one. The exceptions are the ones requests
    raises (the real time limit is tested in tests/test_attack_predict.py against the engine)."""
    import requests
    from docker.errors import APIError

    from runner.run.backends.docker import _timed_out

    read_timeout = requests.exceptions.ConnectionError("UnixHTTPConnectionPool(host='localhost'): Read timed out.")
    assert _timed_out(read_timeout) and _timed_out(requests.exceptions.ReadTimeout("x"))
    assert not _timed_out(requests.exceptions.ConnectionError("Connection aborted: FileNotFoundError"))
    assert not _timed_out(APIError("500 Server Error: engine failed"))
