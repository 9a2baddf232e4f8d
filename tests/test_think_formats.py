"""Think formats other than ``<think>...</think>`` (issue 16, item 14) and prompts longer than the model's context
(item 15).

Tiny random-weight Llama models on the organism's word-level tokenizer, loaded without the conformance check (it
is not what is tested here): one whose tokenizer knows ``<reasoning>`` / ``</reasoning>`` (the custom format), and
one with a context of 64 tokens. Generation is made deterministic by a scripted "bigram" on top of the random
logits (a forward hook adds a large logit to the token that follows the previous one), so the model writes exactly
the text a test needs, through the real ``hf_model.generate`` (stop tokens, KV cache, left padding).
"""

from __future__ import annotations

import contextlib
import inspect

import pytest

from mechcliff.chat import encode
from mechcliff.data import Rollout
from mechcliff.errors import MechcliffError
from mechcliff.model.handle import ThinkFormat

OPEN, CLOSE = "<reasoning>", "</reasoning>"
CUSTOM = {"opener": "<reasoning>\n", "closer": "\n</reasoning> so "}  # a two-token closing template: "</reasoning> so"


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"] if text else []


def _custom_tokenizer():
    from mechcliff.model.organism import build_organism_tokenizer

    tok = build_organism_tokenizer()
    tok.add_tokens([OPEN, CLOSE], special_tokens=True)
    return tok


@pytest.fixture(scope="module")
def custom_tok():
    return _custom_tokenizer()


@pytest.fixture(scope="module")
def reasoning_handle(tiny_hf, custom_tok):
    """A tiny Llama whose think format is ``<reasoning>\\n`` ... ``\\n</reasoning> so `` (given as a dict)."""
    from mechcliff.model.loading import load_model

    return load_model(model=tiny_hf("llama_gqa", custom_tok), tokenizer=custom_tok, name="tiny-reasoning",
                      check=False, think=CUSTOM)


@pytest.fixture(scope="module")
def short_handle(tiny_hf):
    """A tiny Llama with a context of 64 tokens (``max_position_embeddings=64``), default think format."""
    from mechcliff.model.loading import load_model
    from mechcliff.model.organism import build_organism_tokenizer

    tok = build_organism_tokenizer()
    hf = tiny_hf("llama_gqa", tok)
    hf.config.max_position_embeddings = 64
    return load_model(model=hf, tokenizer=tok, name="tiny-ctx64", check=False)


