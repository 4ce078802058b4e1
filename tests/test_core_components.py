"""Built-in embeddings, models, metrics, splits and target transforms on real arrays."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from runner.core.embeddings import EMBEDDINGS, create_embedding
from runner.core.metrics import METRICS, compute_metrics, spearman_gain_z
from runner.core.models import MODELS, ProteinModel, create_model
from runner.core.registry import ParamError
from runner.core.splits import SPLITS, make_split
from runner.core.transforms import TargetTransform
from runner.core.vocab import get_vocab_processor
from runner.errors import DataError, PlanError
from runner.plan.models import SplitSpec

pytestmark = pytest.mark.core


@pytest.fixture(scope="module")
def vocab():
    return get_vocab_processor("IUPAC")


def test_embeddings_expand_per_batch(vocab):
    tokens = torch.from_numpy(vocab.encode(["MKVW*", "MK"]))
    onehot = create_embedding("onehot", vocab)
    out = onehot(tokens)
    assert out.shape == (2, 5, vocab.size) and out.dtype == torch.float32
    assert out[1, 3].sum() == 0  # padding row is all zeros
    assert torch.equal(out[0].argmax(-1), tokens[0].long())
    blosum = create_embedding("blosum62", vocab)
    b = blosum(tokens)
    assert b.shape == (2, 5, 24)
    w, m = vocab.token_id("W"), vocab.token_id("M")
    assert blosum.table[w, "ARNDCQEGHILKMFPSTWYVBZX*".index("W")] == pytest.approx(11 / 4)
    assert blosum.table[m, "ARNDCQEGHILKMFPSTWYVBZX*".index("M")] == pytest.approx(5 / 4)
    assert create_embedding("blosum62", vocab, {"with_onehot": True}).dim == 24 + vocab.size
    assert {"onehot", "blosum62"} <= set(EMBEDDINGS.names())


@pytest.mark.parametrize("name", ["linear", "mlp", "cnn"])
@pytest.mark.parametrize("n_outputs", [1, 3])
def test_models_shapes_and_gradients(name, n_outputs):
    model = create_model(name, seq_len=12, in_dim=28, n_outputs=n_outputs)
    assert isinstance(model, ProteinModel)
    x = torch.randn(5, 12, 28)
    y = model(x)
    assert y.shape == ((5,) if n_outputs == 1 else (5, n_outputs))
    loss = y.float().pow(2).mean() + (model.penalty() if model.penalty() is not None else 0)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert {"ridge", "linear", "mlp", "cnn", "ge"} <= set(MODELS.names())


def test_linear_penalty_is_ridge():
    model = create_model("linear", seq_len=2, in_dim=3, n_outputs=1, params={"l2": 2.0, "lr_scale": 1.0})
    with torch.no_grad():
        model.weight.fill_(1.0)
    assert model.penalty().item() == pytest.approx(2.0)  # l2 * sum(w^2) / n_features


def test_linear_weights_saved_before_the_ridge_start_still_load():
    # an experiment trained before `init` existed: its weights load for `infra predict`, count as
    # trained (a resume must not overwrite them with a ridge fit) and not as a fitted start
    old = create_model("linear", seq_len=2, in_dim=3, n_outputs=1)
    state = {k: v for k, v in old.state_dict().items() if k in ("weight", "bias")}
    state["weight"] = torch.ones_like(state["weight"])
    model = create_model("linear", seq_len=2, in_dim=3, n_outputs=1)
    model.load_state_dict(state)
    assert bool(model.initialised) and not model.fitted_start
    assert torch.equal(model.weight, torch.ones_like(model.weight))
    with pytest.raises(ParamError, match="model.params.init: must be 'ridge' or 'zero'"):
        create_model("linear", seq_len=2, in_dim=3, n_outputs=1, params={"init": "random"})


def test_network_inputs_are_centred_not_scaled(vocab):
    onehot = create_embedding("onehot", vocab)
    # position 0 never varies, position 1 does; "W" at position 1 is rare (1 row in 4)
    tokens = torch.from_numpy(vocab.encode(["MA", "MA", "MA", "MW"]))
    x = onehot(tokens)
    width = vocab.size
    model = create_model("mlp", seq_len=2, in_dim=width, n_outputs=1, params={"base": "none"})
    model.fit_closed_form(lambda: [(x, torch.zeros(4))], None)
    centred = model.centre(x.flatten(1))
    assert torch.equal(centred[:, :width], torch.zeros(4, width))  # the constant position adds nothing
    assert centred.abs().max() <= 1.0  # the rare column is not amplified (a standardisation made it 1.73)
    assert centred[3, width + vocab.token_id("W")] == pytest.approx(0.75)
    assert any(k.endswith("centre.mean") for k in model.state_dict())  # saved with model.pth / checkpoints
    with pytest.raises(ParamError, match="model.params.base: must be 'ridge' or 'none'"):
        create_model("mlp", seq_len=2, in_dim=width, n_outputs=1, params={"base": "lasso"})


def test_ridge_matches_the_normal_equations_and_picks_alpha_on_validation():
    from runner.core.models import RidgeFit

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(300, 5, 2)))
    w_true = rng.normal(size=10)
    y = torch.from_numpy(x.flatten(1).numpy() @ w_true + 3.0 + rng.normal(scale=0.1, size=300))
    chunks = lambda lo, hi: lambda: [(x[i : min(i + 50, hi)], y[i : min(i + 50, hi)]) for i in range(lo, hi, 50)]  # noqa: E731
    weight, bias, mean = RidgeFit(alpha=2.0).fit(chunks(0, 200), None)
    xc = x[:200].flatten(1).numpy() - x[:200].flatten(1).numpy().mean(0)
    yc = y[:200].numpy() - y[:200].numpy().mean()
    expected = np.linalg.solve(xc.T @ xc + 2.0 * np.eye(10), xc.T @ yc)
    assert np.allclose(weight.numpy(), expected, atol=1e-8)
    assert float(bias) == pytest.approx(float(y[:200].mean() - (mean * weight).sum()))
    fit = RidgeFit()
    weight, _, _ = fit.fit(chunks(0, 200), chunks(200, 300))  # more rows than columns: primal
    assert fit.report["chosen_by"] == "validation Spearman" and fit.report["solve"] == "primal"
    assert fit.report["alpha"] <= 10.0  # little noise and 200 rows: light regularisation wins
    assert np.allclose(weight.numpy(), w_true, atol=0.05)
    dual = RidgeFit(alpha=2.0)
    w_dual, _, _ = dual.fit(chunks(0, 5), None)  # 5 rows, 10 columns: the dual (kernel) form
    xs, ys = x[:5].flatten(1).numpy(), y[:5].numpy()
    xs, ys = xs - xs.mean(0), ys - ys.mean()
    assert dual.report["solve"] == "dual"
    assert np.allclose(w_dual.numpy(), np.linalg.solve(xs.T @ xs + 2.0 * np.eye(10), xs.T @ ys), atol=1e-8)
    with pytest.raises(ParamError, match="positive"):
        RidgeFit(alphas=[1.0, -1.0])


def _sparse_variants(vocab, n_rows: int, length: int, varying: list[int], seed: int = 0) -> torch.Tensor:
    """One-hot rows of a poly-A template with 1-3 substitutions each, only at `varying` positions."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n_rows):
        seq = ["A"] * length
        for pos in rng.choice(varying, int(rng.integers(1, 4)), replace=False):
            seq[pos] = str(rng.choice(list("CDEFGHIKLMNPQRSTVWY")))
        seqs.append("".join(seq))
    return create_embedding("onehot", vocab)(torch.from_numpy(vocab.encode(seqs)))


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_networks_start_at_the_ridge_fit_scaled_for_sparse_inputs(vocab, name):
    # 40 positions, substitutions only at 5 of them (the shape of Bgl3: a few substitutions per row
    # among thousands of one-hot columns). PyTorch's default initialisation gave pre-activations far
    # below the steps Adam takes on the biases, and the network never left the ridge fit.
    length, varying = 40, [3, 4, 5, 6, 7]
    x = _sparse_variants(vocab, 300, length, varying)
    y = torch.from_numpy(np.random.default_rng(1).normal(size=300).astype(np.float32))
    model = create_model(name, seq_len=length, in_dim=vocab.size, n_outputs=1)
    model.fit_closed_form(lambda: [(x[:150], y[:150]), (x[150:], y[150:])], lambda: [(x, y)])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), model.base(x))  # the last layer starts at zero
        if name == "mlp":
            first, inputs = model.net[0], model.centre(x.flatten(1))
        else:
            first, inputs = model.head[2], model._head_input(x).flatten(1)
        pre = first(inputs)
    assert 0.5 < float(pre.std()) < 2.0  # unit scale on the rows it trains on (the default gave ~0.03)
    assert 0.2 < float((pre > 0).float().mean()) < 0.8  # no ReLU starts switched off

    # a substitution at a position never varied in training (far from the varied ones) moves nothing
    def hidden(rows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if name == "mlp":
                return model.net[:-1](model.centre(rows.flatten(1)))
            return model.head[:-1](model._head_input(rows))

    unseen = x[:1].clone()
    unseen[0, 30] = 0
    unseen[0, 30, vocab.token_id("W")] = 1
    assert torch.equal(hidden(unseen), hidden(x[:1]))
    # a resumed run calls fit_closed_form again: the trained network must survive it
    with torch.no_grad():
        first.weight.add_(1.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    resumed = create_model(name, seq_len=length, in_dim=vocab.size, n_outputs=1)
    resumed.load_state_dict(state)
    resumed.fit_closed_form(lambda: [(x[:150], y[:150]), (x[150:], y[150:])], lambda: [(x, y)])
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in state.items())


def test_ridge_has_nothing_for_gradient_descent_and_refuses_classes():
    model = create_model("ridge", seq_len=3, in_dim=4, n_outputs=1)
    assert not any(p.requires_grad for p in model.parameters())
    assert {"ridge.weight", "ridge.bias", "ridge.mean"} <= set(model.state_dict())
    with pytest.raises(ParamError, match="regression model"):
        create_model("ridge", seq_len=3, in_dim=4, n_outputs=2)
    mlp = create_model("mlp", seq_len=3, in_dim=4, n_outputs=2)  # classification: no ridge part
    assert mlp.base is None


def test_ge_is_monotone_and_starts_at_the_ridge_fit():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.integers(0, 2, size=(200, 4, 3)).astype(np.float32))
    y = torch.from_numpy((x.flatten(1).numpy() @ rng.normal(size=12)).astype(np.float32))
    model = create_model("ge", seq_len=4, in_dim=3, n_outputs=1)
    model.fit_closed_form(lambda: [(x, y)], None)
    with torch.no_grad():
        start = model(x)
        ridge = model.base(x)
    assert torch.allclose(start, ridge, atol=0.05 * float(ridge.std()))  # g starts near the identity
    with torch.no_grad():
        for p in (model.unit_weight, model.unit_gain, model.unit_shift, model.slope):
            p.normal_()
        z = torch.linspace(-10, 10, 101)
        u = (z - model.loc) / model.scale
        sp = torch.nn.functional.softplus
        g = model.loc + model.scale * (
            model.offset
            + sp(model.slope) * u
            + (torch.tanh(sp(model.unit_gain) * u[:, None] + model.unit_shift) * sp(model.unit_weight)).sum(-1)
        )
    assert (g.diff() > 0).all()  # increasing whatever the parameters


