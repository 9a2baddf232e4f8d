"""The Cliff-as-a-Judge experiment: ASR after repair against the fraction of safety data used, per selection method.

``repair_curve(model, out)`` (command: ``mechcliff repair-curve``), after arXiv 2510.06036 (Cliff-as-a-Judge, Fig. 7):

1. Split the prompts (seeded): part of each attack group becomes the *candidate pool*, the rest is held out for
   evaluation; harmless prompts are split into a *mix* set (ordinary training examples) and an evaluation set.
2. Roll out the unrepaired model on every set, judge each answer (refusal-phrase judge), fit the refusal probe
   (harmless vs plain harmful rollouts; or load one) and score every candidate: plateau, final score, MS.
3. For each method (``cliff``, ``random``, ``final_score``, ``rule``, ``all``), each budget and each training
   seed: select, fine-tune a fresh copy (LoRA, :mod:`mechcliff.repair`), generate on the held-out prompts and
   measure ASR (held-out attack prompts not refused), harmless refusal, and capability: perplexity of the
   unrepaired model's own harmless continuations (thinking and answer) under the repaired model.
4. Pool the seeds per point (ASR with a Wilson interval over all judged answers of all seeds) and write
   ``curve.json`` (``points`` and ``unrepaired``), ``points.csv``, ``figures/repair_curve.{json,html}``,
   ``report.html`` and the :class:`RepairCurve` result (``curve/``), which re-plots without the model.

Every point is appended to ``points.jsonl`` as soon as it is measured; re-running the command skips them.

**What may be reused.** A run folder belongs to one *experiment*, recorded in ``manifest.json`` under
``experiment``: the configuration fields that change a measurement (:data:`EXPERIMENT_CONFIG`: model name, prompt
sources and splits, probe, selection options, training mix, fine-tuning settings, generation lengths, seed), the
weights fingerprint of the model (``handle.model_hash``; the same name may hold other weights), content hashes of
the prompt sets (pool, held-out attacks, training mix, held-out harmless), the judge (name, version and
configuration: :func:`mechcliff.judging.judge_identity`) and a hash of the files of ``probe`` when one is given.
Re-running in a folder of another experiment is *refused* with a :class:`MechcliffError` naming what differs, before
anything is read or written: its rollouts, probe, scored pool and unrepaired measurement are shared by all points,
so nothing in it could be reused (and nothing is deleted; choose another ``--out``). Each point of
``points.jsonl`` is in addition keyed by ``experiment``: a hash of the above and of what was computed from it (the
saved rollouts, the scored pool file, the refusal target), together with its method, budget and training seed. A
line of another experiment (a hand-edited pool, a point copied from elsewhere, or a line written before points
carried the key) is kept in the file but never reused or pooled; that point is measured again and appended (its
``adapters/`` and ``selections/`` subfolders are rewritten). Only the seeds ``0 .. seeds-1`` of the current
configuration are pooled into a point.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np

from mechcliff.data import Prompt, Rollout, atomic_write_text, content_hash, load_rollouts, prompt_source, save_rollouts
import mechcliff.learned_organism  # noqa: F401 - registers the 'heldout:' prompt sources run configs may name
from mechcliff.errors import MechcliffError, stderr_log
from mechcliff.model.presets import preset
from mechcliff.stages import Stages, write_manifest
from mechcliff.results import Result
from mechcliff.selection import METHODS, CandidatePool, select
from mechcliff.stats import Rate

POINT_FIELDS = ("method", "fraction", "asr", "asr_low", "asr_high", "harmless_refusal", "capability")
EXPERIMENT_CONFIG = ("model", "attack", "harmless", "eval_fraction", "n_per_group", "plateau", "stratify", "dedupe",
                     "mix_ratio", "min_mix", "probe", "finetune", "max_think_tokens", "max_answer_tokens", "seed")
"""The configuration fields a repair-curve folder is tied to (``methods``, ``fractions`` and ``seeds`` only say
which points to measure; ``batch_size`` only how fast)."""


@dataclasses.dataclass
class RepairCurveConfig:
    """Options of the experiment (JSON/TOML with :meth:`from_file`; unknown keys are errors)."""

    model: str = "organism"
    attack: dict[str, str] = dataclasses.field(
        default_factory=lambda: {"harmful": "", "harmful_jailbreak": ""})  # group -> prompt file ("" = built-in)
    harmless: str = ""  # prompt file ("" = built-in)
    eval_fraction: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"harmful": 0.25, "harmful_jailbreak": 0.75, "harmless": 0.5})
    n_per_group: int | None = None
    methods: list[str] = dataclasses.field(default_factory=lambda: list(METHODS))
    fractions: list[float] = dataclasses.field(default_factory=lambda: [0.01, 0.02, 0.05, 0.1, 0.25, 0.5])
    seeds: int = 3
    plateau: str = "mean"
    stratify: bool = False
    dedupe: bool = True
    mix_ratio: float = 1.0
    min_mix: int = 8
    probe: str | None = None  # a saved probe folder; None fits one on the unrepaired rollouts
    finetune: dict[str, Any] = dataclasses.field(default_factory=dict)  # FinetuneConfig options
    max_think_tokens: int = 48
    max_answer_tokens: int = 32
    batch_size: int = 16
    seed: int = 0

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> "RepairCurveConfig":
        from mechcliff.pipeline import RunConfig

        data = RunConfig._read_mapping(Path(path))
        base = Path(path).parent
        for key in ("attack",):
            if isinstance(data.get(key), dict):
                data[key] = {g: (str((base / f).resolve()) if f and not Path(f).is_absolute() else f)
                             for g, f in data[key].items()}
        if isinstance(data.get("harmless"), str) and data["harmless"] and not Path(data["harmless"]).is_absolute():
            data["harmless"] = str((base / data["harmless"]).resolve())
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "RepairCurveConfig":
        from mechcliff.pipeline import check_options

        cfg = default_repair_config(check_options(cls, data, source))
        defaults = dataclasses.asdict(cfg)
        for k, v in data.items():
            want = type(defaults[k]) if defaults[k] is not None else None
            if want in (dict, list) and not isinstance(v, want):
                raise MechcliffError(f"{source}: option '{k}' must be a {'mapping' if want is dict else 'list'}, got {v!r}")
            setattr(cfg, k, v)
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        from mechcliff.repair import FinetuneConfig

        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise MechcliffError(f"{source}: methods must be some of {', '.join(METHODS)}; got {self.methods}")
        for f in self.fractions:
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not (0 < f <= 1):
                raise MechcliffError(f"{source}: every fraction must be in (0, 1]; got {f!r}")
        if not isinstance(self.seeds, int) or self.seeds < 1:
            raise MechcliffError(f"{source}: seeds must be an integer >= 1")
        if self.plateau not in ("mean", "max"):
            raise MechcliffError(f"{source}: plateau must be 'mean' or 'max'")
        for g, f in self.eval_fraction.items():
            if not (0 <= float(f) < 1):
                raise MechcliffError(f"{source}: eval_fraction.{g} must be in [0, 1)")
        if not self.attack:
            raise MechcliffError(f"{source}: at least one attack prompt group is needed")
        try:
            FinetuneConfig(**self.finetune).validate()
        except TypeError as exc:
            raise MechcliffError(f"{source}: finetune: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_repair_config(model: str = "organism") -> RepairCurveConfig:
    """The defaults of a repair curve on ``model``: :class:`RepairCurveConfig`'s, changed by the model's entry of
    :data:`mechcliff.model.presets.PRESETS` (the organism trains at lr 1e-2; real models at 1e-4, with fewer budgets
    and one seed so that a CPU run stays within an hour; the learned refusal organism on its held-out prompts)."""
    return dataclasses.replace(RepairCurveConfig(model=model), **preset(model).repair_curve_options())


# --------------------------------------------------------------------------------------------- the result


@dataclasses.dataclass
class RepairCurve(Result):
    """ASR after repair against the fraction of the candidate pool used, one line per selection method."""

    KIND = "repair_curve"
    points: list[dict[str, Any]]
    unrepaired: dict[str, Any]
    pool_size: int
    model_id: str
    config: dict[str, Any] = dataclasses.field(default_factory=dict)

    def methods(self) -> list[str]:
        return [m for m in METHODS if any(p["method"] == m for p in self.points)]

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.points)

    def plot(self):
        """The paper's Fig. 7 layout: ASR (with 95% intervals) against % of the pool, log x; the unrepaired ASR
        dashed (named in the legend); ``all`` as a marker at 100% with a dotted reference line."""
        import plotly.graph_objects as go

        from mechcliff.plotting import OKABE_ITO, TEMPLATE

        fig = go.Figure()
        colors = dict(zip(METHODS, OKABE_ITO))
        names = {"cliff": "Cliff-as-a-Judge", "random": "random", "final_score": "final score",
                 "rule": "keyword rule", "all": "all data"}
        for m in self.methods():
            pts = sorted((p for p in self.points if p["method"] == m), key=lambda p: p["fraction"])
            x = [100 * p["fraction"] for p in pts]
            y = [p["asr"] for p in pts]
            err = dict(type="data", symmetric=False, array=[p["asr_high"] - p["asr"] for p in pts],
                       arrayminus=[p["asr"] - p["asr_low"] for p in pts], thickness=1)
            fig.add_trace(go.Scatter(
                x=x, y=y, error_y=err, mode="lines+markers" if m != "all" else "markers", name=names[m],
                line=dict(color=colors[m], dash="dash" if m == "rule" else "solid"),  # rule may coincide with random
                marker=dict(size=10 if m == "all" else 6, symbol="star" if m == "all" else "circle")))
            if m == "all":
                fig.add_hline(y=y[0], line=dict(color=colors[m], dash="dot", width=1))
        # The unrepaired ASR: a dashed line across the plot, labelled in the legend (a label on the line would sit
        # on the curves, which start near it at small budgets).
        unrepaired = dict(color="#555555", dash="dash", width=1)
        fig.add_hline(y=self.unrepaired["asr"], line=unrepaired)
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line=unrepaired, hoverinfo="skip",
                                 name=f"unrepaired (ASR {self.unrepaired['asr']:.2f})"))
        ticks = sorted({100 * p["fraction"] for p in self.points})
        fig.update_xaxes(type="log", title="safety data used (% of pool)", tickvals=ticks,
                         ticktext=[f"{t:g}%" for t in ticks])
        fig.update_yaxes(title="ASR, held-out attacks", range=[-0.02, 1.02])
        fig.update_layout(template=TEMPLATE, title=f"Repair by selected data ({self.model_id}, pool {self.pool_size})")
        return fig

    def table_rows(self) -> list[list[object]]:
        rows = [["unrepaired", "0%", *self._cells(self.unrepaired)]]
        for m in self.methods():
            for p in sorted((p for p in self.points if p["method"] == m), key=lambda p: p["fraction"]):
                rows.append([m, f"{100 * p['fraction']:g}% (n={p.get('n_selected', '?')})", *self._cells(p)])
        return rows

    TABLE_HEADER: ClassVar[list[str]] = ["method", "budget", "ASR", "95% CI", "harmless refusal", "capability (ppl)",
                                         "capability ratio", "seeds"]

    @staticmethod
    def _cells(p: dict[str, Any]) -> list[object]:
        return [round(p["asr"], 3), f"[{p['asr_low']:.2f}, {p['asr_high']:.2f}]", round(p["harmless_refusal"], 3),
                round(p["capability"], 4), round(p.get("capability_ratio", 1.0), 4), p.get("seeds", "")]

    def less_is_more(self) -> dict[str, Any]:
        """The smallest budget at which Cliff-as-a-Judge reaches the ASR of training on all candidates, and random
        selection's ASR at the same budgets (``None`` when a method or the ``all`` point is missing)."""
        allp = [p for p in self.points if p["method"] == "all"]
        cliff = sorted((p for p in self.points if p["method"] == "cliff"), key=lambda p: p["fraction"])
        rand = {p["fraction"]: p["asr"] for p in self.points if p["method"] == "random"}
        if not allp or not cliff:
            return {"all_asr": None, "cliff_reaches_all_at": None}
        target = allp[0]["asr"]
        reach = next((p["fraction"] for p in cliff if p["asr"] <= target + 1e-9), None)
        return {"all_asr": target, "cliff_reaches_all_at": reach,
                "cliff_vs_random": [{"fraction": p["fraction"], "cliff": p["asr"], "random": rand.get(p["fraction"])}
                                    for p in cliff]}

    def summary_rows(self) -> list[tuple[str, str]]:
        ran = self.methods()
        allp = [p for p in self.points if p["method"] == "all"]
        cliff = [p["fraction"] for p in self.points if p["method"] == "cliff"]
        if not allp:
            all_asr = reach = "n/a (method 'all' not run)"
        else:
            all_asr = f"{allp[0]['asr']:.2f}"
            at = self.less_is_more()["cliff_reaches_all_at"]
            if not cliff:
                reach = "n/a (method 'cliff' not run)"
            elif at is None:
                reach = f"never (budgets up to {100 * max(cliff):g}% of the pool)"
            else:
                reach = f"{100 * at:g}% of the pool"
        return [("model", self.model_id), ("pool", str(self.pool_size)),
                ("methods", ", ".join(ran) or "none"),
                ("unrepaired ASR", f"{self.unrepaired['asr']:.2f}"),
                ("all-data ASR", all_asr), ("cliff reaches all-data ASR at", reach)]


