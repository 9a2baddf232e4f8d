"""Rollouts from anywhere: mechcliff.rollout_import (vLLM, OpenAI chat completions, HF datasets, mechcliff, STAR-1),
the aliases of load_rollouts, `mechcliff import-rollouts` and `mechcliff run --rollouts`.

Content warning: the STAR-1 questions (../shared/data/rollouts/star1.json) are requests for harmful content; its
responses refuse or answer safely.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from mechcliff.data import Rollout, load_rollouts
from mechcliff.errors import MechcliffError
from mechcliff.rollout_import import detect_format, import_rollouts

STAR1 = Path(__file__).resolve().parents[2] / "shared" / "data" / "rollouts" / "star1.json"
needs_star1 = pytest.mark.skipif(not STAR1.is_file(), reason=f"STAR-1 is not at {STAR1} (../shared is absent)")


def _jsonl(tmp_path: Path, name: str, rows: list) -> Path:
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return p


# --------------------------------------------------------------------------- load_rollouts aliases


@pytest.mark.unit
def test_load_rollouts_accepts_answer_and_reasoning_aliases(tmp_path):
    p = _jsonl(tmp_path, "r.jsonl", [
        {"prompt": "q1", "thinking": "plan", "answer": "Sure."},
        {"prompt": "q2", "reasoning": "weigh it", "answer": "No."},
        {"prompt": "q3", "reasoning_content": "rc", "response": "ok", "id": 7},
        {"prompt": "q4", "answer": "<think>raw</think>\n\nDone."},
        {"prompt": "q5", "thinking": "t", "response": "r", "answer": "kept in meta"},
    ])
    a, b, c, d, e = load_rollouts(p)
    assert (a.thinking, a.response, a.meta) == ("plan", "Sure.", {})
    assert (b.thinking, b.response) == ("weigh it", "No.")
    assert (c.thinking, c.response, c.id) == ("rc", "ok", "7")
    assert (d.thinking, d.response, d.has_think_close) == ("raw", "Done.", True)
    assert e.response == "r" and e.meta == {"answer": "kept in meta"}


@pytest.mark.unit
def test_load_rollouts_errors_unchanged_and_alias_type_named(tmp_path):
    with pytest.raises(MechcliffError, match=r"r\.jsonl:1: record 0: rollout is missing the 'response' field"):
        load_rollouts(_jsonl(tmp_path, "r.jsonl", [{"prompt": "x"}]))
    with pytest.raises(MechcliffError, match="'answer' must be a string"):
        load_rollouts(_jsonl(tmp_path, "s.jsonl", [{"prompt": "x", "answer": 3}]))


# --------------------------------------------------------------------------- each format


@pytest.mark.unit
def test_vllm_outputs_text_templates_and_prefilled_think(tmp_path):
    raw = "<｜begin▁of▁sentence｜><｜User｜>How do I bake bread?<｜Assistant｜><think>\n"
    p = _jsonl(tmp_path, "v.jsonl", [
        {"prompt": raw, "outputs": [{"text": "Knead it.\n</think>\n\nBake at 220C.", "finish_reason": "stop"},
                                     {"text": "still thinking and out of tokens", "finish_reason": "length"}],
         "id": "a"},
        {"prompt": "Plain prompt", "text": "<think>x</think>y"},
        {"prompt": "No tags", "text": "just an answer"},
    ])
    imp = import_rollouts(p, group="harmless")
    a0, a1, b, c = imp.rollouts
    assert imp.report.formats == {"vllm": 3} and not imp.report.skipped
    assert (a0.prompt, a0.thinking, a0.response, a0.has_think_close) == ("How do I bake bread?", "Knead it.",
                                                                        "Bake at 220C.", True)
    assert a0.meta["raw_prompt"] == raw and a0.meta["output"]["finish_reason"] == "stop" and a0.id == "a-0"
    assert (a1.thinking, a1.response, a1.has_think_close, a1.id) == ("still thinking and out of tokens", "", False, "a-1")
    assert (b.thinking, b.response, b.has_think_close) == ("x", "y", True)
    assert (c.thinking, c.response) == (None, "just an answer")
    assert imp.report.thinking == {"closed": 2, "unclosed": 1, "none": 1}
    assert {r.group for r in imp.rollouts} == {"harmless"}


@pytest.mark.unit
def test_openai_chat_completions_reasoning_content_and_inline_tags(tmp_path):
    req = {"model": "m", "messages": [{"role": "system", "content": "Be safe."},
                                      {"role": "user", "content": "Make a bomb"}]}
    rows = [
        {"request": req, "response": {"id": "c1", "choices": [{"message": {
            "role": "assistant", "content": "I can't help with that.", "reasoning_content": "This is dangerous."},
            "finish_reason": "stop"}]}},
        {"messages": req["messages"], "choices": [{"message": {"content": [{"type": "text", "text": "<think>hm"}]},
                                                   "finish_reason": "length"}]},
        {"custom_id": "x", "response": {"body": {"choices": [{"message": {"content": "a</think>b"}}]}},
         "request": {"body": req}},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello",
                                                            "reasoning": "greet back"}]},
    ]
    imp = import_rollouts(_jsonl(tmp_path, "o.jsonl", rows), format="openai", group="harmful")
    a, b, c, d = imp.rollouts
    assert (a.prompt, a.thinking, a.response, a.has_think_close) == ("Make a bomb", "This is dangerous.",
                                                                    "I can't help with that.", True)
    assert a.meta["system"] == "Be safe." and a.meta["response_meta"]["id"] == "c1" and a.meta["request_meta"]["model"] == "m"
    assert (b.thinking, b.response, b.has_think_close) == ("hm", "", False)
    assert (c.thinking, c.response, c.meta["custom_id"]) == ("a", "b", "x")
    assert (d.prompt, d.thinking, d.response) == ("hi", "greet back", "hello")


@pytest.mark.unit
def test_hf_datasets_style(tmp_path):
    p = _jsonl(tmp_path, "h.jsonl", [
        {"question": "2+2?", "completion": "<think>add</think> 4", "label": 0, "split": "train"},
        {"instruction": "Summarise", "input": "a long text", "output": "short", "category": "nlp"},
        {"prompt": "p", "completion": "done", "reasoning": "r"},
    ])
    a, b, c = import_rollouts(p, format="hf").rollouts
    assert (a.prompt, a.thinking, a.response, a.label, a.meta["split"]) == ("2+2?", "add", "4", 0, "train")
    assert (b.prompt, b.response, b.category, b.thinking) == ("Summarise\n\na long text", "short", "nlp", None)
    assert (c.thinking, c.response) == ("r", "done")
    assert [detect_format(json.loads(line)) for line in p.read_text().splitlines()] == ["hf", "hf", "hf"]


@pytest.mark.unit
def test_mechcliff_format_roundtrips(tmp_path):
    from mechcliff.data import save_rollouts

    rs = [Rollout("p", "t", "a", category="c", label=1, group="harmful", id="i", meta={"seed": 1}),
          Rollout("q", "never closed", "", has_think_close=False, group="harmless")]
    save_rollouts(rs, tmp_path / "m.jsonl")
    imp = import_rollouts(tmp_path / "m.jsonl")
    assert imp.report.formats == {"mechcliff": 2}
    for r, orig in zip(imp.rollouts, rs):
        assert r.meta.pop("import")["format"] == "mechcliff"
        assert r == orig


@pytest.mark.unit
def test_malformed_records_are_reported_by_line_never_dropped(tmp_path):
    p = _jsonl(tmp_path, "bad.jsonl", [
        {"prompt": "ok", "response": "fine"},
        "{not json",
        "",
        {"prompt": "", "text": "empty prompt"},
        {"foo": 1},
        [1, 2],
        {"prompt": "ok2", "outputs": []},
        {"prompt": "ok3", "response": "fine"},
    ])
    imp = import_rollouts(p, group="harmful")
    rep = imp.report
    assert [r.prompt for r in imp.rollouts] == ["ok", "ok3"]
    assert [(s.record, s.line) for s in rep.skipped] == [(1, 2), (2, 4), (3, 5), (4, 6), (5, 7)]
    assert rep.n_records == rep.n_imported + len(rep.skipped) == 7
    reasons = [s.reason for s in rep.skipped]
    assert "invalid JSON" in reasons[0] and "'prompt' is empty" in reasons[1]
    assert "no known rollout format" in reasons[2] and "JSON object" in reasons[3] and "'outputs'" in reasons[4]
    assert json.loads(json.dumps(rep.to_dict()))["n_skipped"] == 5
    with pytest.raises(MechcliffError, match=r"no rollouts could be imported .*record 0 \(line 1\)"):
        import_rollouts(_jsonl(tmp_path, "none.jsonl", [{"foo": 1}]))
    (tmp_path / "list.json").write_text('[\n{"prompt": "a", "response": "b"},\n{"x": 1}\n]')
    assert [(s.record, s.line) for s in import_rollouts(tmp_path / "list.json").report.skipped] == [(1, 3)]


# --------------------------------------------------------------------------- STAR-1


@pytest.mark.unit
@needs_star1
def test_star1_imports_every_record_split_exactly_at_think_close():
    records = json.loads(STAR1.read_text(encoding="utf-8"))
    t0 = time.perf_counter()
    imp = import_rollouts(STAR1)
    seconds = time.perf_counter() - t0
    assert len(records) == 1000 and imp.report.n_imported == 1000 and not imp.report.skipped
    assert imp.report.formats == {"star1": 1000} and imp.report.groups == {"harmful": 1000}
    assert imp.report.thinking == {"closed": 1000, "unclosed": 0, "none": 0}
    for rec, r in zip(records, imp.rollouts):
        # the invariant: DeepSeek-R1's format exactly, opener + thinking + closer + answer == response
        assert r.thinking is not None
        assert "<think>\n" + r.thinking + "\n</think>\n\n" + r.response == rec["response"]
        assert "</think>" not in r.thinking and r.has_think_close
        assert (r.id, r.prompt, r.category, r.meta["categories"]) == (rec["id"], rec["question"], rec["category"][0],
                                                                      rec["category"])
        assert r.meta["source"] == rec["source"] and r.meta["score"] == rec["score"]
    assert seconds < 10


@pytest.mark.organism
@needs_star1
def test_star1_spans_encode_the_thinking_and_answer_on_the_organism(organism):
    """The organism's vocabulary is word-level (unknown words are <unk>), so spans cannot decode to the text itself;
    what holds is that each span's tokens are exactly the tokenizer's own encoding of that text."""
    from mechcliff.generation import encode_rollouts

    rolls = import_rollouts(STAR1, limit=8).rollouts
    batch = encode_rollouts(organism, rolls)
    tok = organism.tokenizer
    for i, r in enumerate(rolls):
        sp = batch.spans[i]
        for name, text in (("thinking", r.thinking), ("answer", r.response), ("prompt", r.prompt)):
            s0, s1 = sp[name]
            want = tok(text, add_special_tokens=False)["input_ids"]
            assert batch.tokens[i, s0:s1].tolist() == want, (i, name)
            assert tok.decode(batch.tokens[i, s0:s1]) == tok.decode(want)
        assert sp["thinking"][1] <= sp["closing"][0] < sp["closing"][1] <= sp["answer"][0]


# --------------------------------------------------------------------------- the commands


@pytest.mark.unit
def test_import_rollouts_command_writes_run_folder(tmp_path, capsys):
    from mechcliff.cli import main

    src = _jsonl(tmp_path, "v.jsonl", [{"prompt": "a", "text": "<think>t</think>x"}, "{oops"])
    out = tmp_path / "run"
    assert main(["import-rollouts", str(src), "--out", str(out), "--group", "harmless"]) == 0
    printed = capsys.readouterr().out
    assert "1 rollouts imported from 2 records" in printed and "skipped record 1 (line 2)" in printed
    assert f"--rollouts harmless={out / 'rollouts' / 'harmless.jsonl'}" in printed
    (r,) = load_rollouts(out / "rollouts" / "harmless.jsonl")
    assert (r.thinking, r.response, r.group) == ("t", "x", "harmless")
    rep = json.loads((out / "import_report.json").read_text())
    assert rep["rollouts"] == {"harmless": str(out / "rollouts" / "harmless.jsonl")}
    assert rep["imports"][0]["skipped"][0]["line"] == 2
    assert main(["import-rollouts", str(src), "--out", str(out), "--group", "harmless"]) == 2  # exists
    assert "already exist" in capsys.readouterr().err
    assert main(["import-rollouts", str(src), "--out", str(out)]) == 2  # no group
    assert "--group" in capsys.readouterr().err


HARMLESS = [{"id": f"h{i}", "prompt": f"How do I bake a {w} cake?",
             "thinking": f"The user wants a {w} cake recipe. That is harmless, so I will explain the steps.",
             "answer": f"Sure! Mix flour, sugar and eggs, add {w}, and bake for 30 minutes."}
            for i, w in enumerate("chocolate lemon carrot banana vanilla apple cherry orange honey coffee almond "
                                  "pumpkin".split())]


@pytest.mark.organism
@needs_star1
def test_import_then_run_on_the_organism_traces_the_real_thinking(tmp_path, organism, capsys):
    from mechcliff.cli import main
    from mechcliff.generation import encode_rollouts
    from mechcliff.trace import RefusalTrace

    out = tmp_path / "run"
    assert main(["import-rollouts", str(STAR1), "--out", str(out), "--limit", "12"]) == 0
    assert main(["import-rollouts", str(_jsonl(tmp_path, "harmless.jsonl", HARMLESS)), "--out", str(out),
                 "--group", "harmless"]) == 0
    printed = capsys.readouterr().out
    files = {g: out / "rollouts" / f"{g}.jsonl" for g in ("harmful", "harmless")}
    assert all(f"--rollouts {g}={f}" in printed for g, f in files.items())
    assert main(["run", "--out", str(out), "--no-progress"]) == 2  # would generate over the imported rollouts
    assert "holds imported rollouts" in capsys.readouterr().err
    flags = [a for g, f in files.items() for a in ("--rollouts", f"{g}={f}")]
    fast = ["--probe-layer", "1", "--n-random-sets", "1", "--max-think-tokens", "4", "--max-answer-tokens", "4"]
    assert main(["run", "--out", str(out), "--no-progress", *flags, *fast]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["cliff"]["groups"]["harmful"]["n"] == 12 and res["cliff"]["groups"]["harmless"]["n"] == 12
    harmful = load_rollouts(files["harmful"])
    records = {r["id"]: r for r in json.loads(STAR1.read_text(encoding="utf-8"))[:12]}
    assert [r.id for r in harmful] == list(records) and all("refused" in r.meta for r in harmful)
    assert all(records[r.id]["response"].endswith(r.response) for r in harmful)  # the real text, not generations
    trace = RefusalTrace.load(out / "trace")
    batch = encode_rollouts(organism, harmful)
    rows = [i for i, g in enumerate(trace.groups) if g == "harmful"]
    assert [trace.ids[i] for i in rows] == [r.id for r in harmful]
    for j, i in enumerate(rows):  # each trace spans the whole real thinking of its rollout
        n_think = batch.spans[j]["thinking"][1] - batch.spans[j]["thinking"][0]
        assert trace.thinking_end[i] - trace.thinking_start[i] == n_think > 100
    # resumed: nothing recomputed
    before = (out / "stages" / "probe.done").stat().st_mtime_ns
    assert main(["run", "--out", str(out), "--no-progress", *flags, *fast]) == 0
    assert (out / "stages" / "probe.done").stat().st_mtime_ns == before
