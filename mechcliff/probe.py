"""The refusal probe ("prober" of arXiv 2510.06036): logistic regression on the residual stream.

``r = sigmoid(w · x + b)`` with ``x = blocks.{layer}.hook_resid_post`` at one token per example (default: the last
token of the closing template, ``think_end``). Fitted with scikit-learn (centred features, L2, balanced class
weights, one isotropic scale); the centring and scale are folded back into ``w`` and ``b`` so that the probe is an affine function of the
raw residual stream, which direct probe attribution needs. The paper reads the last layer; we sweep all layers,
report held-out accuracy and AUROC for each, and choose the best (ties go to the deeper layer).

Labels come either from judged behaviour (refused = 1, complied = 0) or, when the model never refuses, from the
dataset (harmful = 1, harmless = 0); ``label_source`` records which.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import numpy as np
import torch
from jaxtyping import Float

from mechcliff.chat import EncodedBatch
from mechcliff.errors import MechcliffError
from mechcliff.model.capture import MAX_TOKENS, act_name, capture
from mechcliff.results import Result

if TYPE_CHECKING:
    from mechcliff.model.handle import ModelHandle


def resid_hook(layer: int) -> str:
    return act_name("resid_post", layer)


@torch.no_grad()
def collect_residuals(
    handle: ModelHandle, batch: EncodedBatch, layers: Sequence[int], position: Any = "think_end", batch_size: int = 16,
    max_tokens: int | None = MAX_TOKENS,
) -> Float[np.ndarray, "example layer d_model"]:
    """Residual stream after each of ``layers`` at one position per example (NaN rows where it is missing).

    Positions are gathered inside the hook, so what is kept is O(batch x layers x d_model); rows run in chunks of
    similar length (at most ``batch_size`` rows and ``max_tokens`` padded tokens each).
    """
    layers = [handle.check_layer(l) for l in layers]
    out = np.full((len(batch), len(layers), handle.d_model), np.nan, dtype=np.float32)
    names = [resid_hook(l) for l in layers]
    read = {n: (lambda x, where: x.float()) for n in names}
    for chunk in capture(handle, batch, read, at=position, batch_size=batch_size, max_tokens=max_tokens, pack=True):
        rows = chunk.where.index.numpy()
        for j, n in enumerate(names):
            out[rows, j] = chunk.values[n].numpy()
    return out


@dataclasses.dataclass(repr=False)
class LinearProbe(Result):
    """A fitted probe ``sigmoid(w · resid_post[layer] + b)`` with its metrics and provenance.

    A :class:`~mechcliff.results.Result` (kind ``linear_probe``): saved as ``result.json`` + ``tensors.safetensors``
    like every result; folders written before it was one (``probe.json`` + ``probe.safetensors``) still load."""

    KIND: ClassVar[str] = "linear_probe"
    w: np.ndarray
    b: float
    layer: int
    site: str = "resid_post"
    position: str = "think_end"
    model_id: str = ""
    model_hash: str = ""
    label_source: str = "behaviour"
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.w = np.asarray(self.w, dtype=np.float64)
        self.b = float(self.b)

    @property
    def hook_name(self) -> str:
        return resid_hook(self.layer)

    def logit(self, x: "np.ndarray | torch.Tensor") -> Any:
        if isinstance(x, torch.Tensor):
            return x.to(torch.float32) @ torch.as_tensor(self.w, dtype=torch.float32, device=x.device) + self.b
        return np.asarray(x, dtype=np.float64) @ self.w.astype(np.float64) + self.b

    def score(self, x: "np.ndarray | torch.Tensor") -> Any:
        z = self.logit(x)
        return torch.sigmoid(z) if isinstance(z, torch.Tensor) else 1.0 / (1.0 + np.exp(-z))

    def check_model(self, handle: ModelHandle) -> None:
        """Raise when this probe was trained on another model (id, weights fingerprint or width differ)."""
        if self.w.shape[0] != handle.d_model or self.model_hash != handle.model_hash:
            raise MechcliffError(
                f"this probe was trained on model '{self.model_id}' (weights {self.model_hash}, d_model "
                f"{self.w.shape[0]}), not on '{handle.model_id}' (weights {handle.model_hash}, d_model "
                f"{handle.d_model}); train a probe on this model"
            )
        handle.check_layer(self.layer)

    @classmethod
    def load(cls, path: str | Path, handle: ModelHandle | None = None) -> "LinearProbe":
        """Load a saved probe (either format); with ``handle``, check that it belongs to that model."""
        path = Path(path)
        if (path / "result.json").exists():
            probe = super().load(path)
        elif (path / "probe.json").exists():
            probe = _load_probe_v0(path)
        else:
            raise MechcliffError(f"{path} is not a saved probe (no result.json or probe.json)")
        if handle is not None:
            probe.check_model(handle)
        return probe

    def plot(self):
        """Held-out accuracy and AUROC of the layer sweep (``metrics["by_layer"]``), the chosen layer marked."""
        from mechcliff.plotting import probe_by_layer

        rows = self.metrics.get("by_layer") or [{"layer": self.layer, "val_accuracy": self.metrics.get("val_accuracy"),
                                                 "val_auroc": self.metrics.get("val_auroc")}]
        nan = float("nan")
        return probe_by_layer([r["layer"] for r in rows],
                              [nan if r.get("val_accuracy") is None else r["val_accuracy"] for r in rows],
                              [nan if r.get("val_auroc") is None else r["val_auroc"] for r in rows],
                              chosen_layer=self.layer if any(r["layer"] == self.layer for r in rows) else None)

    def summary_rows(self) -> list[tuple[str, str]]:
        m = self.metrics
        acc = f"{_num(m.get('val_accuracy')):.3f}"
        if m.get("n_val") is not None:
            acc += f" (n={m['n_val']}"
            if m.get("val_accuracy_interval"):
                low, high = m["val_accuracy_interval"]
                acc += f", 95% [{low:.2f}, {high:.2f}]"
            acc += ")"
        return [("model", self.model_id), ("layer", str(self.layer)), ("position", self.position),
                ("labels", self.label_source), ("val accuracy", acc),
                ("val AUROC", f"{_num(m.get('val_auroc')):.3f}")]

    def __repr__(self) -> str:
        """One line: layer, position, width, held-out accuracy (on how many examples), label source, model."""
        from mechcliff.results import _clip

        m = self.metrics
        n_val = f" (n_val={m['n_val']})" if m.get("n_val") is not None else ""
        return (f"LinearProbe(layer={self.layer}, position={_clip(self.position, 24)}, "
                f"d_model={int(np.shape(self.w)[0])}, val_accuracy={_num(m.get('val_accuracy')):.3f}{n_val}, "
                f"val_auroc={_num(m.get('val_auroc')):.3f}, labels={_clip(self.label_source, 24)}, "
                f"model={_clip(self.model_id or '?', 48)})")



def _load_probe_v0(path: Path) -> LinearProbe:
    """A probe saved before :class:`LinearProbe` was a Result: ``probe.json`` (fields) + ``probe.safetensors`` (w)."""
    from safetensors.numpy import load_file

    try:
        meta = json.loads((path / "probe.json").read_text())
        if not isinstance(meta, dict) or meta.pop("kind", LinearProbe.KIND) != LinearProbe.KIND:
            raise ValueError("not a probe")
        meta.pop("format_version", None)
        return LinearProbe(w=load_file(str(path / "probe.safetensors"))["w"], **meta)
    except (ValueError, TypeError, OSError) as exc:
        raise MechcliffError(f"{path / 'probe.json'} is not a loadable mechcliff probe "
                             f"({type(exc).__name__}: {exc})") from None


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


#: Label sources of a probe: judged behaviour (refused = 1), the dataset (harmful = 1), or ``auto``.
LABEL_SOURCES = ("auto", "behaviour", "dataset")
#: ``auto`` uses behaviour labels when both classes have at least this many examples.
MIN_PER_BEHAVIOUR_CLASS = 4


def choose_labels(behaviour: Sequence[int], dataset: Sequence[int], source: str = "auto"
                  ) -> tuple[list[int], str, str | None]:
    """The label policy of every probe mechcliff fits: ``(labels, source used, note)``.

    ``source="auto"``: behaviour labels (refused = 1, complied = 0) when the model both refused and complied at least
    :data:`MIN_PER_BEHAVIOUR_CLASS` times, else dataset labels (harmful = 1, harmless = 0) -- a model that (almost)
    never refuses gives no behaviour contrast to probe. ``note`` says why dataset labels were chosen (else None).
    """
    if source not in LABEL_SOURCES:
        raise MechcliffError(f"label_source must be one of {', '.join(LABEL_SOURCES)}, not {source!r}")
    if len(behaviour) != len(dataset):
        raise MechcliffError(f"{len(behaviour)} behaviour labels but {len(dataset)} dataset labels")
    note = None
    if source == "auto":
        counts = np.bincount(np.asarray(behaviour, dtype=np.int64), minlength=2)
        source = "behaviour" if counts.min() >= MIN_PER_BEHAVIOUR_CLASS else "dataset"
        if source == "dataset":
            note = f"the model refused {counts[1]} of {len(behaviour)}: using dataset labels (harmful vs harmless)"
    return [int(v) for v in (behaviour if source == "behaviour" else dataset)], source, note


#: ``fit_probe`` warns when the held-out accuracy rests on fewer examples than this, or on fewer than
#: :data:`MIN_VAL_PER_CLASS` of either class: with 20 examples the 95% Wilson interval of an accuracy of 0.8 is
#: still [0.58, 0.92]; with 3 (a fit on 12 examples), an accuracy of 0.667 means anything in [0.21, 0.94].
MIN_VAL_EXAMPLES = 20
MIN_VAL_PER_CLASS = 5


def _fit_one(x_tr: np.ndarray, y_tr: np.ndarray, C: "float | str", seed: int) -> tuple[np.ndarray, float, float]:
    """L2 logistic regression on centred features scaled by ONE global factor (their RMS); returns ``(w, b, C)``.

    Per-feature standardisation is deliberately avoided: it would inflate low-variance noise directions to the
    same footing as the refusal signal; an isotropic scale keeps the geometry of the residual stream. With
    ``C="cv"`` the inverse regularisation strength is chosen by stratified cross-validation (log loss) on the
    training split only, over ``CS_GRID``.
    """
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

    x_tr = x_tr.astype(np.float64)
    mu = x_tr.mean(0)
    scale = float(np.sqrt(((x_tr - mu) ** 2).sum(1).mean())) or 1.0
    xs = (x_tr - mu) / scale
    folds = min(4, int(np.bincount(y_tr).min()))
    if C == "cv" and folds >= 2:
        with warnings.catch_warnings():  # scikit-learn 1.9 announces an attribute change we do not rely on
            warnings.simplefilter("ignore", FutureWarning)
            clf = LogisticRegressionCV(Cs=CS_GRID, cv=folds, scoring="neg_log_loss", class_weight="balanced",
                                       max_iter=5000, random_state=seed).fit(xs, y_tr)
        chosen = float(clf.C_[0])
    else:
        chosen = 1.0 if C == "cv" else float(C)
        clf = LogisticRegression(C=chosen, class_weight="balanced", max_iter=5000, random_state=seed).fit(xs, y_tr)
    w = clf.coef_[0] / scale
    b = float(clf.intercept_[0] - w @ mu)
    return w, b, chosen


CS_GRID = tuple(float(c) for c in np.logspace(-3, 3, 7))


def _metrics(scores: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import roc_auc_score

    acc = float(((scores >= 0.5).astype(int) == y).mean())
    auroc = float(roc_auc_score(y, scores)) if len(set(y.tolist())) == 2 else float("nan")
    return acc, auroc


def fit_probe(
    handle: ModelHandle,
    batch: EncodedBatch,
    labels: Sequence[int],
    *,
    layer: "int | str" = "best",
    position: Any = "think_end",
    val_fraction: float = 0.25,
    C: "float | str" = "cv",
    seed: int = 0,
    label_source: str = "behaviour",
    batch_size: int = 16,
    provenance: dict[str, Any] | None = None,
) -> LinearProbe:
    """Fit the refusal probe. ``layer="best"`` sweeps every layer (one forward pass per batch for all layers).

    The examples are split once (stratified, ``val_fraction`` held out, seeded); each layer's probe is fitted on
    the training part (``C="cv"``: regularisation chosen by cross-validation within it) and scored on the
    held-out part; the best layer is the one with the highest held-out accuracy, then AUROC, then depth.

    ``metrics`` records ``n_train``, ``n_val``, ``val_class_counts``, the 95% Wilson interval of the held-out
    accuracy (``val_accuracy_interval``, :func:`mechcliff.stats.wilson_interval`) and ``small_validation``: True,
    with a ``UserWarning`` giving the count and the interval, when fewer than :data:`MIN_VAL_EXAMPLES` examples
    (or fewer than :data:`MIN_VAL_PER_CLASS` of a class) are held out. With ``layer="best"`` the same held-out
    examples also choose the layer, so its accuracy is, if anything, optimistic.

    Args:
        handle: the loaded model (:func:`mechcliff.load_model`).
        batch: the encoded examples (:func:`mechcliff.generation.encode_rollouts` or :func:`mechcliff.chat.encode`).
        labels: one label per example of ``batch``: 1 = refused (or harmful), 0 = complied (or harmless); at
            least 4 of each class.
        layer: the residual-stream layer to read, or ``"best"`` to sweep every layer and keep the best.
        position: the token read in each example: an anchor of :meth:`EncodedBatch.position` (``"think_end"``,
            ``"last"``, ...), an int, or a per-example index tensor. Examples without it are skipped (counted).
        val_fraction: the share of examples held out for the accuracy and AUROC (stratified).
        C: inverse L2 strength of the logistic regression, or ``"cv"`` to choose it from :data:`CS_GRID` by
            cross-validation on the training part.
        seed: seed of the split and of the solver.
        label_source: what the labels are, recorded on the probe: ``"behaviour"`` (judged answers) or
            ``"dataset"`` (harmful vs harmless prompts).
        batch_size: examples per forward pass.
        provenance: extra fields for ``probe.provenance`` (e.g. the rollout file).
    """
    from sklearn.model_selection import train_test_split

    y = np.asarray(labels, dtype=int)
    if len(y) != len(batch):
        raise MechcliffError(f"{len(y)} labels for {len(batch)} examples")
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise MechcliffError(
            f"the probe needs two classes, but every one of the {len(y)} examples has label {classes[0] if len(classes) else '?'}"
            " (e.g. the model refused everything or nothing); use dataset labels (harmful vs harmless) instead"
        )
    if counts.min() < 4:
        raise MechcliffError(f"the probe needs at least 4 examples of each class, got {dict(zip(classes.tolist(), counts.tolist()))}")
    layers = list(range(handle.n_layers)) if layer == "best" else [handle.check_layer(int(layer))]
    feats = collect_residuals(handle, batch, layers, position, batch_size)
    keep = ~np.isnan(feats[:, 0, 0])
    if keep.sum() < len(y):
        feats, y_used = feats[keep], y[keep]
    else:
        y_used = y
    idx = np.arange(len(y_used))
    tr, va = train_test_split(idx, test_size=val_fraction, stratify=y_used, random_state=seed)
    by_layer = []
    fitted = {}
    for j, l in enumerate(layers):
        w, b, c_used = _fit_one(feats[tr, j], y_used[tr], C, seed)
        s_va = 1.0 / (1.0 + np.exp(-(feats[va, j].astype(np.float64) @ w + b)))
        s_tr = 1.0 / (1.0 + np.exp(-(feats[tr, j].astype(np.float64) @ w + b)))
        acc, auroc = _metrics(s_va, y_used[va])
        tr_acc, _ = _metrics(s_tr, y_used[tr])
        by_layer.append({"layer": l, "val_accuracy": acc, "val_auroc": auroc, "train_accuracy": tr_acc, "C": c_used})
        fitted[l] = (w, b)
    best = max(by_layer, key=lambda r: (r["val_accuracy"], np.nan_to_num(r["val_auroc"]), r["layer"]))
    w, b = fitted[int(best["layer"])]
    from mechcliff.data import content_hash
    from mechcliff.stats import wilson_interval

    n_val = int(len(va))
    val_counts = {str(c): int((y_used[va] == c).sum()) for c in classes.tolist()}
    interval = wilson_interval(int(round(best["val_accuracy"] * n_val)), n_val)
    small = n_val < MIN_VAL_EXAMPLES or min(val_counts.values()) < MIN_VAL_PER_CLASS
    if small:
        warnings.warn(
            f"the probe's held-out accuracy {best['val_accuracy']:.3f} rests on {n_val} held-out examples "
            f"({', '.join(f'{k} of class {c}' for c, k in sorted(val_counts.items(), reverse=True))}): 95% Wilson interval "
            f"[{interval[0]:.2f}, {interval[1]:.2f}]. Fit on more examples (at least {MIN_VAL_EXAMPLES} held out, "
            f"{MIN_VAL_PER_CLASS} of each class) or hold out more (val_fraction={val_fraction:g})",
            UserWarning, stacklevel=2)

    return LinearProbe(
        w=w, b=b, layer=int(best["layer"]), position=position if isinstance(position, str) else "custom",
        model_id=handle.model_id, model_hash=handle.model_hash, label_source=label_source,
        metrics={"val_accuracy": best["val_accuracy"], "val_auroc": best["val_auroc"],
                 "train_accuracy": best["train_accuracy"], "C": best["C"], "n_train": int(len(tr)), "n_val": n_val,
                 "val_class_counts": val_counts, "val_accuracy_interval": [float(interval[0]), float(interval[1])],
                 "small_validation": bool(small), "n_skipped_missing_position": int((~keep).sum()),
                 "by_layer": by_layer},
        provenance={"seed": seed, "C": C, "val_fraction": val_fraction,
                    "data_hash": content_hash([batch.row(i) for i in range(len(batch))] + [y.tolist()]),
                    **(provenance or {})},
    )