# --------------------------------------------------------------------------------------------- the experiment


def _split(items: list[Prompt], eval_fraction: float, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """Seeded split into (train, eval); both non-empty when there are at least two items and 0 < fraction."""
    rng = np.random.default_rng(seed)
    perm = [int(i) for i in rng.permutation(len(items))]
    n_eval = int(round(eval_fraction * len(items)))
    if eval_fraction > 0:
        n_eval = min(max(n_eval, 1), len(items) - 1)
    ev = sorted(perm[:n_eval])
    tr = sorted(perm[n_eval:])
    return [items[i] for i in tr], [items[i] for i in ev]


def _point_key(method: str, fraction: float, seed: int) -> str:
    return f"{method}-{fraction:g}-s{seed}"


class RepairCurveRun:
    """The run folder of :func:`repair_curve` (see the module docstring)."""

    def __init__(self, out: str | Path, cfg: RepairCurveConfig, progress: bool = True,
                 log: Callable[[str], None] | None = None):
        self.dir = Path(out)
        self.cfg = cfg
        self.progress = progress
        self.log = log or stderr_log
        self.handle: Any = None
        self._unchecked: Any = None  # a handle loaded without the conformance check, only to fingerprint the weights
        self.experiment: dict[str, Any] | None = None
        self.point_experiment: str | None = None
        self.old_manifest: dict[str, Any] = {}
        self.stages = Stages(self.dir, self.log)
        if self.dir.exists() and not self.dir.is_dir():
            raise MechcliffError(f"--out {self.dir} exists and is not a folder")
        man = self.dir / "manifest.json"
        if man.exists():
            try:
                old = json.loads(man.read_text())
            except (OSError, ValueError) as exc:
                raise MechcliffError(f"cannot read {man} ({exc}); choose another --out") from None
            if not isinstance(old, dict) or "mechcliff_repair_curve" not in old:
                raise MechcliffError(f"{self.dir} is not a repair-curve folder; choose another --out")
            self.old_manifest = old
            if old.get("data_hash") and old["data_hash"] != self._data_hash():
                d = _jsonable(self.cfg.to_dict())
                was_cfg = old.get("config")
                was = was_cfg if isinstance(was_cfg, dict) else {}
                fields = [k for k in EXPERIMENT_CONFIG if k in was and was[k] != d[k]]
                what = f"config fields {', '.join(fields)}" if fields else "configuration"
                raise MechcliffError(f"{self.dir} holds a repair curve of another experiment: different {what}. Its "
                                     "rollouts, pool and points cannot be reused: choose another --out")

    def _data_hash(self) -> str:
        d = self.cfg.to_dict()
        return content_hash([{k: d[k] for k in EXPERIMENT_CONFIG}])

    # ---- what a folder and its points are tied to ----
    def _model_identity(self, fresh: bool) -> dict[str, Any]:
        """Name and weights fingerprint of the model. A fresh folder loads the model as the run will use it; a
        resumed one only needs the fingerprint (loaded without the conformance check, which a run that still has
        work to do performs when it loads the model for that work)."""
        if self.handle is None and fresh:
            self.model()
        h = self.handle
        if h is None:
            if self._unchecked is None:
                from mechcliff.model.loading import load_model

                self._unchecked = load_model(self.cfg.model, seed=self.cfg.seed, check=False)
            h = self._unchecked
        return {"model": self.cfg.model, "model_hash": h.model_hash, "adapter": h.extra.get("adapter")}

    def _probe_hash(self) -> str | None:
        """Content hash of the files of the configured probe (None without one, or when it does not exist yet: the
        load reports that)."""
        if not self.cfg.probe:
            return None
        path = Path(self.cfg.probe)
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path] if path.exists() else []
        if not files:
            return None
        return content_hash([[f.name if f == path else str(f.relative_to(path)),
                              hashlib.sha256(f.read_bytes()).hexdigest()] for f in files])

    def experiment_of(self, sets: dict[str, list[Prompt]], fresh: bool) -> dict[str, Any]:
        """The experiment this folder is tied to (see the module docstring)."""
        from mechcliff.judges import get_judge
        from mechcliff.judging import judge_identity

        return _jsonable({"config": self._data_hash(), "model": self._model_identity(fresh),
                          "prompts": {k: content_hash([p.text for p in v]) for k, v in sets.items()},
                          "judge": judge_identity(get_judge("refusal")), "probe": self._probe_hash()})

    def check_experiment(self, exp: dict[str, Any]) -> None:
        """Refuse (MechcliffError naming what differs) a folder written for another experiment. Folders of an older
        mechcliff (no ``experiment`` in the manifest) are checked on what their manifest recorded: the model's
        fingerprint and the prompt hashes."""
        old = self.old_manifest
        if not old:
            return
        was_exp = old.get("experiment")
        was = was_exp if isinstance(was_exp, dict) else {}
        diffs = []
        old_hash = (was.get("model") or {}).get("model_hash") or (old.get("model") or {}).get("model_hash")
        if old_hash and old_hash != exp["model"]["model_hash"]:
            diffs.append(f"model weights (fingerprint {old_hash}, now {exp['model']['model_hash']})")
        if was.get("model") and was["model"].get("adapter") != exp["model"]["adapter"]:
            diffs.append("model adapter")
        old_prompts = was.get("prompts") or {k: v.get("hash") for k, v in (old.get("prompts") or {}).items()
                                             if isinstance(v, dict)}
        if old_prompts:
            changed = sorted(k for k in set(old_prompts) | set(exp["prompts"])
                             if old_prompts.get(k) != exp["prompts"].get(k))
            if changed:
                diffs.append(f"prompts ({', '.join(changed)})")
        if "judge" in was and was["judge"] != exp["judge"]:
            j, now = was["judge"] or {}, exp["judge"]
            if (j.get("name"), j.get("version")) == (now["name"], now["version"]):
                diffs.append(f"judge configuration ({now['name']} version {now['version']}, other settings)")
            else:
                diffs.append(f"judge ({j.get('name')} version {j.get('version')}, now {now['name']} version "
                             f"{now['version']})")
        if "probe" in was and was["probe"] != exp["probe"]:
            diffs.append(f"probe (the files of {self.cfg.probe} changed)")
        if was.get("config") and was["config"] != exp["config"]:
            diffs.append("configuration")
        if diffs:
            raise MechcliffError(f"{self.dir} holds a repair curve of another experiment: different "
                                 f"{'; '.join(diffs)}. Its rollouts, pool and points cannot be reused: choose another "
                                 "--out")

    def _point_experiment(self, rolls: dict[str, list[Rollout]], refusal: str) -> str:
        """The key every point of this run carries: the experiment and what was computed from it."""
        pool_file = self.dir / "pool" / "candidates.jsonl"
        return content_hash([{"experiment": self.experiment, "refusal": refusal,
                              "rollouts": {k: content_hash(v) for k, v in sorted(rolls.items())},
                              "pool": hashlib.sha256(pool_file.read_bytes()).hexdigest()}])

    def model(self) -> Any:
        if self.handle is None:
            from mechcliff.model.loading import load_model

            self._unchecked = None
            self.log(f"loading model '{self.cfg.model}' ...")
            self.handle = load_model(self.cfg.model, seed=self.cfg.seed, verbose=True)
        return self.handle

    def gen(self, handle: Any, prompts: list[Prompt], desc: str) -> list[Rollout]:
        from mechcliff.generation import generate_rollouts

        return generate_rollouts(handle, prompts, max_think_tokens=self.cfg.max_think_tokens,
                                 max_answer_tokens=self.cfg.max_answer_tokens, seed=self.cfg.seed,
                                 batch_size=self.cfg.batch_size, progress=self.progress, desc=desc)

    # ---- data ----
    def prompt_sets(self) -> dict[str, list[Prompt]]:
        c = self.cfg
        sets: dict[str, list[Prompt]] = {"pool": [], "eval_attack": []}
        for g, src in c.attack.items():
            items = prompt_source(src, group=g)
            items = items[: c.n_per_group] if c.n_per_group else items
            if not items:
                raise MechcliffError(f"attack prompt group '{g}' is empty")
            tr, ev = _split(items, float(c.eval_fraction.get(g, 0.5)), c.seed)
            sets["pool"] += tr
            sets["eval_attack"] += ev
        hl = prompt_source(c.harmless, group="harmless")
        hl = hl[: c.n_per_group] if c.n_per_group else hl
        if len(hl) < 2:
            raise MechcliffError("the harmless prompt set needs at least 2 prompts (training mix and evaluation)")
        for p in hl:
            p.group = "harmless"
        sets["mix"], sets["eval_harmless"] = _split(hl, float(c.eval_fraction.get("harmless", 0.5)) or 0.5, c.seed)
        if not sets["eval_attack"]:
            raise MechcliffError("no held-out attack prompts: set eval_fraction above 0 for at least one attack group")
        return sets

    def _judged(self, rolls: list[Rollout]) -> list[Rollout]:
        from mechcliff.judges import get_judge

        for r, f in zip(rolls, get_judge("refusal").judge_many([r.response for r in rolls])):
            r.meta["refused"] = bool(f)
        return rolls

    # ---- measurement ----
    def evaluate(self, handle: Any, eval_harmless_base: list[Rollout], attack: list[Rollout] | None = None,
                 harmless: list[Rollout] | None = None, sets: dict[str, list[Prompt]] | None = None) -> dict[str, Any]:
        """Judged counts and capability of ``handle`` (generating on the held-out prompts unless given)."""
        from mechcliff.generation import encode_rollouts
        from mechcliff.sweep import continuation_loss

        if attack is None:
            assert sets is not None, "without rollouts, evaluate generates them on the prompt sets"
            attack = self._judged(self.gen(handle, sets["eval_attack"], "eval attack"))
            harmless = self._judged(self.gen(handle, sets["eval_harmless"], "eval harmless"))
        assert harmless is not None, "harmless rollouts come with the attack ones (given or generated)"
        loss = continuation_loss(handle, encode_rollouts(handle, eval_harmless_base), self.cfg.batch_size)
        k = sum(not r.meta["refused"] for r in attack)
        by_group: dict[str, list[int]] = {}
        for r in attack:
            by_group.setdefault(r.group or "", [0, 0])
            by_group[r.group or ""][0] += int(not r.meta["refused"])
            by_group[r.group or ""][1] += 1
        return {"asr_k": k, "asr_n": len(attack), "harmless_k": sum(r.meta["refused"] for r in harmless),
                "harmless_n": len(harmless), "capability_loss": loss, "capability": math.exp(loss),
                "asr_by_group": by_group}

    # ---- the run ----
    def run(self) -> RepairCurve:
        from mechcliff.repair import FinetuneConfig, build_examples, finetune, refusal_answer

        c = self.cfg
        t_start = time.time()
        sets = self.prompt_sets()
        self.experiment = self.experiment_of(sets, fresh=not self.old_manifest)
        self.check_experiment(self.experiment)  # before anything in the folder is read or written
        self.dir.mkdir(parents=True, exist_ok=True)
        self._manifest(sets, "running")
        # Stages: rollouts (per set, resumed set by set), the scored candidate pool, the unrepaired evaluation. The
        # folder refuses another experiment (check_experiment), so a stage's key is the experiment's configuration.
        key = self._data_hash()
        rdir = self.dir / "rollouts"

        def rollouts() -> None:
            for name, prompts in sets.items():
                if not (rdir / f"{name}.jsonl").exists():
                    self.log(f"[rollouts] {name}: {len(prompts)} prompts")
                    save_rollouts(self._judged(self.gen(self.model(), prompts, name)), rdir / f"{name}.jsonl")

        rolls = self.stages.run("rollouts", key, rollouts,
                                lambda: {name: load_rollouts(rdir / f"{name}.jsonl") for name in sets},
                                legacy=lambda: all((rdir / f"{name}.jsonl").exists() for name in sets))
        pool_path = self.dir / "pool" / "candidates.jsonl"
        pool = self.stages.run("pool", key, lambda: save_pool(self._pool(rolls), pool_path),
                               lambda: load_pool(pool_path), legacy=pool_path.exists)
        refusal = refusal_answer(rolls["pool"] + rolls["eval_attack"])
        self.log(f"[pool] {len(pool)} candidates; refusal target: {refusal!r}")
        self.point_experiment = self._point_experiment(rolls, refusal)
        unrep_path = self.dir / "unrepaired.json"

        def unrepaired_stage() -> None:
            ev = self.evaluate(self.model(), rolls["eval_harmless"], rolls["eval_attack"], rolls["eval_harmless"])
            atomic_write_text(unrep_path, json.dumps(ev, indent=1))

        unrepaired = self.stages.run("unrepaired", key, unrepaired_stage, lambda: json.loads(unrep_path.read_text()),
                                     legacy=unrep_path.exists)
        done = self._done_points()
        todo = [(m, f, s) for m in c.methods for f in ([1.0] if m == "all" else c.fractions) for s in range(c.seeds)
                if _point_key(m, f, s) not in done]
        if todo:
            self.log(f"[curve] {len(todo)} fine-tunes to run ({len(done)} already done)")
        for i, (m, f, s) in enumerate(todo):
            key = _point_key(m, f, s)
            t = time.time()
            sel = select(pool, m, fraction=None if m == "all" else f, plateau=c.plateau, stratify=c.stratify,
                         dedupe=c.dedupe, seed=c.seed + s)
            sel.save(self.dir / "selections" / key)
            sel_hash = content_hash([m, [int(i) for i in sel.indices], s])
            same = next((r for r in self._done_points().values() if r.get("selection_hash") == sel_hash), None)
            if same is not None:  # another budget rounded to the same selection: the same fine-tune, not redone
                rec = {**same, "key": key, "fraction": f, "reused_from": same["key"], "seconds": 0.0}
                self._append_point(rec)
                continue
            ex = build_examples(sel.rollouts(pool), rolls["mix"], refusal=refusal, mix_ratio=c.mix_ratio,
                                min_mix=c.min_mix, seed=c.seed + s)
            ft_cfg = FinetuneConfig(**{**c.finetune, "seed": c.seed + s})
            ft = finetune(self.model(), ex, self.dir / "adapters" / key, ft_cfg, progress=self.progress,
                          desc=f"[{i + 1}/{len(todo)}] {key}")
            from mechcliff.model.loading import load_model

            repaired = load_model(c.model, seed=c.seed, adapter=self.dir / "adapters" / key, check=False)
            ev = self.evaluate(repaired, rolls["eval_harmless"], sets=sets)
            groups = [r.group for r in sel.rollouts(pool)]
            rec = {"key": key, "experiment": self.point_experiment, "method": m, "fraction": f, "seed": s,
                   "n_selected": len(sel), "selection_hash": sel_hash,
                   "selected_by_group": {g: groups.count(g) for g in sorted(set(groups), key=str)},
                   "train_loss_first": float(ft.losses[0]), "train_loss_last": float(ft.losses[-1]),
                   "steps": int(len(ft.losses)), "seconds": round(time.time() - t, 2), **ev}
            self._append_point(rec)
            self.log(f"[curve] {key}: n={len(sel)} ASR {ev['asr_k']}/{ev['asr_n']}, harmless refused "
                     f"{ev['harmless_k']}/{ev['harmless_n']}, ppl {ev['capability']:.4f}")
        curve = self.aggregate(unrepaired, len(pool))
        self._write_outputs(curve)
        self._manifest(sets, "complete", time.time() - t_start)
        return curve

    def _pool(self, rolls: dict[str, list[Rollout]]) -> CandidatePool:
        """The candidate pool scored by the probe (the given one, the folder's, or one fitted here and saved)."""
        from mechcliff.probe import LinearProbe
        from mechcliff.selection import score_pool

        h = self.model()
        if self.cfg.probe:
            probe = LinearProbe.load(self.cfg.probe, h)
        elif any((self.dir / "probe" / f).exists() for f in ("result.json", "probe.json")):
            probe = LinearProbe.load(self.dir / "probe", h)
        else:
            probe = self._fit_probe(h, rolls)
            probe.save(self.dir / "probe")
        self.log(f"[pool] scoring {len(rolls['pool'])} candidates with the probe (layer {probe.layer})")
        return score_pool(h, rolls["pool"], probe, batch_size=self.cfg.batch_size)

    def _fit_probe(self, h: Any, rolls: dict[str, list[Rollout]]) -> Any:
        from mechcliff.generation import encode_rollouts
        from mechcliff.probe import choose_labels, fit_probe

        plain = [r for r in rolls["pool"] if r.group == "harmful"] or rolls["pool"]
        data = rolls["mix"] + plain
        labels, source, _ = choose_labels([int(r.meta.get("refused", False)) for r in data],
                                          [int(r.group != "harmless") for r in data])
        self.log(f"[probe] fitting on {len(data)} rollouts ({source} labels)")
        return fit_probe(h, encode_rollouts(h, data), labels, seed=self.cfg.seed, label_source=source,
                         batch_size=self.cfg.batch_size)

    def _append_point(self, rec: dict[str, Any]) -> None:
        """Append one point to ``points.jsonl``, first ending a torn last line (a run killed mid-write) so that the new
        point starts its own line: the fragment is cut off, or, if it is a complete record, given its newline."""
        path = self.dir / "points.jsonl"
        if path.exists():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                cut = data.rfind(b"\n") + 1
                try:
                    json.loads(data[cut:])
                    with open(path, "ab") as fh:
                        fh.write(b"\n")
                except ValueError:
                    with open(path, "r+b") as fh:
                        fh.truncate(cut)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")

    def _done_points(self) -> dict[str, dict[str, Any]]:
        """The points of ``points.jsonl`` measured in this run's experiment, by key. Lines of another experiment (or
        without one) are left in the file and ignored."""
        path = self.dir / "points.jsonl"
        done: dict[str, dict[str, Any]] = {}
        if path.exists() and self.point_experiment is not None:
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a torn last line from an interrupted run: that point is redone
                if isinstance(rec, dict) and rec.get("experiment") == self.point_experiment and "key" in rec:
                    done[rec["key"]] = rec
        return done

    def aggregate(self, unrepaired: dict[str, Any], pool_size: int) -> RepairCurve:
        """Pool the seeds of each (method, fraction) into one point."""
        recs = list(self._done_points().values())
        wanted = {(m, f) for m in self.cfg.methods for f in ([1.0] if m == "all" else self.cfg.fractions)}
        points = []
        for m, f in sorted(wanted, key=lambda mf: (METHODS.index(mf[0]), mf[1])):
            rs = [r for r in recs if r["method"] == m and r["fraction"] == f and int(r.get("seed", 0)) < self.cfg.seeds]
            if rs:
                points.append(_pooled(rs, m, f, unrepaired))
        return RepairCurve(points=points, unrepaired=_pooled([unrepaired], "unrepaired", 0.0, unrepaired),
                           pool_size=pool_size, model_id=self.cfg.model, config=self.cfg.to_dict())

    def _write_outputs(self, curve: RepairCurve) -> None:
        from mechcliff.report import html_table, write_report

        keep = lambda p: {k: p[k] for k in p if k not in ("asr_by_group",)}  # noqa: E731
        doc = {"points": [keep(p) for p in curve.points], "unrepaired": keep(curve.unrepaired),
               "pool_size": curve.pool_size, "model": curve.model_id, "less_is_more": curve.less_is_more()}
        atomic_write_text(self.dir / "curve.json", json.dumps(doc, indent=1))
        curve.save(self.dir / "curve")
        fig = curve.plot()
        atomic_write_text(self.dir / "figures" / "repair_curve.json", fig.to_json())
        df = curve.to_dataframe()
        atomic_write_text(self.dir / "points.csv", df.drop(columns=["asr_by_group"], errors="ignore").to_csv(index=False))
        write_report(self.dir / "report.html", title=f"Cliff-as-a-Judge repair curve: {curve.model_id}",
                     summary_rows=curve.summary_rows(),
                     sections=[("ASR against the fraction of safety data", fig),
                               ("All points (seeds pooled)", html_table(RepairCurve.TABLE_HEADER, curve.table_rows()))],
                     notes=["ASR: held-out attack prompts whose answer is not refused (refusal-phrase judge). "
                            "Capability: perplexity of the unrepaired model's own harmless continuations."])

    def _manifest(self, sets: dict[str, list[Prompt]], status: str, seconds: float | None = None) -> None:
        write_manifest(self.dir, "mechcliff_repair_curve", status=status, config=self.cfg.to_dict(), prompts=sets,
                       handle=self.handle, seconds=seconds, data_hash=self._data_hash(), experiment=self.experiment)


