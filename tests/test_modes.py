"""Thinking on vs off (mechcliff.modes): compare_modes on the organism, the no-thinking formats, bad input, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mechcliff.errors import MechcliffError
from mechcliff.modes import MODES, ModeComparison, check_no_think_format, compare_modes, thinking_switch

pytestmark = pytest.mark.organism

N = 6


@pytest.fixture(scope="module")
def prompts():
    from mechcliff.data import builtin_prompts

    harmful = builtin_prompts("harmful")[:N] + builtin_prompts("harmful_jailbreak")[:N]
    return harmful, builtin_prompts("harmless")[:N]


@pytest.fixture(scope="module")
def comparison(organism, prompts):
    """compare_modes with the probe fitted on the thinking-on rollouts (as the pipeline does)."""
    return compare_modes(organism, *prompts, progress=False, batch_size=64)


@pytest.fixture(scope="module")
def no_switch():
    """The organism with a chat template that ignores enable_thinking."""
    from mechcliff.model.loading import load_model
    from mechcliff.model.organism import CHAT_TEMPLATE, build_organism

    hf, tok, _ = build_organism()
    tok.chat_template = CHAT_TEMPLATE.split("{% if enable_thinking")[0] + "{% endif %}"
    return load_model(model=hf, tokenizer=tok, name="organism-no-switch")


def test_counts_and_invariants(comparison, prompts):
    harmful, harmless = prompts
    res = comparison
    n = len(harmful) + len(harmless)
    assert len(res) == n and res.refused.shape == (2, n) and res.final.shape == (2, n)
    summ = res.summary()
    assert list(summ) == list(MODES)
    for mode, groups in summ.items():
        parts = [g for g in groups if g != "all_harmful"]
        assert sum(groups[g]["n"] for g in parts) == n
        assert groups["all_harmful"]["n"] == len(harmful)
        assert groups["all_harmful"]["refusal"]["k"] == sum(groups[g]["refusal"]["k"] for g in parts if g != "harmless")
        assert "asr" not in groups["harmless"]
        for g, r in groups.items():
            for rate in [r["refusal"], r["probe_refusal"]] + ([r["asr"]] if "asr" in r else []):
                assert rate["low"] <= rate["rate"] <= rate["high"]
            if "asr" in r:
                assert r["asr"]["k"] + r["refusal"]["k"] == r["n"]
    assert np.all((res.final >= 0) & (res.final <= 1))


def test_undefined_without_thinking_is_reported_as_undefined(comparison):
    res = comparison
    assert np.all(np.isnan(res.plateau[1])) and np.all(np.isnan(res.ms[1])) and np.all(res.thinking_tokens[1] == 0)
    assert np.all(np.isfinite(res.ms[0])) and np.all(res.thinking_tokens[0] > 0)
    for g, r in res.summary()["no_thinking"].items():
        assert r["ms"] is None and r["plateau"] is None and r["final"] is not None
    for r in res.rollouts["no_thinking"]:
        assert r.thinking is None and r.meta["mode"] == "no_thinking"
    # the organism: the cliff only exists with thinking; both modes see </think>, so behaviour is the same
    s = res.summary()
    assert s["thinking"]["harmful_jailbreak"]["ms"] > 0.5
    assert s["thinking"]["harmful"]["refusal"]["rate"] == 1.0 and s["no_thinking"]["harmful"]["refusal"]["rate"] == 1.0
    assert s["thinking"]["harmless"]["refusal"]["rate"] == 0.0


def test_given_probe_is_used(organism, organism_probe, prompts):
    harmful, harmless = prompts
    res = compare_modes(organism, harmful[:3], harmless[:3], organism_probe, progress=False, max_answer_tokens=4)
    assert not res.probe_fitted and res.probe is organism_probe and res.probe_layer == organism_probe.layer


def test_save_load_round_trip(comparison, tmp_path):
    from mechcliff.figures import load_saved

    comparison.save(tmp_path / "mc")
    back = load_saved(tmp_path / "mc")
    assert isinstance(back, ModeComparison)
    for name in ("refused", "final", "plateau", "ms", "thinking_tokens"):
        np.testing.assert_array_equal(getattr(back, name), getattr(comparison, name))
    assert back.summary() == comparison.summary() and back.groups == comparison.groups
    assert json.loads((tmp_path / "mc" / "result.json").read_text())["kind"] == "mode_comparison"


def test_figure_puts_the_modes_side_by_side(comparison):
    fig = comparison.plot()
    bars = [t for t in fig.data if t.type == "bar"]
    assert {t.legendgroup for t in bars} == set(MODES) and len(bars) == 4  # 2 panels x 2 modes
    assert {t.xaxis for t in bars} == {"x", "x2"}
    plateau = [t for t in fig.data if t.type == "scatter"]
    assert plateau[1].y is None or all(v is None for v in plateau[1].y)  # no plateau without thinking
    assert fig.layout.title.text and fig.layout.yaxis.title.text and fig.layout.yaxis2.title.text


def test_template_without_thinking_switch_is_a_clear_error(no_switch, organism, prompts):
    assert thinking_switch(organism) and not thinking_switch(no_switch)
    with pytest.raises(MechcliffError, match="no thinking switch.*empty_block"):
        compare_modes(no_switch, *prompts, progress=False)
    with pytest.raises(MechcliffError, match="no_think_format must be one of"):
        check_no_think_format(organism, "off")


@pytest.mark.parametrize("fmt", ["empty_block", "omit"])
def test_other_no_thinking_formats(no_switch, prompts, fmt):
    from mechcliff.modes import encode_mode

    harmful, harmless = prompts
    res = compare_modes(no_switch, harmful[:4], harmless[:4], no_think_format=fmt, label_source="dataset",
                        progress=False, max_answer_tokens=4)
    off = res.rollouts["no_thinking"]
    assert all(r.thinking == ("" if fmt == "empty_block" else None) for r in off)
    batch = encode_mode(no_switch, off, thinking=False, no_think_format=fmt)
    tok = no_switch.tokenizer
    before = [tok.convert_ids_to_tokens(batch.tokens[i, :batch.spans[i]["answer"][0]].tolist()) for i in range(len(batch))]
    assert all(("<think>" in t) == (fmt == "empty_block") for t in before)  # (the organism may write one itself)
    te, a0 = batch.position("think_end"), batch.position("answer_start")
    assert all(int(a) == int(e) + 1 for a, e in zip(a0, te) if a >= 0)  # final = the token before the answer
    assert np.all(np.isnan(res.ms[1])) and np.all(np.isfinite(res.final[1]))


def test_cli_compare_modes(tmp_path, capsys):
    from mechcliff.cli import main

    out = tmp_path / "modes"
    rc = main(["compare-modes", "--model", "organism", "--out", str(out), "--n", "4", "--no-progress",
               "--max-answer-tokens", "6"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    for p in ("mode_comparison/result.json", "mode_comparison.html", "trace_thinking/result.json",
              "trace_no_thinking/result.json", "rollouts/thinking.jsonl", "rollouts/no_thinking.jsonl",
              "probe/result.json", "summary.json"):
        assert (out / p).exists(), p
    assert "figure: " in captured.out and "MS n/a" in captured.out
    doc = json.loads((out / "summary.json").read_text())
    assert doc["modes"]["no_thinking"]["harmless"]["ms"] is None
    rc = main(["compare-modes", "--model", "organism", "--out", str(out), "--n", "0"])
    assert rc == 2 and "--n must be at least 1" in capsys.readouterr().err
