"""User mistakes end as one clear :class:`~mechcliff.errors.MechcliffError` line, fast (issue 16, items 5, 6, 9-11).

Each test goes through the public API (``import mechcliff as mc``, ``load_model``, ``Result.load``) or the command
line (``mechcliff.cli.main``), as a user would.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import mechcliff
from mechcliff.errors import MechcliffError

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_ADAPTER = ROOT / "mechcliff" / "resources" / "smollm2_refusal_organism"


def _one_clean_line(message: str, limit: int = 300) -> None:
    assert "\n" not in message.strip(), f"more than one line:\n{message}"
    assert len(message) < limit, f"{len(message)} characters: {message}"
    assert "Traceback" not in message


def _assert_cli_error(rc: int, capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("mechcliff: error: "), err
    _one_clean_line(err)
    for needle in needles:
        assert needle in err, err
    return err


# ---- item 5: every saved result loads through Result.load --------------------------------------------------------


def _all_result_subclasses() -> list[type]:
    """Every Result subclass defined in the mechcliff package, found by importing every module of it."""
    from mechcliff.results import Result

    for info in pkgutil.walk_packages(mechcliff.__path__, "mechcliff."):
        if info.name.rsplit(".", 1)[-1] != "__main__":  # __main__ runs the command line
            importlib.import_module(info.name)
    found, todo = [], list(Result.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls.__module__.split(".")[0] == "mechcliff":  # not the test suites' own subclasses
            found.append(cls)
    return found


@pytest.mark.unit
def test_every_result_subclass_is_in_the_kind_table():
    from mechcliff.results import KINDS, result_class

    classes = _all_result_subclasses()
    assert len(classes) >= 18
    by_kind: dict[str, list[str]] = {}
    for cls in classes:
        by_kind.setdefault(cls.KIND, []).append(f"{cls.__module__}:{cls.__qualname__}")
    assert all(len(v) == 1 for v in by_kind.values()), f"a KIND used twice: {by_kind}"
    missing = {k: v[0] for k, v in by_kind.items() if KINDS.get(k) != v[0]}
    assert not missing, f"add these to mechcliff.results.KINDS: {missing}"
    stale = sorted(set(KINDS) - set(by_kind))
    assert not stale, f"mechcliff.results.KINDS names kinds no class defines: {stale}"
    for kind, cls in ((c.KIND, c) for c in classes):
        assert result_class(kind) is cls


@pytest.mark.unit
def test_result_load_in_a_fresh_interpreter_imports_the_kind_module(tmp_path):
    """The issue: ``Result.load("runs/demo/attribution")`` in a fresh interpreter raised ``TypeError``."""
    from mechcliff.patching import PatchingResult
    from mechcliff.sweep import AblationSweepResult

    AblationSweepResult(cells=[], baseline={"asr": 0.25}, judge="refusal", model_id="m").save(tmp_path / "sweep")
    PatchingResult(per_example=np.zeros((2, 1, 3)), target=np.zeros(2), source=np.ones(2),
                   metric="probe_logit").save(tmp_path / "patch")
    code = (
        "import sys\n"
        "from mechcliff.results import Result\n"
        "assert 'mechcliff.sweep' not in sys.modules and 'mechcliff.patching' not in sys.modules\n"
        f"s = Result.load({str(tmp_path / 'sweep')!r})\n"
        f"p = Result.load({str(tmp_path / 'patch')!r})\n"
        "print(type(s).__module__, type(s).__name__, s.baseline['asr'], type(p).__name__, p.per_example.shape)\n"
    )
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["mechcliff.sweep", "AblationSweepResult", "0.25", "PatchingResult", "(2,", "1,", "3)"]
    assert time.perf_counter() - t0 < 60


@pytest.mark.unit
def test_result_load_of_unknown_kind_or_a_probe_says_so(tmp_path):
    from mechcliff.results import Result

    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "result.json").write_text(json.dumps({"kind": "no_such_kind", "format_version": 1,
                                                              "fields": {"x": 1}, "arrays": []}))
    with pytest.raises(MechcliffError, match="'no_such_kind'.*known kinds.*head_attribution") as exc:
        Result.load(tmp_path / "odd")
    _one_clean_line(str(exc.value), 600)
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "probe.json").write_text("{}")
    with pytest.raises(MechcliffError, match="probe.json is not a loadable mechcliff probe"):
        Result.load(tmp_path / "probe")


@pytest.mark.unit
def test_result_load_with_fields_of_another_version_is_a_clean_error(tmp_path):
    from mechcliff.results import Result
    from mechcliff.sweep import AblationSweepResult

    AblationSweepResult(cells=[], baseline={"asr": 0.0}).save(tmp_path / "s")
    doc = json.loads((tmp_path / "s" / "result.json").read_text())
    doc["fields"]["added_later"] = 1
    (tmp_path / "s" / "result.json").write_text(json.dumps(doc))
    with pytest.raises(MechcliffError, match="added_later"):
        Result.load(tmp_path / "s")


# ---- item 6: an HF folder without a tokenizer ----------------------------------------------------------------------


@pytest.fixture()
def folder_without_tokenizer(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    folder = tmp_path / "no-tokenizer"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    assert (folder / "config.json").exists() and not (folder / "tokenizer.json").exists()
    return folder


@pytest.mark.organism
def test_hf_folder_without_tokenizer_api(folder_without_tokenizer):
    from mechcliff import load_model

    with pytest.raises(MechcliffError, match="has no tokenizer") as exc:
        load_model(folder_without_tokenizer)
    msg = str(exc.value)
    _one_clean_line(msg)
    assert str(folder_without_tokenizer) in msg and "tokenizer.json" in msg and "tokenizer_config.json" in msg


@pytest.mark.organism
def test_hf_folder_without_tokenizer_cli(folder_without_tokenizer, capsys):
    from mechcliff.cli import main

    rc = main(["check", str(folder_without_tokenizer)])
    _assert_cli_error(rc, capsys, "has no tokenizer", str(folder_without_tokenizer))


# ---- item 9: metric names and metric objects in patching -----------------------------------------------------------


@pytest.mark.unit
def test_top_level_exports():
    import mechcliff as mc
    from mechcliff import patching, ships, sweep

    assert mc.patch_heads is patching.patch_heads
    assert mc.patch_positions is patching.patch_positions
    assert mc.ablation_sweep is sweep.ablation_sweep
    assert mc.ships_scores is ships.ships_scores
    assert mc.ProbeMetric is patching.ProbeMetric
    assert mc.LogitDiffMetric is patching.LogitDiffMetric
    assert mc.RefusalLogOddsMetric is patching.RefusalLogOddsMetric
    assert {"patch_heads", "patch_positions", "ablation_sweep", "ships_scores", "ProbeMetric"} <= set(mc.__all__)


@pytest.fixture(scope="module")
def pair(organism):
    from mechcliff.chat import encode

    target = encode(organism, ["how do i bake bread", "explain the sky"], thinking=["the user asks", "ok"])
    source = encode(organism, ["explain the sky", "how do i bake bread"], thinking=["ok", "the user asks"])
    return target, source


@pytest.fixture(scope="module")
def probe(organism):
    from mechcliff.probe import LinearProbe

    w = np.random.default_rng(0).standard_normal(organism.d_model) * 0.01
    return LinearProbe(w=w, b=0.1, layer=1, model_id=organism.model_id, model_hash=organism.model_hash)


@pytest.mark.organism
def test_patch_heads_with_a_metric_name(organism, pair):
    import mechcliff as mc

    target, source = pair
    with pytest.raises(MechcliffError, match=r"metric 'probe' needs a probe: pass ProbeMetric\(probe\)") as exc:
        mc.patch_heads(organism, target, source, "probe")
    _one_clean_line(str(exc.value))
    with pytest.raises(MechcliffError, match=r"LogitDiffMetric\(token_a, token_b\)"):
        mc.patch_heads(organism, target, source, "logit_diff")
    with pytest.raises(MechcliffError, match=r"RefusalLogOddsMetric\(refusal_token_ids\)"):
        mc.patch_positions(organism, target, source, "refusal_log_odds")
    with pytest.raises(MechcliffError, match="unknown metric 'kl'.*ProbeMetric.*LogitDiffMetric.*RefusalLogOddsMetric"):
        mc.patch_heads(organism, target, source, "kl")


@pytest.mark.organism
def test_patch_heads_with_a_bad_metric_object(organism, pair):
    import mechcliff as mc

    target, source = pair
    with pytest.raises(MechcliffError, match=r"pass an instance.*LogitDiffMetric\(token_a, token_b\)"):
        mc.patch_heads(organism, target, source, mc.LogitDiffMetric)
    with pytest.raises(MechcliffError, match="int has no .*stop_at_layer.*hooks.*from_logits") as exc:
        mc.patch_heads(organism, target, source, 3)
    _one_clean_line(str(exc.value), 500)

    class Half:
        name = "half"

        def stop_at_layer(self, handle):
            return None

    with pytest.raises(MechcliffError, match="Half has no hooks, from_logits"):
        mc.patch_positions(organism, target, source, Half())


@pytest.mark.organism
def test_patch_heads_accepts_a_probe_for_its_metric(organism, pair, probe):
    import mechcliff as mc

    target, source = pair
    heads = ["L0H0", "L0H1"]
    by_probe = mc.patch_heads(organism, target, source, probe, heads=heads)
    by_metric = mc.patch_heads(organism, target, source, mc.ProbeMetric(probe), heads=heads)
    assert by_probe.metric == by_metric.metric == "probe_logit"
    np.testing.assert_allclose(by_probe.per_example, by_metric.per_example)


# ---- item 10: an adapter of another model ----------------------------------------------------------------------------


@pytest.mark.organism
def test_adapter_of_another_model_api():
    from mechcliff import load_model

    t0 = time.perf_counter()
    with pytest.raises(MechcliffError) as exc:
        load_model("organism", adapter=SMOLLM2_ADAPTER)
    assert time.perf_counter() - t0 < 10
    msg = str(exc.value)
    _one_clean_line(msg)
    assert "smollm2-135m-instruct" in msg and "576" in msg and "96" in msg, msg


@pytest.mark.organism
def test_adapter_of_another_model_cli(capsys):
    from mechcliff.cli import main

    rc = main(["check", "organism", "--adapter", str(SMOLLM2_ADAPTER)])
    _assert_cli_error(rc, capsys, "576", "96", "smollm2-135m-instruct")


# ---- item 11: a typo in a built-in name ----------------------------------------------------------------------------


@pytest.mark.unit
def test_typo_in_builtin_name_fails_fast_with_a_suggestion(monkeypatch):
    from transformers.utils import logging  # noqa: F401 - imported by every load; time the decision, not the import

    from mechcliff import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(MechcliffError, match="did you mean 'organism'") as exc:
        load_model("organsim")
    assert time.perf_counter() - t0 < 2
    _one_clean_line(str(exc.value), 400)
    with pytest.raises(MechcliffError, match="did you mean 'smollm2-135m-instruct'"):
        load_model("smollm2-135m-instruc")


@pytest.mark.unit
def test_typo_without_network_fails_fast(monkeypatch):
    """Not marked offline, but the hub cannot be reached: no minute of retries either."""
    from transformers.utils import logging  # noqa: F401

    from mechcliff.model import loading

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(loading, "_hub_reachable", lambda timeout=2.0: False)
    t0 = time.perf_counter()
    with pytest.raises(MechcliffError, match="did you mean 'organism'.*cannot reach the Hugging Face hub"):
        loading.load_model("organsim")
    assert time.perf_counter() - t0 < 2


@pytest.mark.unit
def test_typo_cli(capsys):
    from mechcliff.cli import main

    rc = main(["check", "organsim"])
    _assert_cli_error(rc, capsys, "did you mean 'organism'")


@pytest.mark.unit
def test_hub_probe_gives_up_within_its_timeout(monkeypatch):
    """A hub that accepts the connection and never answers, or refuses it: the probe says so within its timeout."""
    import socket

    from mechcliff.model import loading

    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # the kernel completes the handshake; nobody ever reads or answers
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        t0 = time.perf_counter()
        assert loading._hub_reachable(timeout=0.5) is False
        assert time.perf_counter() - t0 < 1.5
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound but not listening: connections are refused
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        assert loading._hub_reachable(timeout=0.5) is False


@pytest.mark.unit
def test_hub_probe_counts_any_http_answer(monkeypatch):
    import http.server
    import threading

    from mechcliff.model import loading

    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # answers 501
    threading.Thread(target=server.handle_request, daemon=True).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        assert loading._hub_reachable(timeout=2.0) is True
    finally:
        server.server_close()