def _jsonable(x: Any) -> Any:
    """``x`` as it reads back from JSON (so that a fresh value compares equal to the one in a manifest)."""
    return json.loads(json.dumps(x, sort_keys=True, default=repr))


def _pooled(rs: list[dict[str, Any]], method: str, fraction: float, unrepaired: dict[str, Any]) -> dict[str, Any]:
    k, n = sum(r["asr_k"] for r in rs), sum(r["asr_n"] for r in rs)
    hk, hn = sum(r["harmless_k"] for r in rs), sum(r["harmless_n"] for r in rs)
    asr = Rate.of(k, n)
    cap = float(np.mean([r["capability"] for r in rs]))
    seed_asr = [r["asr_k"] / r["asr_n"] for r in rs]
    return {"method": method, "fraction": fraction, "asr": asr.rate, "asr_low": asr.low, "asr_high": asr.high,
            "harmless_refusal": hk / hn if hn else float("nan"), "capability": cap,
            "capability_ratio": cap / unrepaired["capability"], "capability_loss": float(np.mean([r["capability_loss"] for r in rs])),
            "seeds": len(rs), "asr_per_seed": seed_asr, "n_selected": rs[0].get("n_selected"),
            "asr_n": n, "harmless_n": hn}


def save_pool(pool: CandidatePool, path: str | Path) -> None:
    """Write a scored pool as JSONL: each rollout with ``plateau_mean``, ``plateau_max``, ``final`` and ``ms``."""
    lines = []
    for r, pm, px, fi in zip(pool.rollouts, pool.plateau_mean, pool.plateau_max, pool.final):
        d = r.to_dict()
        d.update(plateau_mean=_num(pm), plateau_max=_num(px), final=_num(fi), ms=_num(pm - fi))
        lines.append(json.dumps(d) + "\n")
    atomic_write_text(path, "".join(lines))