def test_unknown_component_params_name_the_plan_key(vocab):
    with pytest.raises(
        ParamError, match=r"model.params: model 'mlp' has no parameter 'hiden'; it takes: hidden, dropout"
    ):
        create_model("mlp", seq_len=2, in_dim=4, n_outputs=1, params={"hiden": [8]})
    with pytest.raises(ParamError, match=r"embeddings.params: embedding 'onehot' has no parameter 'scale'"):
        create_embedding("onehot", vocab, {"scale": 2})


def test_metrics_against_references():
    rng = np.random.default_rng(0)
    t = rng.normal(size=200)
    p = t + rng.normal(scale=0.5, size=200)
    m = compute_metrics(["spearman", "pearson", "mse", "rmse", "mae", "ndcg", "auc", "mcc"], t, p)
    assert m["spearman"] == pytest.approx(stats.spearmanr(t, p).statistic)
    assert m["pearson"] == pytest.approx(stats.pearsonr(t, p).statistic)
    assert m["mse"] == pytest.approx(np.mean((t - p) ** 2))
    assert m["rmse"] == pytest.approx(np.sqrt(m["mse"]))
    assert m["mae"] == pytest.approx(np.mean(np.abs(t - p)))
    assert 0.5 < m["ndcg"] <= 1.0 and 0.5 < m["auc"] <= 1.0 and 0 < m["mcc"] <= 1.0
    assert METRICS.get("ndcg")(t, t) == pytest.approx(1.0)
    # AUC against the pairwise definition, with a binary truth and ties in the prediction
    labels = np.array([0, 0, 1, 1, 1, 0])
    scores = np.array([0.1, 0.4, 0.4, 0.8, 0.9, 0.2])
    pairs = [(s1 > s0) + 0.5 * (s1 == s0) for s1 in scores[labels == 1] for s0 in scores[labels == 0]]
    assert METRICS.get("auc")(labels, scores) == pytest.approx(np.mean(pairs))
    assert METRICS.get("mcc")(labels, labels.astype(float)) == pytest.approx(1.0)
    assert METRICS.get("mcc")(labels, 1 - labels) == pytest.approx(-1.0)
    assert compute_metrics(["spearman"], t, np.zeros_like(t)) == {"spearman": None}  # undefined, not NaN in JSON


