"""The training core: runs inside the container (or on the host with `--backend local`).

This package is the only place in infra that imports torch, lightning, pandas or numpy-heavy code.
Nothing under `runner/` outside `runner/core/` may import it.
"""
