"""`infra models add|list|rm`: the node's model store, which the `plm` embedding loads weights from."""

from pathlib import Path
from typing import Annotated

import typer

from runner.cli.options import JSON_OPT
from runner.cli.output import echo, emit_json, say

app = typer.Typer(
    help="The node's model store: Hugging Face-format protein language models (safetensors only) that plans "
    "name in embeddings.params.model.\n\nSet it once with 'infra config set model_store PATH'. "
    "Example: infra models add esm2_t12_35m ./esm2_t12_35M_UR50D",
    no_args_is_help=True,
    rich_markup_mode=None,
)

NAME_ARG = Annotated[str, typer.Argument(help="The model's name in the store: 1-64 of a-z 0-9 . _ - (lower case).")]


def _size(n: int) -> str:
    from runner.cli.housekeeping import _size as size

    return size(n)


@app.command("add")
def add(
    name: NAME_ARG,
    directory: Annotated[
        Path,
        typer.Argument(
            help="A local Hugging Face-format model folder: config.json, *.safetensors weights, tokenizer files "
            "(fetch one with 'huggingface-cli download REPO --local-dir DIR' on a machine with internet)."
        ),
    ],
    replace: Annotated[
        bool, typer.Option("--replace", help="Replace the weights already stored under NAME (new runs get new ids).")
    ] = False,
    json_out: JSON_OPT = False,
) -> None:
    """Copy a model folder into the store under NAME (atomically) and record its content hash.

    Only regular files are copied; links, special files and pickled weights (.bin, .pt, .pth, .pkl,
    .ckpt, .pickle, .joblib) are refused naming the file. Exit 2 for such a folder or a bad name,
    3 when no store is set or it is not writable.

    Example: infra models add esm2_t12_35m ./esm2_t12_35M_UR50D
    """
    from runner.modelstore import add as add_model

    model, outcome = add_model(name, directory, replace=replace)
    if json_out:
        emit_json({**model.to_dict(), "outcome": outcome})
    say(f"{outcome} model {model.name} ({_size(model.bytes)}, sha256 {model.sha256[:12]}) in {model.path}")


@app.command("list")
def list_(json_out: JSON_OPT = False) -> None:
    """The models of the store: name, size, content hash (sha256, 12 hex here) and when it was added.

    With --json: {"store": PATH, "models": [{name, path, sha256, bytes, files, added_at}]}.

    Example: infra models list
    """
    from runner.modelstore import list_models

    store, models = list_models()
    if json_out:
        emit_json({"store": str(store), "models": [m.to_dict() for m in models]})
        return
    if not models:
        say(f"no models in {store}; add one with 'infra models add NAME DIR'")
        return
    rows = [("NAME", "SIZE", "SHA256", "ADDED")]
    rows += [(m.name, _size(m.bytes), m.sha256[:12], m.added_at) for m in models]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


@app.command("rm")
def rm(name: NAME_ARG, json_out: JSON_OPT = False) -> None:
    """Remove a model from the store. Experiments that used it keep their results; running them again
    or predicting with them needs the model (the same weights) back.

    Example: infra models rm esm2_t12_35m
    """
    from runner.modelstore import remove

    model = remove(name)
    if json_out:
        emit_json({**model.to_dict(), "removed": True})
    say(f"removed model {model.name} ({_size(model.bytes)}) from {model.path.parent}")