def test_spearman_gain_z_is_a_standard_error_of_the_paired_difference():
    # two predictions of equal quality on the same rows: z is ~ N(0, 1) whether their errors are
    # independent or shared (the shared case is the one that matters: an epoch vs its start)
    rng = np.random.default_rng(0)
    for shared in (0.0, 0.9, 0.99):
        zs = []
        for _ in range(300):
            y, common = rng.normal(size=300), rng.normal(size=300)
            e1, e2 = (np.sqrt(shared) * common + np.sqrt(1 - shared) * rng.normal(size=300) for _ in range(2))
            zs.append(spearman_gain_z(y, y + e1, y + e2))
        assert abs(np.mean(zs)) < 0.2 and 0.85 < np.std(zs) < 1.2, (shared, np.mean(zs), np.std(zs))


def test_spearman_gain_z_edges():
    rng = np.random.default_rng(1)
    y = rng.normal(size=500)
    start = y + rng.normal(scale=1.2, size=500)
    assert spearman_gain_z(y, start, start) == 0.0
    assert spearman_gain_z(y, 2 * start + 1, start) == 0.0  # same ranking
    better = start + 0.3 * (y - start)
    assert spearman_gain_z(y, better, start) > 5
    assert spearman_gain_z(y, start, better) == pytest.approx(-spearman_gain_z(y, better, start))
    assert spearman_gain_z(y, np.zeros(500), start) == float("-inf")  # a constant prediction ranks nothing
    assert spearman_gain_z(y, start, np.zeros(500)) == float("inf")


