"""An infra experiment as an MLflow model ("models from code": this file is the model's code).

Saved by the host's tracking client (docs/tracking.md) from a minimal copy of the experiment:

    mlflow.pyfunc.save_model(
        path,                                    # or mlflow.pyfunc.log_model(name="model", ...)
        python_model=str(Path(runner.core.__file__).parent / "mlflow_model.py"),
        artifacts={ARTIFACT: folder},            # the files of MODEL_FILES that exist, same relative paths
        pip_requirements=[...],                  # explicit: else MLflow loads the model to infer them
    )

and used anywhere infra's training core (`pip install 'infra[core]'`) is installed:

    mlflow.pyfunc.load_model(path).predict(pd.DataFrame({"mutant": ["H24A", "E64K:S70G"]}))
    mlflow models predict -m PATH -i input.csv -t csv --env-manager local

Input: a DataFrame with a `mutant` column (plus the experiment's data.covariates columns, when it
has any), or a list/Series of mutant strings. Output: a DataFrame `mutant, prediction, error`, one
row per input row: a row the model cannot take has a NaN prediction and its reason in `error`. An
empty or missing mutant cell (what a CSV's empty field reads as) is the wild type.

Importing this file imports mlflow, never torch: MLflow executes it when the model is saved (on the
host, which has no torch) and the model is built only in `load_context`.
"""

from __future__ import annotations

import mlflow
import mlflow.pyfunc

ARTIFACT = "experiment"  # the artifact key of the experiment folder
WORKDIR_ARTIFACT = "workdir"  # optional: a workdir with the plugin folders a plugin model needs
# What the `experiment` folder holds, relative to the experiment directory: the prediction state and
# exactly one checkpoint are required, the rest is copied when it exists.
PREDICT_STATE = "config/predict.json"
CHECKPOINTS = ("ckpts/best.ckpt", "ckpts/last.ckpt")  # the first that exists (as `infra predict`)
OPTIONAL_FILES = ("config/target_sorted.npy", "config/plan.json")  # rank transform; the plan, for Model.plan
MODEL_FILES = (PREDICT_STATE, *CHECKPOINTS, *OPTIONAL_FILES)


class InfraModel(mlflow.pyfunc.PythonModel):
    """`runner.load_model` behind MLflow's pyfunc interface."""

    def load_context(self, context) -> None:
        from runner.core.model_api import load_model  # torch: only when the model is loaded

        config = getattr(context, "model_config", None) or {}
        workdir = context.artifacts.get(WORKDIR_ARTIFACT)
        self.model = load_model(
            context.artifacts[ARTIFACT], source=config.get("source"), workdir=workdir, device=config.get("device")
        )

    def predict(self, context, model_input, params=None):
        import pandas as pd

        if isinstance(model_input, pd.DataFrame):
            if "mutant" not in model_input.columns:
                raise ValueError(
                    f"the input has no 'mutant' column (columns: {', '.join(map(str, model_input.columns[:20]))}); "
                    "give one mutant per row, e.g. H24A or E64K:S70G ('' for the wild type)"
                )
            mutants = model_input["mutant"]
            covariates = model_input if self.model.covariates else None  # its columns, by name
        else:
            mutants = pd.Series(list(model_input) if not isinstance(model_input, str) else [model_input])
            covariates = None
        # a CSV's empty cell reads as NaN: the wild type, as in `infra predict`'s input files
        mutants = [m if isinstance(m, str) else ("" if pd.isna(m) else str(m)) for m in mutants]
        return self.model.predict_frame(mutants, covariates)


mlflow.models.set_model(InfraModel())
