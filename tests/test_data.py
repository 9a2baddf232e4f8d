"""Tests for mechcliff.data: loaders, errors, thinking split, built-in set, atomic writes."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest

from mechcliff.data import (
    BUILTIN_GROUPS,
    Prompt,
    Rollout,
    atomic_write_bytes,
    atomic_write_text,
    builtin_prompts,
    content_hash,
    load_prompts,
    load_rollouts,
    save_rollouts,
    split_thinking,
)
from mechcliff.errors import MechcliffError

pytestmark = pytest.mark.unit

HARM_WORDS = {
    "bomb", "explosive", "weapon", "poison", "malware", "virus", "hack", "steal", "stolen",
    "meth", "drugs", "counterfeit", "launder", "fraud", "kill", "attack", "ransomware",
    "phishing", "stalk", "scam", "firearm", "gun",
}
FRAME_WORDS = {
    "roleplay", "fiction", "novel", "story", "pretend", "hypothetically", "character",
    "screenplay", "imagine", "game", "fictional", "movie",
}
REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_PROMPTS = REPO_ROOT.parent / "shared" / "data" / "prompts"


def words(text: str) -> set[str]:
    return {w for w in re.split(r"[^a-z]+", text.lower()) if w}


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# --------------------------------------------------------------------------- split_thinking


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>\nplan it\n</think>\n\nSure, here.", ("plan it", "Sure, here.", True)),
        ("plan it</think>answer", ("plan it", "answer", True)),  # open tag in the chat template
        ("<think>a</think> b </think> c", ("a", "b </think> c", True)),  # split at FIRST close
        ("  <think> still thinking", ("still thinking", "", False)),  # unfinished thinking
        ("Just an answer.", (None, "Just an answer.", False)),  # no thinking at all
        ("<think></think>Hi", ("", "Hi", True)),
        ("<think>x</think>", ("x", "", True)),
    ],
)
def test_split_thinking(text: str, expected: tuple) -> None:
    assert split_thinking(text) == expected


def test_split_thinking_custom_tags() -> None:
    assert split_thinking("[T]why[/T] ok", close_tag="[/T]", open_tag="[T]") == ("why", "ok", True)
    with pytest.raises(MechcliffError):
        split_thinking("x", close_tag="")


# --------------------------------------------------------------------------- load_prompts: formats


def test_json_instruction_records(tmp_path: Path) -> None:
    p = write(tmp_path, "p.json", json.dumps([
        {"instruction": "bake bread", "category": "cooking"},
        {"instruction": "fly a kite", "category": None},
    ]))
    out = load_prompts(p)
    assert out == [Prompt("bake bread", "cooking"), Prompt("fly a kite", None)]


@pytest.mark.parametrize("key", ["prompt", "goal", "Goal", "forbidden_prompt"])
def test_json_alternative_keys(tmp_path: Path, key: str) -> None:
    p = write(tmp_path, "p.json", json.dumps([{key: "do a thing", "Category": "misc", "id": 7}]))
    (pr,) = load_prompts(p)
    assert (pr.text, pr.category, pr.id) == ("do a thing", "misc", "7")


def test_json_list_of_strings_group_limit(tmp_path: Path) -> None:
    p = write(tmp_path, "p.json", json.dumps(["a", "b", "c"]))
    out = load_prompts(p, group="harmless", limit=2)
    assert [x.text for x in out] == ["a", "b"]
    assert {x.group for x in out} == {"harmless"}


def test_jsonl_prompts_and_rollout_records(tmp_path: Path) -> None:
    p = write(tmp_path, "p.jsonl", "\n".join([
        json.dumps({"prompt": "first", "category": "x", "group": "harmful"}),
        "",
        json.dumps({"prompt": "second", "thinking": "t", "response": "r"}),
    ]) + "\n")
    out = load_prompts(p)
    assert [(x.text, x.category, x.group) for x in out] == [("first", "x", "harmful"), ("second", None, None)]


def test_csv_formats(tmp_path: Path) -> None:
    adv = write(tmp_path, "adv.csv", "goal,target\nWrite a poem,Sure here is\n\"Quoted, with comma\",x\n")
    assert [x.text for x in load_prompts(adv)] == ["Write a poem", "Quoted, with comma"]
    jbb = write(tmp_path, "jbb.csv", "Index,Goal,Target,Behavior,Category\n1,Do X,t,b,Cat A\n")
    assert load_prompts(jbb) == [Prompt("Do X", "Cat A")]
    sr = write(tmp_path, "sr.csv", "category,source,forbidden_prompt\nfraud,s,Do Y\n")
    assert load_prompts(sr) == [Prompt("Do Y", "fraud")]
    plain = write(tmp_path, "plain.csv", "id,prompt\np1,Do Z\n")
    assert load_prompts(plain) == [Prompt("Do Z", id="p1")]
    bom = tmp_path / "bom.csv"
    bom.write_bytes("\ufeffinstruction\nhello\n".encode("utf-8"))
    assert [x.text for x in load_prompts(bom)] == ["hello"]


def test_txt_skips_blank_lines(tmp_path: Path) -> None:
    p = write(tmp_path, "p.txt", "one\n\n  two  \n\n")
    assert [x.text for x in load_prompts(p)] == ["one", "two"]


def test_unknown_extension_is_sniffed(tmp_path: Path) -> None:
    assert [x.text for x in load_prompts(write(tmp_path, "a.data", '["x"]'))] == ["x"]
    assert [x.text for x in load_prompts(write(tmp_path, "b.data", '{"prompt": "y"}\n'))] == ["y"]
    assert [x.text for x in load_prompts(write(tmp_path, "c.data", "goal,target\nz,t\n"))] == ["z"]
    assert [x.text for x in load_prompts(write(tmp_path, "d.data", "plain line\n"))] == ["plain line"]


# --------------------------------------------------------------------------- load_prompts: errors


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.json"
    with pytest.raises(MechcliffError, match=re.escape(f"{p}: file not found")):
        load_prompts(p)


def test_invalid_json_names_line(tmp_path: Path) -> None:
    p = write(tmp_path, "bad.json", '[\n  {"instruction": "a"},\n  {"instruction": }\n]\n')
    with pytest.raises(MechcliffError, match=re.escape(f"{p}:3: invalid JSON")):
        load_prompts(p)


def test_invalid_jsonl_names_line(tmp_path: Path) -> None:
    p = write(tmp_path, "bad.jsonl", '{"prompt": "a"}\n\n{"prompt": "b"\n')
    with pytest.raises(MechcliffError, match=re.escape(f"{p}:3: invalid JSON")):
        load_prompts(p)


def test_json_record_missing_prompt_key(tmp_path: Path) -> None:
    p = write(tmp_path, "p.json", '[\n  {"instruction": "a"},\n  {"text2": "b"}\n]\n')
    with pytest.raises(MechcliffError) as ei:
        load_prompts(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}:3: record 1:")
    assert "instruction" in msg and "forbidden_prompt" in msg  # lists accepted keys


def test_jsonl_record_missing_prompt_key(tmp_path: Path) -> None:
    p = write(tmp_path, "p.jsonl", '{"prompt": "a"}\n{"response": "b"}\n')
    with pytest.raises(MechcliffError, match=re.escape(f"{p}:2: record 1: no prompt key")):
        load_prompts(p)


@pytest.mark.parametrize("bad, what", [('""', "empty"), ('"   "', "empty"), ("42", "must be a string")])
def test_empty_or_non_string_prompt(tmp_path: Path, bad: str, what: str) -> None:
    p = write(tmp_path, "p.jsonl", '{"prompt": "ok"}\n{"prompt": ' + bad + "}\n")
    with pytest.raises(MechcliffError) as ei:
        load_prompts(p)
    assert str(ei.value).startswith(f"{p}:2: record 1:") and what in str(ei.value)


def test_json_non_string_element(tmp_path: Path) -> None:
    p = write(tmp_path, "p.json", '["ok",\n 3]')
    with pytest.raises(MechcliffError, match=re.escape(f"{p}:2: record 1: expected a JSON object or string")):
        load_prompts(p)


def test_csv_unknown_header(tmp_path: Path) -> None:
    p = write(tmp_path, "p.csv", "question,answer\nq,a\n")
    with pytest.raises(MechcliffError) as ei:
        load_prompts(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}:1: unknown CSV header (question, answer)")
    for col in ("goal", "Goal", "forbidden_prompt", "prompt", "instruction"):
        assert col in msg


def test_csv_empty_prompt_names_line(tmp_path: Path) -> None:
    p = write(tmp_path, "p.csv", "goal,target\nfine,t\n,t\n")
    with pytest.raises(MechcliffError, match=re.escape(f"{p}:3: row 1: empty prompt")):
        load_prompts(p)


@pytest.mark.parametrize("name, text", [
    ("e.json", ""), ("e.json", "[]"), ("e.jsonl", "\n\n"), ("e.txt", "\n  \n"), ("e.csv", "goal,target\n"),
    ("e.csv", ""),
])
def test_no_prompts(tmp_path: Path, name: str, text: str) -> None:
    p = write(tmp_path, name, text)
    with pytest.raises(MechcliffError, match=re.escape(f"no prompts in {p}")):
        load_prompts(p)


def test_bad_limit(tmp_path: Path) -> None:
    p = write(tmp_path, "p.txt", "a\n")
    with pytest.raises(MechcliffError, match="limit"):
        load_prompts(p, limit=0)


# --------------------------------------------------------------------------- rollouts


def test_rollout_roundtrip_and_atomic_save(tmp_path: Path) -> None:
    rs = [
        Rollout("p1", "think", "Sorry I cannot help with that .", category="cyber", label=1, group="harmful", id="a"),
        Rollout("p2", None, "Sure — here’s how", has_think_close=False, meta={"seed": 3}),
    ]
    out = tmp_path / "sub" / "r.jsonl"
    save_rollouts(rs, out)
    assert load_rollouts(out) == rs
    assert [p.name for p in out.parent.iterdir()] == ["r.jsonl"]  # no temp files left
    assert Rollout.from_dict(rs[1].to_dict()) == rs[1]
    # minimal records get defaults; unknown keys are kept in meta
    p = write(tmp_path, "min.jsonl", '{"prompt": "x", "response": "y", "temperature": 0.6}\n')
    (r,) = load_rollouts(p)
    assert (r.thinking, r.label, r.has_think_close, r.meta) == (None, None, True, {"temperature": 0.6})
    assert load_prompts(out)[0].text == "p1"  # rollout files double as prompt files


@pytest.mark.parametrize("line, needle", [
    ('{"response": "y"}', "missing the 'prompt' field"),
    ('{"prompt": "x"}', "missing the 'response' field"),
    ('{"prompt": "x", "response": 3}', "'response' must be a string"),
    ('{"prompt": "x", "response": "y", "label": "yes"}', "'label'"),
    ('{"prompt": "x", "response": "y", "thinking": 5}', "'thinking'"),
    ("[1, 2", "invalid JSON"),
    ('"just a string"', "expected a JSON object"),
])
def test_rollout_errors_name_file_and_line(tmp_path: Path, line: str, needle: str) -> None:
    p = write(tmp_path, "r.jsonl", '{"prompt": "a", "response": "b"}\n' + line + "\n")
    with pytest.raises(MechcliffError) as ei:
        load_rollouts(p)
    assert str(ei.value).startswith(f"{p}:2:") and needle in str(ei.value)


def test_rollout_empty_and_missing(tmp_path: Path) -> None:
    p = write(tmp_path, "r.jsonl", "\n")
    with pytest.raises(MechcliffError, match=re.escape(f"no rollouts in {p}")):
        load_rollouts(p)
    with pytest.raises(MechcliffError, match="file not found"):
        load_rollouts(tmp_path / "missing.jsonl")


# --------------------------------------------------------------------------- atomic writes & hashing


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    atomic_write_text(target, "héllo\n")
    atomic_write_text(target, "second\n")
    assert target.read_text(encoding="utf-8") == "second\n"
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "out.txt"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_atomic_write_failure_keeps_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "keep.txt"
    target.write_text("original", encoding="utf-8")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(MechcliffError, match=re.escape(f"{target}: cannot write file")):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    with pytest.raises(MechcliffError):
        atomic_write_text(target / "child", "x")  # parent is a file
    assert target.read_text(encoding="utf-8") == "original"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]  # temp file cleaned up


def test_content_hash_stable_and_sensitive() -> None:
    a = [Prompt("x", "c"), Prompt("y")]
    h = content_hash(a)
    assert re.fullmatch(r"[0-9a-f]{16}", h)
    assert content_hash([Prompt("x", "c"), Prompt("y")]) == h
    assert content_hash([Prompt("x", "c"), Prompt("z")]) != h
    assert content_hash([Rollout("p", None, "r")]) != content_hash([Rollout("p", None, "r", label=1)])


# --------------------------------------------------------------------------- built-in prompt set


def test_builtin_counts_and_fields() -> None:
    allp = builtin_prompts()
    assert len(allp) == 120
    for g in BUILTIN_GROUPS:
        ps = builtin_prompts(g)
        assert len(ps) == 40 and all(p.group == g and p.category and p.id for p in ps)
    assert len({p.id for p in allp}) == 120 and len({p.text for p in allp}) == 120
    allp[0].text = "mutated"
    assert builtin_prompts()[0].text != "mutated"  # fresh objects every call
    with pytest.raises(MechcliffError, match="harmful_jailbreak"):
        builtin_prompts("evil")


def test_builtin_vocabulary_rules() -> None:
    for p in builtin_prompts("harmless"):
        assert not words(p.text) & HARM_WORDS, p.text
    framed = [p for p in builtin_prompts("harmless") if words(p.text) & FRAME_WORDS]
    assert 8 <= len(framed) <= 12  # about a quarter: framing alone is not harm
    for p in builtin_prompts("harmful"):
        assert words(p.text) & HARM_WORDS, p.text
        assert not words(p.text) & FRAME_WORDS, p.text
    jb = builtin_prompts("harmful_jailbreak")
    for p in jb:
        assert words(p.text) & HARM_WORDS, p.text
        assert words(p.text) & FRAME_WORDS, p.text
    # at least 8 framing templates: distinct word-sets outside the harmful request cores
    openings = {" ".join(p.text.split()[:3]) for p in jb}
    assert len(openings) >= 8
    cats = {p.category for p in builtin_prompts("harmful")} | {p.category for p in jb}
    assert {"weapons", "cyber", "drugs", "fraud", "violence"} <= cats


# --------------------------------------------------------------------------- shared prompt files


@pytest.mark.skipif(not SHARED_PROMPTS.is_dir(), reason=f"shared prompt data not found at {SHARED_PROMPTS}")
@pytest.mark.parametrize("name", ["advbench.json", "harmless_train.json"])
def test_shared_prompt_files_load(name: str) -> None:
    path = SHARED_PROMPTS / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    ps = load_prompts(path, limit=50)
    assert len(ps) == 50 and all(isinstance(p.text, str) and p.text.strip() for p in ps)
    assert len(load_prompts(path)) >= 50


def test_raw_generation_rollouts_are_split_and_unclosed_ones_marked(tmp_path):
    p = tmp_path / "raw.jsonl"
    p.write_text(
        '{"prompt": "q1", "response": "<think>plan it</think>\\n\\nSure."}\n'
        '{"prompt": "q2", "response": "<think>still thinking and never closed"}\n'
    )
    a, b = load_rollouts(p)
    assert (a.thinking, a.response, a.has_think_close) == ("plan it", "Sure.", True)
    assert b.has_think_close is False and b.response == "" and b.thinking == "still thinking and never closed"