def _variants(n=100, mut_num=None, first_pos=None, frame=None):
    rng = np.random.default_rng(1)
    return SimpleNamespace(
        ids=np.arange(1000, 1000 + n),
        mut_num=np.asarray(mut_num if mut_num is not None else rng.integers(1, 4, n)),
        first_pos=np.asarray(first_pos if first_pos is not None else rng.integers(1, 51, n)),
        frame=frame if frame is not None else pd.DataFrame({"id": np.arange(n)}),
    )


def _check_partition(split, n):
    allidx = np.concatenate([split["train"], split["val"], split["test"]])
    assert len(allidx) == len(np.unique(allidx)) == n


def test_random_and_kfold_splits():
    v = _variants(100)
    s = make_split(v, SplitSpec(strategy="random", test_fraction=0.2, val_fraction=0.1, seed=3))
    _check_partition(s, 100)
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (70, 10, 20)
    assert all(
        np.array_equal(s[k], make_split(v, SplitSpec(strategy="random", seed=3, test_fraction=0.2))[k]) for k in s
    )  # seeded
    tests = [make_split(v, SplitSpec(strategy="random", n_folds=5, fold=f))["test"] for f in range(5)]
    assert sorted(np.concatenate(tests).tolist()) == list(range(100))  # folds partition the data


