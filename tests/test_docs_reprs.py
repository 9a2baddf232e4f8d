"""Short reprs, small-sample warnings of the probe, docstrings of the public functions (issue 16, items 19-21).

* Every :class:`~mechcliff.results.Result` kind and :class:`~mechcliff.probe.LinearProbe` print as one short line
  (no array dumps); their Jupyter HTML view is the summary table, as before.
* ``fit_probe`` warns when its held-out accuracy rests on few examples, and records how many and the Wilson interval.
* The public functions list every parameter in their docstrings, and no docstring or comment of the package (nor
  the README) cites a document that is not shipped in the repository.
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_REPR = 300


# ---- item 20: short reprs ------------------------------------------------------------------------------------


def _factories():
    from test_figures import FACTORIES  # one tiny synthetic instance per result kind (tests/test_figures.py)

    return FACTORIES


@pytest.mark.unit
def test_every_result_kind_has_a_factory():
    from mechcliff.results import KINDS

    missing = sorted(set(KINDS) - set(_factories()))
    assert not missing, f"add a factory for {missing} to tests/test_figures.py FACTORIES"


@pytest.mark.unit
@pytest.mark.parametrize("kind", sorted(k for k in _factories() if k != "linear_probe"))
def test_result_repr_is_one_short_line(kind):
    from mechcliff.report import html_table

    result = _factories()[kind][0]()
    text = repr(result)
    assert "\n" not in text, text
    assert len(text) <= MAX_REPR, f"{len(text)} characters: {text}"
    assert text.startswith(type(result).__name__) and kind in text, text
    assert "array(" not in text and "..." not in text.replace("…", ""), text  # no numpy array dump
    assert str(result) == text
    # the Jupyter view is unchanged: the class name and the summary table
    rows = [list(r) for r in result.summary_rows()]
    assert result._repr_html_() == f"<b>{type(result).__name__}</b>" + html_table(["field", "value"], rows)


@pytest.mark.unit
def test_result_repr_shows_array_shapes_and_key_numbers():
    from mechcliff.attribution import HeadAttribution

    rng = np.random.default_rng(0)
    n, L, H = 200, 24, 16  # a realistic size: the dataclass repr would print thousands of numbers
    per = rng.normal(size=(n, L, H))
    a = HeadAttribution(per_example=per, mlp=rng.normal(size=(n, L)), embed=np.zeros(n), attn_bias=np.zeros(n),
                        logit=per.sum((1, 2)), probe_bias=0.0, probe_layer=L - 1, positions=list(range(n)),
                        model_id="m" * 200, groups=["harmful"] * n)
    text = repr(a)
    assert "\n" not in text and len(text) <= MAX_REPR, text
    assert "per_example" in text and "200×24×16" in text, text
    assert "probe layer=23" in text, text


@pytest.mark.unit
def test_probe_repr_is_one_short_line():
    from test_figures import make_probe

    from mechcliff.report import html_table

    probe = make_probe()
    probe.metrics["n_val"] = 30
    text = repr(probe)
    assert "\n" not in text and len(text) <= MAX_REPR, text
    assert str(probe) == text
    for part in ("LinearProbe", "layer=3", "position=think_end", "d_model=16", "val_accuracy=0.900", "n_val=30",
                 "labels=behaviour"):
        assert part in text, (part, text)
    assert "array(" not in text
    rows = [list(r) for r in probe.summary_rows()]
    assert probe._repr_html_() == "<b>LinearProbe</b>" + html_table(["field", "value"], rows)


# ---- item 21: small-sample warnings of the probe -------------------------------------------------------------


def _small_subset(rollouts, labels, per_class=6):
    idx = [i for i, y in enumerate(labels) if y == 1][:per_class] + [i for i, y in enumerate(labels) if y == 0][:per_class]
    return [rollouts[i] for i in idx], [labels[i] for i in idx]


@pytest.mark.organism
def test_probe_on_few_examples_warns_and_records_the_interval(organism, organism_rollouts, organism_labels):
    from mechcliff.generation import encode_rollouts
    from mechcliff.probe import fit_probe

    rollouts, labels = _small_subset(organism_rollouts, organism_labels)
    assert len(rollouts) == 12
    batch = encode_rollouts(organism, rollouts)
    with pytest.warns(UserWarning, match=r"rests on 3 held-out examples.*95% Wilson interval \[\d\.\d\d, \d\.\d\d\]"):
        probe = fit_probe(organism, batch, labels, layer=2, seed=0)
    m = probe.metrics
    assert m["n_val"] == 3 and m["n_train"] == 9
    k = round(m["val_accuracy"] * 3)
    low, high = m["val_accuracy_interval"]
    from mechcliff.stats import wilson_interval

    assert (low, high) == pytest.approx(wilson_interval(k, 3))
    assert m["val_class_counts"] in ({"0": 1, "1": 2}, {"0": 2, "1": 1})
    assert m["small_validation"] is True
    assert "n_val=3" in repr(probe)
    rows = dict(probe.summary_rows())
    assert "n=3" in rows["val accuracy"] and "[" in rows["val accuracy"]


@pytest.mark.organism
def test_probe_on_all_rollouts_does_not_warn(organism, organism_batch, organism_labels):
    from mechcliff.probe import MIN_VAL_EXAMPLES, MIN_VAL_PER_CLASS, fit_probe

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probe = fit_probe(organism, organism_batch, organism_labels, layer=2, seed=0)
    assert not [w for w in caught if "held-out examples" in str(w.message)], [str(w.message) for w in caught]
    m = probe.metrics
    assert m["n_val"] == 30 and m["n_val"] >= MIN_VAL_EXAMPLES
    assert min(m["val_class_counts"].values()) >= MIN_VAL_PER_CLASS
    assert m["small_validation"] is False
    low, high = m["val_accuracy_interval"]
    assert low <= m["val_accuracy"] <= high


# ---- item 19: docstrings of the public functions, no citations of unshipped documents -----------------------

PUBLIC_FUNCTIONS = {
    "intervene": "mechcliff.interventions",
    "trace_refusal": "mechcliff.trace",
    "generate_rollouts": "mechcliff.generation",
    "patch_heads": "mechcliff.patching",
    "direct_probe_attribution": "mechcliff.attribution",
    "fit_probe": "mechcliff.probe",
    "ablation_sweep": "mechcliff.sweep",
    "ablation_experiment": "mechcliff.asr",
    "ships_scores": "mechcliff.ships",
    "load_model": "mechcliff.model.loading",
    "encode": "mechcliff.chat",
    "judge_file": "mechcliff.judging",
}


@pytest.mark.unit
@pytest.mark.parametrize("name", sorted(PUBLIC_FUNCTIONS))
def test_public_function_documents_every_parameter(name):
    func = inspect.unwrap(getattr(importlib.import_module(PUBLIC_FUNCTIONS[name]), name))
    doc = inspect.getdoc(func) or ""
    assert "Args:" in doc, f"{name}: the docstring has no 'Args:' list"
    args = doc.split("Args:", 1)[1]
    listed = set()
    for line in args.splitlines():  # "    name: ...", "    name (type): ...", "    a, b: ..." (one level in)
        m = re.match(r"^ {0,4}([`*\w][\w`*, ]*?)(?: \([^)]*\))?:", line)
        if m:
            listed |= set(re.findall(r"\w+", m.group(1)))
    missing = [p for p in inspect.signature(func).parameters if p not in listed]
    assert not missing, f"{name}: the 'Args:' list of its docstring does not describe {missing}"


@pytest.mark.unit
def test_intervene_says_what_gamma_means_in_every_mode():
    from mechcliff.interventions import MODES, intervene

    doc = inspect.getdoc(inspect.unwrap(intervene))
    gamma = doc.split("gamma", 1)[1]
    for mode in MODES:
        assert f"``{mode}``" in gamma, f"intervene's docstring does not say what gamma means for mode {mode!r}"


#: Texts (matched case-insensitively) that cite documents outside the repository: the design notes and the research
#: spec ("the reference") of the project's shared folder. A paper is cited by its arXiv id with the paper's own
#: figure / table / equation numbers; the "§" numbers in the package came from the spec's numbering, so "§" is not
#: used for citations at all.
UNSHIPPED = ("§", "our spec", "of the spec", "design.md", "papers.md", "reference/", "anchors.md", "environment.md",
             "reference section", "in the reference", "from the reference", "the reference's")


def _sources() -> list[Path]:
    return sorted((ROOT / "mechcliff").rglob("*.py")) + [ROOT / "README.md"]


@pytest.mark.unit
def test_no_citation_of_unshipped_documents():
    hits = []
    for path in _sources():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for pat in UNSHIPPED:
                if pat in line.lower():
                    hits.append(f"{path.relative_to(ROOT)}:{n}: {pat!r}: {line.strip()[:100]}")
    assert not hits, "cite a paper (arXiv id, its figure / table / equation) or a file of the repository:\n" + \
        "\n".join(hits)
