"""`from runner import load_model` without a torch import at `import runner`: the host CLI and the
host tier import `runner` on machines without the training core (DESIGN §2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO


def run_python(code: str, path: list[Path] = ()) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": ":".join(str(p) for p in [*path, REPO]), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)


def test_importing_runner_imports_no_torch_and_still_offers_load_model():
    proc = run_python(
        "import sys, runner; assert 'torch' not in sys.modules, 'torch imported';"
        "assert 'runner.core' not in sys.modules, 'core imported';"
        "assert 'load_model' in dir(runner); print(runner.__version__)"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == __import__("runner").__version__


def test_runner_works_where_torch_cannot_be_imported_and_load_model_says_why(tmp_path):
    # a host without the training core: a `torch` that fails to import shadows any installed one
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('no torch on this host')\n")
    proc = run_python(
        "import runner, runner.cli; print(runner.__version__)\n"
        "try:\n    from runner import load_model\nexcept ImportError as exc:\n    print('refused:', exc)\n",
        path=[tmp_path],
    )
    assert proc.returncode == 0, proc.stderr
    assert "refused: no torch on this host" in proc.stdout


def test_an_unknown_attribute_of_runner_is_an_attribute_error():
    proc = run_python("import runner\ntry:\n    runner.nothing_here\nexcept AttributeError as exc:\n    print(exc)")
    assert proc.returncode == 0 and "module 'runner' has no attribute 'nothing_here'" in proc.stdout, proc.stderr