def test_mut_num_modulo_contiguous_splits():
    v = _variants(200)
    s = make_split(v, SplitSpec(strategy="mut_num", max_train_mut_num=1))
    assert (v.mut_num[s["test"]] > 1).all() and (v.mut_num[np.concatenate([s["train"], s["val"]])] <= 1).all()
    s = make_split(v, SplitSpec(strategy="modulo", n_folds=4, fold=2))
    assert ((v.first_pos[s["test"]] - 1) % 4 == 2).all()
    assert not ((v.first_pos[s["train"]] - 1) % 4 == 2).any()
    s = make_split(v, SplitSpec(strategy="contiguous", n_folds=5, fold=0))
    test_pos = v.first_pos[s["test"]]
    assert test_pos.max() < v.first_pos[s["train"]].max() and test_pos.min() == v.first_pos.min()
    _check_partition(s, 200)


def test_column_split():
    names = np.array(["train"] * 6 + ["valid"] * 2 + ["test"] * 2 + [None] * 2, dtype=object)
    v = _variants(12, frame=pd.DataFrame({"sampled": names}))
    s = make_split(v, SplitSpec(strategy="column", column="sampled"))
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (6, 2, 2)  # unlabelled rows left out
    folds = _variants(10, frame=pd.DataFrame({"fold": np.arange(10) % 5}))
    s = make_split(folds, SplitSpec(strategy="column", column="fold", fold=3, val_fraction=0.1))
    assert s["test"].tolist() == [3, 8]
    with pytest.raises(DataError, match="'nope' is not in the selected data"):
        make_split(v, SplitSpec(strategy="column", column="nope"))


def test_split_errors():
    with pytest.raises(DataError, match="test set empty"):
        make_split(_variants(20, mut_num=np.ones(20)), SplitSpec(strategy="mut_num", max_train_mut_num=1))
    with pytest.raises(PlanError, match="split.fold"):
        make_split(_variants(20), SplitSpec(strategy="random", n_folds=3, fold=3))
    assert {"random", "mut_num", "modulo", "contiguous", "column"} <= set(SPLITS.names())


def test_a_registered_split_gets_the_split_section_as_a_dict():
    # the plugin contract (docs/plugins.md): fn(variants, spec) with the plan's split.* keys in a dict;
    # the built-ins take the typed SplitSpec
    from runner.core.splits import register_split

    seen = []

    def every_other(variants, spec):
        seen.append(spec)
        n = len(variants.ids)
        return {"train": np.arange(0, n, 2), "val": np.array([], dtype=int), "test": np.arange(1, n, 2)}

    register_split("every_other_test", every_other)
    try:
        # a plan names only the built-in strategies today (SplitSpec.strategy), so construct one directly
        spec = SplitSpec.model_construct(**{**SplitSpec(seed=7).model_dump(), "strategy": "every_other_test"})
        s = make_split(_variants(10), spec)
    finally:
        SPLITS.unregister("every_other_test")
    assert s["test"].tolist() == [1, 3, 5, 7, 9]
    assert seen == [spec.model_dump()] and isinstance(seen[0], dict) and seen[0]["seed"] == 7