@contextlib.contextmanager
def scripted(handle, follows: dict[str, str]):
    """While active, the model's next token after token ``a`` is ``follows[a]`` (a +1e4 logit on top of its own)."""
    tok = handle.tokenizer
    nxt = {tok.convert_tokens_to_ids(a): tok.convert_tokens_to_ids(b) for a, b in follows.items()}
    last: dict[str, list[int]] = {}

    def pre(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        last["ids"] = ids[:, -1].tolist()

    def post(module, args, kwargs, out):
        for b, t in enumerate(last["ids"]):
            if t in nxt:
                out.logits[b, -1, nxt[t]] += 1e4
        return out

    hooks = [handle.hf_model.register_forward_pre_hook(pre, with_kwargs=True),
             handle.hf_model.register_forward_hook(post, with_kwargs=True)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


# ---- ThinkFormat and presets ----------------------------------------------------------------------------------


@pytest.mark.unit
def test_think_format_derives_its_tags_from_opener_and_closer():
    fmt = ThinkFormat(opener="<reasoning>\n", closer="\n</reasoning>\n\n")
    assert (fmt.open_tag, fmt.close_tag) == ("<reasoning>", "</reasoning>")  # not the default <think> tags
    assert ThinkFormat() == ThinkFormat("<think>\n", "\n</think>\n\n", "</think>", "<think>")
    # earlier formats keep their tags: the first word of the opener / closer
    assert (ThinkFormat(" <think> the ", " </think> ").open_tag, ThinkFormat(" <think> ", " </think> so ").close_tag) == (
        "<think>", "</think>")
    assert ThinkFormat(opener="[THINK]", closer="[/THINK]").close_tag == "[/THINK]"


@pytest.mark.unit
@pytest.mark.parametrize("kwargs, match", [
    (dict(opener="<reasoning>", closer="</reasoning>", close_tag="</think>"), "close_tag"),
    (dict(opener="<reasoning>", closer="</reasoning>", open_tag="<think>"), "open_tag"),
    (dict(opener="  ", closer="</reasoning>"), "opener"),
    (dict(opener="<reasoning>", closer=None), "closer"),
])
def test_think_format_rejects_inconsistent_fields(kwargs, match):
    with pytest.raises(MechcliffError, match=match):
        ThinkFormat(**kwargs)


@pytest.mark.unit
def test_presets_resolve_and_are_consistent():
    from mechcliff.model.handle import THINK_PRESETS, think_format

    assert {"qwen3", "qwq", "deepseek-r1", "magistral", "organism"} <= set(THINK_PRESETS)
    for name in THINK_PRESETS:
        fmt = think_format(name)
        assert fmt.open_tag in fmt.opener and fmt.close_tag in fmt.closer, name
        assert fmt is not THINK_PRESETS[name]  # a copy: editing a handle's format never edits the preset
    assert think_format("Qwen3") == think_format("deepseek_r1") == ThinkFormat()
    assert (think_format("magistral").open_tag, think_format("magistral").close_tag) == ("[THINK]", "[/THINK]")
    assert think_format("organism") == ThinkFormat(" <think> ", " </think> ")
    assert think_format({"opener": "<reasoning>", "closer": "</reasoning>"}).close_tag == "</reasoning>"
    own = ThinkFormat("<r>", "</r>")
    assert think_format(own) == own and think_format(own) is not own
    with pytest.raises(MechcliffError, match=r"unknown think format 'qwen'.*did you mean 'qwen3'"):
        think_format("qwen")
    with pytest.raises(MechcliffError, match="unknown ThinkFormat field.*'closing'"):
        think_format({"opener": "<r>", "closing": "</r>"})
    with pytest.raises(MechcliffError, match="think format"):
        think_format(3)


@pytest.mark.organism
def test_load_model_think_option(tiny_hf, custom_tok, organism, reasoning_handle):
    from mechcliff.model.loading import load_model

    assert organism.think == ThinkFormat(" <think> ", " </think> ")  # think="auto": today's choice per model
    assert organism.describe()["think_format"]["preset"] == "auto"
    h = load_model(model=tiny_hf("qwen3", custom_tok), tokenizer=custom_tok, name="tiny-magistral", check=False,
                   think="magistral")
    assert (h.think.opener, h.think.closer, h.think.close_tag) == ("[THINK]", "[/THINK]", "[/THINK]")
    assert h.describe()["think_format"] == {"preset": "magistral", "opener": "[THINK]", "closer": "[/THINK]",
                                            "close_tag": "[/THINK]", "open_tag": "[THINK]"}
    assert (reasoning_handle.think.open_tag, reasoning_handle.think.close_tag) == (OPEN, CLOSE)
    assert reasoning_handle.describe()["think_format"]["preset"] == "custom"
    with pytest.raises(MechcliffError, match="unknown think format 'reasonning'"):
        load_model(model=tiny_hf("qwen3", custom_tok), tokenizer=custom_tok, check=False, think="reasonning")


# ---- encode ---------------------------------------------------------------------------------------------------


@pytest.mark.organism
def test_encode_custom_format_is_token_exact(reasoning_handle):
    h = reasoning_handle
    tok = h.tokenizer
    thinking = ["the user asks for something harmless", "the user asks for something harmful", None]
    answers = ["sure here", "sorry i cannot help", "sure"]
    prompts = ["how do i bake bread at home", "write a story about a bomb", "give me one recipe"]
    b = encode(h, prompts, thinking=thinking, answers=answers)
    pos = {a: b.position(a).tolist() for a in ("think_end", "think_close", "prompt_end", "answer_start")}
    for i in range(3):
        sp = b.spans[i]
        seg = {k: b.tokens[i, s:e].tolist() for k, (s, e) in sp.items()}
        assert seg["answer"] == _ids(tok, answers[i])
        if thinking[i] is None:
            assert seg["thinking"] == seg["closing"] == []
            assert pos["think_end"][i] == pos["prompt_end"][i]
            continue
        assert seg["thinking"] == _ids(tok, thinking[i]) and tok.decode(seg["thinking"]) == thinking[i]
        assert b.tokens[i, sp["prefix"][1]:sp["thinking"][0]].tolist() == _ids(tok, "<reasoning>\n") == [
            tok.convert_tokens_to_ids(OPEN)]
        assert seg["closing"] == _ids(tok, CUSTOM["closer"]) == tok.convert_tokens_to_ids([CLOSE, "so"])
        # think_close at the close tag, think_end at the LAST token of the closing template, right before the answer
        assert b.tokens[i, pos["think_close"][i]].item() == tok.convert_tokens_to_ids(CLOSE)
        assert pos["think_end"][i] == sp["closing"][1] - 1 == pos["answer_start"][i] - 1
        assert b.tokens[i, pos["think_end"][i]].item() == tok.convert_tokens_to_ids("so")
    # a thinking that never closed: no closing template, no think_end
    u = encode(h, prompts[:1], thinking=thinking[:1], has_think_close=[False])
    assert u.spans[0]["closing"][0] == u.spans[0]["closing"][1] and u.position("think_end").tolist() == [-1]


@pytest.mark.organism
def test_encode_with_a_template_that_writes_the_custom_tags(reasoning_handle):
    """A template whose generation prompt opens the thinking itself (as R1 distills and QwQ do with ``<think>\\n``)
    gets no second opener; one that writes an empty closed block (thinking off) ends the prompt at its close tag."""
    import copy

    h = copy.copy(reasoning_handle)
    h.tokenizer = copy.copy(reasoning_handle.tokenizer)
    tok = h.tokenizer
    tok.chat_template = tok.chat_template.replace(
        "{% if enable_thinking is defined and not enable_thinking %} <think> </think>{% endif %}",
        "{% if enable_thinking is defined and not enable_thinking %} <reasoning> </reasoning>{% else %} <reasoning>"
        "{% endif %}")
    b = encode(h, ["how do i bake bread"], thinking=["the user asks"], answers=["sure"])
    sp = b.spans[0]
    assert b.tokens[0, sp["prefix"][1] - 1].item() == tok.convert_tokens_to_ids(OPEN)  # the template's opener
    assert sp["thinking"][0] == sp["prefix"][1]  # ... and none of ours
    assert b.tokens[0, sp["closing"][0]:sp["closing"][1]].tolist() == tok.convert_tokens_to_ids([CLOSE, "so"])
    off = encode(h, ["how do i bake bread"], answers=["sure"], enable_thinking=False)
    end = off.position("think_end").item()
    assert off.tokens[0, end].item() == tok.convert_tokens_to_ids(CLOSE) and end == off.spans[0]["prefix"][1] - 1


# ---- generation and judging -----------------------------------------------------------------------------------

# thinking: <reasoning> -> the -> user -> </reasoning> (stop); answer after the closing "... so": sure <reasoning>
# the user </reasoning> sure <reasoning> ... (think tags written into the answer).
SCRIPT = {OPEN: "the", "the": "user", "user": CLOSE, CLOSE: "so", "so": "sure", "sure": OPEN}


@pytest.mark.organism
def test_generate_rollouts_splits_at_the_custom_close_tag(reasoning_handle):
    from mechcliff.generation import encode_rollouts, generate_rollouts

    h = reasoning_handle
    with scripted(h, SCRIPT):
        rolls = generate_rollouts(h, ["how do i bake bread at home", "give me one recipe"], max_think_tokens=12,
                                  max_answer_tokens=9, progress=False)
    for r in rolls:
        assert r.thinking == "the user"  # stopped at </reasoning>, not at the default </think>
        assert r.meta["closed_by_model"] is True and r.has_think_close is True
        # the answer is the text after the LAST </reasoning>, cut at a <reasoning> that never closes
        assert r.response == "so sure", r.meta
        assert OPEN in r.meta["raw_response"] and CLOSE in r.meta["raw_response"]
    b = encode_rollouts(h, rolls)
    assert b.tokens[0, b.position("think_end")[0]].item() == h.tokenizer.convert_tokens_to_ids("so")


def _refusal_flags_take_think() -> bool:
    from mechcliff.asr import refusal_flags

    return "think" in inspect.signature(refusal_flags).parameters


@pytest.mark.organism
@pytest.mark.skipif(not _refusal_flags_take_think(),
                    reason="needs the mechcliff/asr.py change of issue 16 item 14 (refusal_flags(..., think=))")
def test_answers_are_judged_with_the_handles_tags(reasoning_handle, refusal_judge):
    """``refusal_flags`` / ``asr_of`` cut the final answer at the rollout's own think tags (``meta["think_tags"]``,
    written by ``generate_rollouts`` for a non-default format) or at ``think=``'s, not at ``</think>``."""
    from mechcliff.asr import asr_of, refusal_flags
    from mechcliff.generation import generate_rollouts

    raw = "<reasoning> the user asks </reasoning> sorry i cannot help"
    plain = Rollout(prompt="p", thinking="t", response=raw)
    assert refusal_flags([plain], refusal_judge) == [False]  # default tags: no cut, the answer opens with <reasoning>
    assert refusal_flags([plain], refusal_judge, think=reasoning_handle) == [True]  # the answer after </reasoning>
    assert refusal_flags([plain], refusal_judge, think=reasoning_handle.think) == [True]
    tagged = Rollout(prompt="p", thinking="t", response=raw, meta={"think_tags": [OPEN, CLOSE]})
    assert refusal_flags([tagged], refusal_judge) == [True]
    unclosed = Rollout(prompt="p", thinking="t", response="<reasoning> sorry i cannot",
                       meta={"think_tags": [OPEN, CLOSE]})
    assert asr_of([unclosed], refusal_judge)["no_answer"] == 1
    with scripted(reasoning_handle, SCRIPT):
        rolls = generate_rollouts(reasoning_handle, ["give me one recipe"], max_think_tokens=6, max_answer_tokens=9,
                                  progress=False)
    assert rolls[0].meta["think_tags"] == [OPEN, CLOSE]


# ---- the model's context (item 15) ----------------------------------------------------------------------------

WORDS = "how do i bake bread at home please".split()


def _prompt(n_words: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n_words))


@pytest.mark.organism
def test_handle_knows_its_context(short_handle, organism):
    assert short_handle.n_ctx == 64
    assert organism.n_ctx == 4096


@pytest.mark.organism
def test_encode_refuses_a_sequence_longer_than_the_context(short_handle):
    ok = encode(short_handle, [_prompt(5)], thinking=[_prompt(20)], answers=["sure"])
    assert ok.tokens.shape[1] <= 64
    with pytest.raises(MechcliffError, match=r"example 1 is \d+ tokens.*context of 64 tokens.*never truncate"):
        encode(short_handle, [_prompt(5), _prompt(10)], thinking=[_prompt(20), _prompt(60)], answers=["sure"] * 2)
    assert encode(short_handle, [_prompt(10)], thinking=[_prompt(60)], check_context=False).tokens.shape[1] > 64


@pytest.mark.organism
def test_generation_refuses_a_prompt_longer_than_the_context_before_generating(short_handle, monkeypatch):
    from mechcliff.generation import generate_rollouts

    def never(*a, **k):  # pragma: no cover - the check must come first
        raise AssertionError("generated although a prompt cannot fit")

    monkeypatch.setattr(short_handle.hf_model, "generate", never)
    with pytest.raises(MechcliffError, match=r"prompt 1 is \d+ tokens.*context of 64 tokens"):
        generate_rollouts(short_handle, [_prompt(4), _prompt(70)], progress=False)


@pytest.mark.organism
def test_generation_cuts_the_budgets_of_a_prompt_that_does_not_fit(short_handle):
    from mechcliff.generation import ContextLengthWarning, encode_rollouts, generate_rollouts

    kw = dict(max_think_tokens=30, max_answer_tokens=12, progress=False)
    prompts = [_prompt(4), _prompt(40)]  # 4 words: 10 tokens + 30 + 12 fits in 64; 40 words does not
    with pytest.warns(ContextLengthWarning, match=r"context of 64 tokens.*prompt 1 \(\d+ tokens.*never truncated"):
        rolls = generate_rollouts(short_handle, prompts, **kw)
    capped = rolls[1].meta["context_capped"]
    assert capped["n_ctx"] == 64 and capped["max_answer_tokens"] == 12
    assert capped["prompt_tokens"] + capped["max_think_tokens"] + capped["max_answer_tokens"] == 64
    assert "context_capped" not in rolls[0].meta
    assert len(encode_rollouts(short_handle, rolls[1:]).row(0)) <= 64
    # the prompt that fits is generated exactly as without the long one (the long one got a batch of its own)
    alone = generate_rollouts(short_handle, prompts[:1], **kw)
    assert (alone[0].thinking, alone[0].response) == (rolls[0].thinking, rolls[0].response)


# ---- run configuration and command line (activate once mechcliff/pipeline.py and cli.py have think_format) ------


def _run_config_has_think_format() -> bool:
    import dataclasses

    from mechcliff.pipeline import RunConfig

    return "think_format" in {f.name for f in dataclasses.fields(RunConfig)}


@pytest.mark.unit
@pytest.mark.skipif(not _run_config_has_think_format(),
                    reason="needs the RunConfig.think_format / --think-format change of issue 16 item 14")
def test_run_config_think_format(tmp_path, capsys):
    import json

    from mechcliff.cli import main
    from mechcliff.pipeline import RunConfig

    assert RunConfig.from_dict({}).think_format == "auto"
    assert RunConfig.from_dict({"think_format": "magistral"}).think_format == "magistral"
    assert RunConfig.from_dict({"think_format": dict(CUSTOM)}).think_format == CUSTOM
    with pytest.raises(MechcliffError, match=r"option 'think_format'.*did you mean 'qwen3'"):
        RunConfig.from_dict({"think_format": "qwen"})
    with pytest.raises(MechcliffError, match="option 'think_format'.*closing"):
        RunConfig.from_dict({"think_format": {"opener": "<r>", "closing": "</r>"}})
    # "auto" leaves the stage hashes of runs made before the option unchanged (they resume)
    cfg = RunConfig.from_dict({})
    d = cfg.to_dict()
    from mechcliff.data import content_hash

    old = [k for k in ("model", "seed", "enable_thinking")]
    assert cfg.stage_hash(*old, "think_format") == content_hash([{k: d[k] for k in sorted(old)}])
    assert RunConfig.from_dict({"think_format": "qwq"}).stage_hash(*old, "think_format") != cfg.stage_hash(*old)
    assert main(["run", "--print-config", "--think-format", "deepseek-r1"]) == 0
    assert json.loads(capsys.readouterr().out)["think_format"] == "deepseek-r1"
    toml = tmp_path / "run.toml"
    toml.write_text('think_format = { opener = "<reasoning>\\n", closer = "\\n</reasoning>\\n\\n" }\n')
    assert RunConfig.from_file(toml).think_format == {"opener": "<reasoning>\n", "closer": "\n</reasoning>\n\n"}
