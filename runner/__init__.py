"""infra: a node-side runner for protein-fitness machine learning experiments.

`from runner import load_model` is the Python API of a trained experiment (docs/python-api.md). It
lives in the training core (`runner.core.model_api`, torch): it is imported on first use, never by
`import runner`, so the host CLI stays free of torch.
"""

__version__ = "0.1.0"

_LAZY = {"load_model": "runner.core.model_api"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # once imported, a plain attribute
        return value
    raise AttributeError(f"module 'runner' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