@pytest.mark.parametrize("name", ["none", "log", "standardize", "rank"])
def test_transforms_invert(name):
    rng = np.random.default_rng(0)
    y = np.concatenate([np.zeros(50), rng.gamma(2.0, 1.0, 200)])  # GB1-like: exact zeros plus a long tail
    tr = TargetTransform(name).fit(y[:150])
    z = tr.forward(y)
    assert np.isfinite(z).all()
    if name != "rank":
        np.testing.assert_allclose(tr.inverse(z), y, atol=1e-9)
    else:  # rank inverts exactly on training values and monotonically elsewhere
        np.testing.assert_allclose(tr.inverse(tr.forward(y[:150])), y[:150], atol=1e-9)
        order = np.argsort(y)
        assert (np.diff(tr.inverse(z)[order]) >= -1e-12).all()
    if name == "standardize":
        assert abs(z[:150].mean()) < 1e-9


def test_unknown_transform_is_a_plan_error():
    with pytest.raises(PlanError, match="data.transform"):
        TargetTransform("sqrt")


def _lightning_private_uses(sources: dict[str, str] | None = None) -> list[str]:
    """`trainer._x`, Lightning's loop internals, and private Lightning names a class overrides or sets,
    in `sources` ({file name: text}; default: every module of runner/core)."""
    import ast
    import inspect
    from pathlib import Path

    import lightning.pytorch as lp

    if sources is None:
        core = Path(__file__).resolve().parents[1] / "runner" / "core"
        sources = {path.name: path.read_text(encoding="utf-8") for path in sorted(core.glob("*.py"))}
    lightning_names = {n for n in dir(lp) if not n.startswith("_")} | {
        n for n in dir(lp.callbacks) if not n.startswith("_")
    }
    found = []
    for name_of_file, text in sources.items():
        for node in ast.walk(ast.parse(text)):
            where = f"{name_of_file}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Attribute):
                owner = ast.unparse(node.value)
                private = node.attr.startswith("_") and not node.attr.startswith("__")
                if private and owner.split(".")[-1] in ("trainer", "pl_module", "checkpoint_callback"):
                    found.append(f"{where}: {owner}.{node.attr}")
                if node.attr in ("fit_loop", "epoch_loop", "val_loop", "predict_loop", "test_loop"):
                    found.append(f"{where}: loop internals {owner}.{node.attr}")
            if isinstance(node, ast.ClassDef):
                bases = [ast.unparse(b).split(".")[-1] for b in node.bases]
                lightning_bases = [getattr(lp.callbacks, b, None) or getattr(lp, b, None) for b in bases]
                lightning_bases = [b for b, name in zip(lightning_bases, bases, strict=True) if name in lightning_names]
                if not lightning_bases:
                    continue
                base_source = "\n".join(inspect.getsource(c) for b in lightning_bases for c in b.__mro__[:-1])
                for inner in ast.walk(node):
                    name = None
                    if isinstance(inner, ast.FunctionDef):
                        name = inner.name
                    elif isinstance(inner, ast.Attribute) and ast.unparse(inner.value) == "self":
                        name = inner.attr
                    if name and name.startswith("_") and not name.startswith("__") and f".{name}" in base_source:
                        found.append(f"{name_of_file}:{inner.lineno}: {node.name} touches Lightning's private {name}")
    return found


def test_the_core_uses_only_public_lightning_api():
    # private Lightning internals change between releases without notice (StartValidation once drove
    # trainer._logger_connector and the fit loop's validation loop; BestCheckpoint overrode
    # ModelCheckpoint's _monitor_candidates and _update_best_and_save)
    assert _lightning_private_uses() == []


def test_the_private_api_check_finds_what_it_looks_for():
    planted = (
        "from lightning.pytorch.callbacks import ModelCheckpoint\n"
        "class Bad(ModelCheckpoint):\n"
        "    def __init__(self):\n"
        "        self._last_global_step_saved = -1\n"
        "    def _monitor_candidates(self, trainer):\n"
        "        trainer.fit_loop.epoch_loop.val_loop.run()\n"
        "        return trainer._logger_connector\n"
    )
    found = {f.split(": ", 1)[1] for f in _lightning_private_uses({"bad.py": planted})}
    assert {
        "Bad touches Lightning's private _last_global_step_saved",
        "Bad touches Lightning's private _monitor_candidates",
        "trainer._logger_connector",
        "loop internals trainer.fit_loop",
    } <= found