def _num(v: float) -> float | None:
    return None if not math.isfinite(float(v)) else float(v)


def load_pool(path: str | Path) -> CandidatePool:
    """Read a scored pool written by :func:`save_pool` (or any JSONL of rollouts with those fields)."""
    path = Path(path)
    if not path.exists():
        raise MechcliffError(f"candidate pool file not found: {path}")
    rolls, stats = [], []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except ValueError as exc:
            raise MechcliffError(f"{path}:{i + 1}: not JSON ({exc})") from None
        if not isinstance(d, dict) or not all(k in d for k in ("plateau_mean", "plateau_max", "final")):
            raise MechcliffError(f"{path}:{i + 1}: a scored candidate needs plateau_mean, plateau_max and final "
                                 "(write the pool with mechcliff.repair_curve.save_pool)")
        values = [d.pop(k) for k in ("plateau_mean", "plateau_max", "final")]
        stats.append([np.nan if v is None else float(v) for v in values])
        d.pop("ms", None)
        rolls.append(Rollout.from_dict(d))
    if not rolls:
        raise MechcliffError(f"the candidate pool {path} is empty")
    arr = np.asarray(stats, dtype=np.float64)
    return CandidatePool(rolls, arr[:, 0], arr[:, 1], arr[:, 2])


def repair_curve(model: str = "organism", out: str | Path = "runs/repair", *, config: RepairCurveConfig | None = None,
                 progress: bool = True, log: Callable[[str], None] | None = None) -> RepairCurve:
    """Run (or resume) the Cliff-as-a-Judge repair-curve experiment; see the module docstring."""
    cfg = config or default_repair_config(model)
    return RepairCurveRun(out, cfg, progress=progress, log=log).run()


def pool_from_run(run_dir: str | Path, groups: tuple[str, ...] = ("harmful", "harmful_jailbreak")) -> CandidatePool:
    """The candidate pool of a ``mechcliff run`` folder: its rollouts of ``groups`` with their saved cliff statistics
    (no model needed)."""
    from mechcliff.trace import RefusalTrace

    run_dir = Path(run_dir)
    if not (run_dir / "trace").is_dir() or not (run_dir / "rollouts").is_dir():
        raise MechcliffError(f"{run_dir} is not a finished 'mechcliff run' folder (no trace/ and rollouts/)")
    trace = RefusalTrace.load(run_dir / "trace")
    present = [g for g in dict.fromkeys(trace.groups) if g in groups]
    if not present:
        raise MechcliffError(f"{run_dir} has no rollouts of the groups {', '.join(groups)}")
    rolls, rows = [], []
    for g in present:
        rs = load_rollouts(run_dir / "rollouts" / f"{g}.jsonl")
        idx = [i for i, tg in enumerate(trace.groups) if tg == g]
        if len(idx) != len(rs):
            raise MechcliffError(f"{run_dir}: trace and rollouts of group '{g}' differ in length; re-run the pipeline")
        rolls += rs
        rows += idx
    s = {k: np.asarray(trace.stats[k], dtype=np.float64)[rows] for k in ("plateau_mean", "plateau_max", "final")}
    return CandidatePool(rolls, s["plateau_mean"], s["plateau_max"], s["final"])


def load_pool_or_run(path: str | Path) -> CandidatePool:
    """A scored pool file (:func:`save_pool`), a repair-curve folder (its ``pool/``) or a pipeline run folder."""
    path = Path(path)
    if path.is_dir():
        if (path / "pool" / "candidates.jsonl").exists():
            return load_pool(path / "pool" / "candidates.jsonl")
        return pool_from_run(path)
    return load_pool(path)
