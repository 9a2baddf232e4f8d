"""The whole refusal-cliff pipeline on one model, as resumable stages writing a run folder.

Stages: ``rollouts`` (generate and judge each prompt group) -> ``probe`` (fit, layer sweep) -> ``trace`` (per-token
scores, cliff statistics) -> ``attribution`` (DPA at ``t_cliff`` of the attack group) -> ``ablation`` (ASR with
the top suppression heads ablated, and random same-size controls) -> ``results.json``, figures and
``report.html``. Each finished stage leaves ``stages/<name>.done`` holding the hash of the configuration it ran
with (rollouts also per prompt group, ``stages/rollouts/<group>.done``); a re-run skips stages whose hash matches
and whose saved files load, so an interrupted run resumes where it stopped, and a stage whose files were truncated
is recomputed. Every file is written atomically. Nothing already in the folder is replaced by another experiment:
a folder holding a run of another configuration (any option, the prompts' content, the model's files) is refused
unless ``overwrite=True`` (``--overwrite``), and a folder another run is writing is refused (``.lock``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from mechcliff.data import (BUILTIN_GROUPS, Prompt, atomic_write_text, content_hash, prompt_source,
                            prompt_source_schemes, load_rollouts, save_rollouts)
import mechcliff.learned_organism  # noqa: F401 - registers the 'heldout:' prompt sources run configs may name
from mechcliff.errors import MechcliffError, stderr_log
from mechcliff.model.presets import preset
from mechcliff.stages import Stages, write_manifest

if TYPE_CHECKING:
    from mechcliff.model.handle import ModelHandle

ATTACK_GROUPS = ("harmful_jailbreak", "harmful")


NONE = type(None)


def option(default: Any = dataclasses.MISSING, *, stage: str | None, types: tuple[type, ...],
           factory: Callable[[], Any] | None = None) -> Any:
    """A :class:`RunConfig` field with the stage whose results it changes (``None``: no result depends on it) and
    the types a config file may give it. Stage hashes and type checks are derived from these, so an option cannot
    be left out of either."""
    meta = {"stage": stage, "types": types}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class RunConfig:
    """Everything a run depends on. Load from JSON/TOML with :meth:`from_file`; unknown keys are errors.

    Each option names the first stage (of :attr:`Run.STAGES`) whose results it changes; that stage and every later
    one are recomputed when it changes."""

    model: str = option("organism", stage="rollouts", types=(str,))
    # fine-tuned weights applied to the model (see mechcliff.repair)
    adapter: str | None = option(None, stage="rollouts", types=(str, NONE))
    # group -> prompt file; "" = the built-in set; "heldout:GROUP" = the learned organism's held-out evaluation set
    prompts: dict[str, str] = option(stage="rollouts", types=(dict,), factory=dict)
    n_per_group: int | None = option(None, stage="rollouts", types=(int, NONE))
    # "behaviour" (refused vs complied), "dataset" (harmful vs harmless) or "auto" (mechcliff.probe.choose_labels)
    label_source: str = option("auto", stage="probe", types=(str,))
    # groups whose rollouts train the probe; the paper's pool is harmless + plain harmful (the attack group is out
    # of distribution); adding "harmful_jailbreak" fits the probe to complied jailbreaks too
    probe_groups: list[str] = option(stage="probe", types=(list,), factory=lambda: ["harmless", "harmful"])
    probe_layer: int | str = option("best", stage="probe", types=(int, str))
    position: str = option("think_end", stage="probe", types=(str,))
    plateau: str = option("mean", stage="trace", types=(str,))
    # token budgets of each rollout. These (48 / 32) are the organisms'; a real model (any model the presets table,
    # mechcliff.model.presets, does not name) gets reasoning-scale ones, 4096 / 512, since a short budget force-closes
    # its thinking and changes the behaviour under study; quick=True on a real model: 32 / 24
    max_think_tokens: int = option(48, stage="rollouts", types=(int,))
    max_answer_tokens: int = option(32, stage="rollouts", types=(int,))
    temperature: float = option(0.0, stage="rollouts", types=(int, float))
    # sampling as in the papers (mechcliff.generation.Sampling): nucleus top-p (1: none) and samples per prompt
    # (> 1 needs temperature > 0), each sample seeded from (seed, prompt index, sample index)
    top_p: float = option(1.0, stage="rollouts", types=(int, float))
    n_samples: int = option(1, stage="rollouts", types=(int,))
    # how many examples share a forward pass: changes speed and memory, not results (batched = per example)
    batch_size: int = option(16, stage=None, types=(int,))
    seed: int = option(0, stage="rollouts", types=(int,))
    enable_thinking: bool = option(True, stage="rollouts", types=(bool,))
    # how the model writes its thinking: "auto" (the organism's format for the organism, <think>\n ... \n</think>\n\n
    # otherwise), a preset of mechcliff.model.handle.THINK_PRESETS, or (config files) a dict with opener and closer
    think_format: str | dict[str, str] = option("auto", stage="rollouts", types=(str, dict))
    # where the model runs: a torch device. Not part of any stage's key (like batch_size): on one dtype, devices
    # differ by kernel rounding only, and a run moved to another machine resumes
    device: str = option("cpu", stage=None, types=(str,))
    # the weights' dtype: "float32", "bfloat16" or "float16". Changes every number from the rollouts on (greedy
    # generation can take another token), so it keys the rollouts stage
    dtype: str = option("float32", stage="rollouts", types=(str,))
    # accelerate device map ("auto", {module: device}, {device: memory}); offloading changes the kernels and the
    # order of operations that run, so it keys the rollouts stage too (None: one device)
    device_map: str | dict[str, Any] | None = option(None, stage="rollouts", types=(str, dict, NONE))
    ablation_top_k: int | None = option(None, stage="ablation", types=(int, NONE))  # None: 3% of all heads (>= 1)
    ablation_mode: str = option("scale_z", stage="ablation", types=(str,))
    ablation_gamma: float = option(0.0, stage="ablation", types=(int, float))
    n_random_sets: int = option(3, stage="ablation", types=(int,))
    quick: bool = option(False, stage="rollouts", types=(bool,))
    # group -> a JSONL file of rollouts in mechcliff's format (written by `mechcliff import-rollouts`), used for that
    # group instead of generating; each is judged for refusal unless it carries meta["refused"]. {} = generate
    rollouts: dict[str, str] = option(stage="rollouts", types=(dict,), factory=dict)

    @classmethod
    def stage_of(cls) -> dict[str, str | None]:
        """Each option -> the first stage whose results it changes (None: none)."""
        return {f.name: f.metadata["stage"] for f in dataclasses.fields(cls)}

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> "RunConfig":
        """Read a JSON or TOML config. Options not in the file keep the per-model defaults of
        :func:`default_config`; relative prompt paths are resolved from the config file's folder."""
        path = Path(path)
        data = cls._read_mapping(path)
        data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
        if isinstance(data.get("prompts"), dict):  # files, not the built-in set ("") or a source ("heldout:NAME")
            data["prompts"] = {g: (str((path.parent / f).resolve()) if isinstance(f, str) and f and not Path(f).is_absolute()
                                   and f.partition(":")[0] not in prompt_source_schemes() else f)
                               for g, f in data["prompts"].items()}
        if isinstance(data.get("rollouts"), dict):
            data["rollouts"] = {g: (str((path.parent / f).resolve()) if isinstance(f, str) and f and not Path(f).is_absolute() else f)
                                for g, f in data["rollouts"].items()}
        return cls.from_dict(data, source=str(path))

    @staticmethod
    def _read_mapping(path: Path) -> dict[str, Any]:
        """The options in a JSON or TOML file, as a dict; unreadable files are MechcliffErrors."""
        if not path.exists():
            raise MechcliffError(f"config file not found: {path}")
        text = path.read_text()
        try:
            if path.suffix == ".toml":
                try:
                    import tomllib
                except ModuleNotFoundError:
                    raise MechcliffError(f"{path}: TOML configs need Python >= 3.11; write the config as JSON") from None
                data = tomllib.loads(text)
            else:
                data = json.loads(text)
        except MechcliffError:
            raise
        except Exception as exc:  # noqa: BLE001 - any parse error is the user's file
            raise MechcliffError(f"cannot parse config {path}: {exc}") from None
        if not isinstance(data, dict):
            raise MechcliffError(f"{path}: a config must be a mapping of options, not {type(data).__name__}")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "RunConfig":
        """Per-model defaults (:func:`default_config`) overridden by ``data``; unknown or mistyped options are errors."""
        model = check_options(cls, data, source)
        cfg = default_config(model, quick=bool(data.get("quick", False)))
        for k, v in data.items():
            setattr(cfg, k, v)
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        """Check every option's type and allowed values; raise :class:`MechcliffError` naming the option."""
        from mechcliff.chat import ANCHORS
        from mechcliff.interventions import MODES

        for opt in dataclasses.fields(self):
            name, types = opt.name, opt.metadata["types"]
            v = getattr(self, name)
            if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
                want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
                raise MechcliffError(f"{source}: option '{name}' must be {want}, got {v!r}")
        choices = {"label_source": ("auto", "behaviour", "dataset"), "plateau": ("mean", "max"),
                   "ablation_mode": MODES, "position": ANCHORS, "dtype": ("float32", "bfloat16", "float16")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise MechcliffError(f"{source}: option '{name}' must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        if not (isinstance(self.think_format, str) and self.think_format.strip().lower() == "auto"):
            from mechcliff.model.handle import think_format

            try:
                think_format(self.think_format)
            except MechcliffError as exc:
                raise MechcliffError(f"{source}: option 'think_format': {exc}") from None
        if isinstance(self.probe_layer, str) and self.probe_layer != "best":
            raise MechcliffError(f"{source}: option 'probe_layer' must be an integer or 'best', not {self.probe_layer!r}")
        if not math.isfinite(float(self.ablation_gamma)):
            raise MechcliffError(f"{source}: option 'ablation_gamma' must be finite, got {self.ablation_gamma!r}")
        from mechcliff.interventions import GAMMA_MODES

        if self.ablation_mode == "zero" and float(self.ablation_gamma) != 0.0:
            raise MechcliffError(
                f"{source}: option 'ablation_gamma' is {self.ablation_gamma!r}, but ablation_mode 'zero' takes no gamma "
                f"(it is gamma=0); only the modes {', '.join(GAMMA_MODES)} take ablation_gamma (for a scaled ablation "
                f"use ablation_mode 'scale_z' with ablation_gamma {self.ablation_gamma!r})")
        if self.ablation_mode == "mean":
            raise MechcliffError(
                f"{source}: ablation_mode 'mean' is not available in the pipeline (it needs the heads' mean outputs, "
                f"which the ablation stage does not compute); use one of {', '.join(GAMMA_MODES)} or 'zero'")
        if not math.isfinite(float(self.temperature)) or self.temperature < 0:
            raise MechcliffError(f"{source}: option 'temperature' must be a finite number >= 0")
        if not math.isfinite(float(self.top_p)) or not 0 < self.top_p <= 1:
            raise MechcliffError(f"{source}: option 'top_p' must be in (0, 1] (1: no truncation), got {self.top_p!r}")
        if self.n_samples < 1:
            raise MechcliffError(f"{source}: option 'n_samples' must be at least 1, got {self.n_samples}")
        if self.n_samples > 1 and self.temperature == 0:
            raise MechcliffError(f"{source}: option 'n_samples' is {self.n_samples} but the temperature is 0 (greedy): "
                                 "the samples would be identical; set a temperature > 0 (arXiv 2510.06036 samples at 0.7)")
        for name in ("n_per_group", "batch_size", "ablation_top_k"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise MechcliffError(f"{source}: option '{name}' must be at least 1, got {v}")
        for name in ("max_think_tokens", "max_answer_tokens", "n_random_sets"):
            if getattr(self, name) < 0:
                raise MechcliffError(f"{source}: option '{name}' must be >= 0")
        if not self.probe_groups or not all(isinstance(g, str) for g in self.probe_groups):
            raise MechcliffError(f"{source}: option 'probe_groups' must be a non-empty list of group names")
        for g, f in self.prompts.items():
            if not isinstance(f, str):
                raise MechcliffError(f"{source}: prompts.{g} must be a file path, \"\" for the built-in set or \"heldout:GROUP\"")
        for g, f in self.rollouts.items():
            if not isinstance(f, str) or not f.strip():
                raise MechcliffError(f"{source}: rollouts.{g} must be the path of a JSONL file of rollouts")
            if g in self.prompts:
                raise MechcliffError(f"{source}: group '{g}' is given both as prompts and as rollouts; give it once")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def generation(self, progress: bool = True) -> dict[str, Any]:
        """The keyword arguments of :func:`mechcliff.generation.generate_rollouts` this configuration runs with."""
        return dict(max_think_tokens=self.max_think_tokens, max_answer_tokens=self.max_answer_tokens,
                    temperature=self.temperature, seed=self.seed, top_p=self.top_p, n_samples=self.n_samples,
                    batch_size=self.batch_size,
                    enable_thinking=self.enable_thinking, progress=progress)

    def stage_hash(self, *fields: str) -> str:
        d = self.to_dict()
        # think_format "auto" and empty rollouts are left out, so that runs from before those options keep their
        # hashes (and resume); likewise top_p 1 and n_samples 1, and sampled rollouts are marked as seeded per sample
        # (mechcliff.generation.hashed_sampling)
        from mechcliff.generation import hashed_sampling

        keep = {k: d[k] for k in sorted(fields) if not (k == "think_format" and d[k] == "auto")
                and not (k == "rollouts" and not d[k])
                and not (k == "dtype" and d[k] == "float32") and not (k == "device_map" and d[k] is None)}
        return content_hash([hashed_sampling(keep)])


def check_options(config_cls: type, data: dict[str, Any], source: str) -> str:
    """Reject options that are not fields of the config dataclass; return the (string) ``model`` option."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise MechcliffError(f"{source}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    model = data.get("model", "organism")
    if not isinstance(model, str):
        raise MechcliffError(f"{source}: option 'model' must be a string, got {model!r}")
    return model


def default_config(model: str, quick: bool = False) -> RunConfig:
    """The defaults of a run on ``model``: :class:`RunConfig`'s, changed by the model's entry of
    :data:`mechcliff.model.presets.PRESETS` (e.g. the organism ablates 3 heads; a real model thinks for up to 4,096
    tokens and answers in up to 512; ``quick`` on a real model uses 40 prompts per group, 32 / 24-token generations
    and 2 random-head sets)."""
    return dataclasses.replace(RunConfig(model=model, quick=quick), **preset(model).run_options(quick))


def versions() -> dict[str, str]:
    """Python, mechcliff and its direct dependencies, as installed (see :mod:`mechcliff.versions`)."""
    from mechcliff.versions import installed_versions

    return installed_versions()


class Run:
    """A run folder: ``manifest.json``, ``stages/``, ``rollouts/``, ``probe/``, ``trace/``, ``attribution/``,
    ``ablation/``, ``figures/``, ``results.json``, ``report.html``."""

    STAGES = ("rollouts", "probe", "trace", "attribution", "ablation")

    def __init__(self, out: str | Path, config: RunConfig, log: Callable[[str], None] | None = None, progress: bool = True,
                 overwrite: bool = False):
        self.dir = Path(out)
        self.cfg = config
        self.log = log or stderr_log
        self.progress = progress
        self.overwrite = overwrite
        self.handle: ModelHandle | None = None
        self.stages = Stages(self.dir, self.log)
        self.prompts_hash = ""
        self._imported: dict[str, list[Any]] | None = None
        if self.dir.exists() and not self.dir.is_dir():
            raise MechcliffError(f"--out {self.dir} exists and is not a folder")
        old = self._old_manifest()
        if old is not None and "mechcliff_run" not in old:
            raise MechcliffError(f"{self.dir / 'manifest.json'} is not a mechcliff run manifest; choose another --out")

    def _holds_results(self) -> bool:
        """Whether the folder holds anything a run computed (a finished stage or saved rollouts)."""
        return self.stages.any_done() or any((self.dir / "rollouts").glob("*.jsonl"))

    def _check_imported_unused(self) -> None:
        """Refuse to generate over rollouts ``mechcliff import-rollouts`` put in the folder for a run to use."""
        from mechcliff.rollout_import import IMPORT_REPORT

        report = self.dir / IMPORT_REPORT
        if not report.exists() or self.stages.any_done():
            return
        mine = {Path(f).resolve() for f in self.cfg.rollouts.values()}
        waiting = sorted(p.name for p in (self.dir / "rollouts").glob("*.jsonl")
                         if p.resolve() not in mine and not p.name.endswith(".partial.jsonl"))
        if waiting and not self.overwrite:
            args = " ".join(f"--rollouts {Path(n).stem}={self.dir / 'rollouts' / n}" for n in waiting)
            raise MechcliffError(f"{self.dir} holds imported rollouts ({', '.join(waiting)}; see {report}) that this run "
                                 f"would replace by generating; pass {args}, or --overwrite to generate anyway")

    def _check_same_experiment(self, groups: dict[str, list[Prompt]]) -> None:
        """Refuse to put a different experiment into a folder holding another one's results (unless ``overwrite``).

        Compared with the folder's manifest: every configuration field, the prompts' content, and the model's source
        files (see :func:`model_source`). With ``overwrite`` the stages that depend on a change are recomputed and
        their earlier results replaced; the rest are kept.
        """
        old = self._old_manifest()
        if old is None or not self._holds_results():
            return
        changed = []
        before, now = old.get("config", {}), self.cfg.to_dict()
        for k in now:
            if k in before and before[k] != now[k]:
                changed.append(f"{k} {json.dumps(before[k])} -> {json.dumps(now[k])}")
        old_prompts = old.get("prompts", {})
        for g, ps in groups.items():
            h = content_hash([p.text for p in ps])
            if g in old_prompts and old_prompts[g].get("hash") != h:
                changed.append(f"prompts of group '{g}' (content)")
        if set(old_prompts) and set(old_prompts) != set(groups):
            changed.append(f"prompt groups {sorted(old_prompts)} -> {sorted(groups)}")
        src = model_source(self.cfg.model, self.cfg.adapter)
        if old.get("model_source") not in (None, src):
            changed.append("the model's or adapter's files")
        if not changed:
            return
        if self.overwrite:
            self.log(f"[run] --overwrite: recomputing what depends on: {'; '.join(changed)}")
            return
        raise MechcliffError(
            f"{self.dir} holds a run with another configuration (changed: {'; '.join(changed)}); choose another --out, "
            "or pass --overwrite to recompute the stages that depend on the change (their earlier results are replaced)"
        )

    def _old_manifest(self) -> dict[str, Any] | None:
        path = self.dir / "manifest.json"
        if not path.exists():
            return None
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise MechcliffError(f"cannot read {path} ({exc}); choose another --out or remove the file") from None
        if not isinstance(doc, dict):
            raise MechcliffError(f"{path} is not a mechcliff run manifest; choose another --out")
        return doc

    # ---- stage bookkeeping ----
    def _hash(self, stage: str) -> str:
        """Hash of what ``stage`` depends on: the config fields of it and every earlier stage, and the prompts."""
        upto = self.STAGES[: self.STAGES.index(stage) + 1]
        fields = [name for name, first in RunConfig.stage_of().items() if first in upto]
        return content_hash([self.cfg.stage_hash(*fields), self.prompts_hash])

    def model(self) -> Any:
        if self.handle is None:
            from mechcliff.model.loading import load_model

            self.log(f"loading model '{self.cfg.model}' ...")
            self.handle = load_model(self.cfg.model, seed=self.cfg.seed, verbose=True, adapter=self.cfg.adapter,
                                     think=self.cfg.think_format, dtype=self.cfg.dtype, device_map=self.cfg.device_map,
                                     device=None if self.cfg.device_map is not None else self.cfg.device)
        return self.handle

    # ---- data ----
    def imported_rollouts(self) -> dict[str, list[Any]]:
        """The rollouts of the ``rollouts`` option, by group (at most ``n_per_group`` each; their group set to the
        option's), read once; ``{}`` when every group is generated."""
        if self._imported is None:
            self._imported = {}
            for group, path in self.cfg.rollouts.items():
                try:
                    rolls = load_rollouts(path)
                except MechcliffError as exc:
                    raise MechcliffError(f"rollouts of group '{group}': {exc} (files of other formats are read by "
                                         "'mechcliff import-rollouts FILE --out RUN --group GROUP')") from None
                rolls = rolls[: self.cfg.n_per_group] if self.cfg.n_per_group else rolls
                for r in rolls:
                    r.group = group
                self._imported[group] = rolls
        return self._imported

    def _imported_hash(self) -> str:
        """The content of the imported rollouts the later stages read (their texts, spans and ids; not ``meta``, which
        the rollouts stage writes the refusal verdicts into)."""
        return content_hash([[g, [[r.prompt, r.thinking, r.response, r.has_think_close, r.id, r.category] for r in rs]]
                             for g, rs in self.imported_rollouts().items()])

    def prompt_groups(self) -> dict[str, list[Prompt]]:
        groups: dict[str, list[Prompt]] = {}
        sources = self.cfg.prompts or ({} if self.cfg.rollouts else {g: "" for g in BUILTIN_GROUPS})
        for group, src in sources.items():
            items = prompt_source(src, group=group)
            if self.cfg.n_per_group:
                items = items[: self.cfg.n_per_group]
            if not items:
                raise MechcliffError(f"prompt group '{group}' is empty")
            groups[group] = items
        for group, rolls in self.imported_rollouts().items():  # imported groups: their rollouts' prompts
            groups[group] = [Prompt(text=r.prompt, category=r.category, group=group, id=r.id) for r in rolls]
        hint = (" (import its rollouts with 'mechcliff import-rollouts FILE --out RUN --group harmless' and pass "
                "--rollouts harmless=FILE, or name a prompt file in the config's prompts to generate it)"
                if self.cfg.rollouts else "")
        for needed in ("harmless",):
            if needed not in groups:
                raise MechcliffError(f"the run needs a '{needed}' prompt group; groups given: {', '.join(groups)}{hint}")
        if not any(g in groups for g in ATTACK_GROUPS):
            raise MechcliffError(f"the run needs a 'harmful' or 'harmful_jailbreak' prompt group; got {', '.join(groups)}")
        return groups

    def gen_kwargs(self) -> dict[str, Any]:
        return self.cfg.generation(self.progress)

    # ---- the run ----
    def run(self) -> dict[str, Any]:
        """Run or resume every stage, holding the folder's lock; the manifest records how the run ended
        (``running``, ``finished``, ``interrupted`` or ``failed``)."""
        from mechcliff.runlock import FolderLock

        self.dir.mkdir(parents=True, exist_ok=True)
        with FolderLock(self.dir, "run", log=self.log):
            groups = self.prompt_groups()
            self._check_imported_unused()
            self._check_same_experiment(groups)
            try:
                return self._run(groups)
            except KeyboardInterrupt:
                self._write_manifest(groups, status="interrupted")
                raise
            except BaseException:
                self._write_manifest(groups, status="failed")
                raise

    def _stage(self, name: str, compute: Callable[[], None], load: Callable[[], Any]) -> Any:
        """Load a finished stage's saved results, or compute them (:meth:`mechcliff.stages.Stages.run`)."""
        return self.stages.run(name, self._hash(name), compute, load)

    def _run(self, groups: dict[str, list[Prompt]]) -> dict[str, Any]:
        from mechcliff.judges import get_judge

        t_start = time.time()
        judge = get_judge("refusal")
        self.prompts_hash = content_hash([[g, [p.text for p in ps]] for g, ps in groups.items()])
        if self.cfg.rollouts:  # imported rollouts: their content, not only their prompts
            self.prompts_hash = content_hash([self.prompts_hash, self._imported_hash()])
        self._write_manifest(groups, status="running")

        # 1. rollouts, resumed per group
        rdir = self.dir / "rollouts"
        rollouts = self._stage("rollouts", lambda: self._rollouts(groups, judge),
                               lambda: {g: load_rollouts(rdir / f"{g}.jsonl") for g in groups})
        attack = next(g for g in ATTACK_GROUPS if g in groups)

        # 2. probe
        from mechcliff.probe import LinearProbe

        probe = self._stage("probe", lambda: self._fit_probe(rollouts).save(self.dir / "probe"),
                            lambda: LinearProbe.load(self.dir / "probe"))

        # 3. trace
        from mechcliff.trace import RefusalTrace

        def trace_stage() -> None:
            h = self.model()
            probe.check_model(h)
            from mechcliff.generation import encode_rollouts
            from mechcliff.trace import trace_refusal

            allr = [r for g in groups for r in rollouts[g]]
            batch = encode_rollouts(h, allr, enable_thinking=self.cfg.enable_thinking)
            self.log(f"[trace] {len(allr)} rollouts at layer {probe.layer}")
            tr = trace_refusal(h, batch, probe, groups=[r.group or "" for r in allr], ids=[r.id for r in allr],
                               plateau=self.cfg.plateau, batch_size=self.cfg.batch_size)
            tr.save(self.dir / "trace")

        trace = self._stage("trace", trace_stage, lambda: RefusalTrace.load(self.dir / "trace"))

        # 4. attribution at t_cliff of the attack group
        from mechcliff.attribution import HeadAttribution

        def attribution_stage() -> None:
            h = self.model()
            import torch

            from mechcliff.attribution import direct_probe_attribution
            from mechcliff.generation import encode_rollouts

            rows = [i for i, g in enumerate(trace.groups) if g == attack]
            ar = rollouts[attack]
            batch = encode_rollouts(h, ar, enable_thinking=self.cfg.enable_thinking)
            pos = torch.tensor([int(trace.stats["t_cliff"][i]) + batch.pad_lengths[j] if trace.stats["t_cliff"][i] >= 0
                                else int(batch.position("think_end")[j]) for j, i in enumerate(rows)])
            self.log(f"[attribution] {len(ar)} '{attack}' rollouts at t_cliff")
            dpa = direct_probe_attribution(h, batch, probe, position=pos, batch_size=self.cfg.batch_size,
                                           groups=[attack] * len(ar))
            dpa.save(self.dir / "attribution")

        dpa = self._stage("attribution", attribution_stage, lambda: HeadAttribution.load(self.dir / "attribution"))

        # 5. ablation
        from mechcliff.asr import AblationResult

        def ablation_stage() -> None:
            h = self.model()
            from mechcliff.asr import ablation_experiment

            k = self.cfg.ablation_top_k or max(1, round(0.03 * h.n_layers * h.n_heads))
            heads = dpa.top(k)
            from mechcliff.interventions import GAMMA_MODES

            g_txt = f" γ={self.cfg.ablation_gamma:g}" if self.cfg.ablation_mode in GAMMA_MODES else ""
            self.log(f"[ablation] {self.cfg.ablation_mode}{g_txt} on {', '.join(heads)}")
            ab = ablation_experiment(
                h, heads, groups[attack], groups["harmless"], judge=judge, mode=self.cfg.ablation_mode,
                gamma=self.cfg.ablation_gamma, n_random=self.cfg.n_random_sets, seed=self.cfg.seed,
                before=(self._baseline(attack, rollouts, groups), self._baseline("harmless", rollouts, groups)),
                probe=probe,
                generation=self.gen_kwargs(), progress=self.progress,
            )
            ab.save(self.dir / "ablation")

        ablation = self._stage("ablation", ablation_stage, lambda: AblationResult.load(self.dir / "ablation"))

        from mechcliff.results import _jsonable

        results = _jsonable(self._results(probe, trace, dpa, ablation, attack))  # NaN (undefined) -> null
        atomic_write_text(self.dir / "results.json", json.dumps(results, indent=1, allow_nan=False))
        from mechcliff.report_run import write_run_report

        write_run_report(self.dir, results=results, probe=probe, trace=trace, dpa=dpa, ablation=ablation,
                         ground_truth=self._ground_truth())
        self._write_manifest(groups, status="finished", seconds=time.time() - t_start)
        return results

    def _baseline(self, group: str, rollouts: dict[str, list[Any]], groups: dict[str, list[Prompt]]) -> list[Any]:
        """The unablated model's rollouts of ``group``, which the ablation compares with its ablated ones: the rollouts
        stage's for a generated group. An imported group was written by another model, or with other budgets and
        sampling, than the ablated generation, so comparing with it would measure the difference between the two
        generators, not the ablation's effect: its prompts are generated here with the run's settings."""
        if group not in self.cfg.rollouts:
            return rollouts[group]
        from mechcliff.generation import generate_rollouts

        self.log(f"[ablation] '{group}' was imported: generating the model's own rollouts of its "
                 f"{len(groups[group])} prompts as the unablated baseline")
        return generate_rollouts(self.model(), groups[group], desc=f"{group}, before", **self.gen_kwargs())

    def _rollouts(self, groups: dict[str, list[Prompt]], judge: Any) -> None:
        """Generate and judge each group, saving it as soon as it is done; within a group, each finished batch is
        appended to ``rollouts/<group>.partial.jsonl``. A re-run of the same configuration after an interruption
        keeps the finished groups (``stages/rollouts/<group>.done``) and the finished batches."""
        from mechcliff.data import Rollout
        from mechcliff.generation import generate_rollouts

        rdir, marks = self.dir / "rollouts", self.dir / "stages" / "rollouts"
        key = self._hash("rollouts")
        imported = self.imported_rollouts()
        for g, prompts in groups.items():
            mark, path, partial = marks / f"{g}.done", rdir / f"{g}.jsonl", rdir / f"{g}.partial.jsonl"
            if g in imported:  # written elsewhere: judged (where no verdict came with them), not generated
                rolls = imported[g]
                todo = [r for r in rolls if "refused" not in r.meta]
                for r, flag in zip(todo, judge.judge_many([r.response for r in todo])):
                    r.meta["refused"] = bool(flag)
                self.log(f"[rollouts] {g}: {len(rolls)} imported from {self.cfg.rollouts[g]} ({len(todo)} judged)")
                save_rollouts(rolls, path)
                atomic_write_text(mark, key + "\n")
                continue
            if mark.exists() and mark.read_text().strip() == key and path.exists():
                try:
                    if len(load_rollouts(path)) == len(prompts) * self.cfg.n_samples:
                        self.log(f"[rollouts] {g}: kept from the interrupted run")
                        continue
                except MechcliffError:
                    pass
            done = self._partial_rollouts(partial, key, Rollout)
            samples = f" x {self.cfg.n_samples} samples" if self.cfg.n_samples > 1 else ""
            self.log(f"[rollouts] {g}: {len(prompts)} prompts{samples}"
                     + (f" ({len(done)} kept from the interrupted run)" if done else ""))
            if not done:
                atomic_write_text(partial, json.dumps({"key": key}) + "\n")

            def append(pairs: list[tuple[int, Any]], partial: Path = partial) -> None:
                with open(partial, "a", encoding="utf-8") as f:
                    f.write("".join(json.dumps({"index": i, "rollout": r.to_dict()}, ensure_ascii=False) + "\n"
                                    for i, r in pairs))
                    f.flush()
                    os.fsync(f.fileno())

            rolls = generate_rollouts(self.model(), prompts, desc=g, done=done, on_batch=append, **self.gen_kwargs())
            for r, flag in zip(rolls, judge.judge_many([r.response for r in rolls])):
                r.meta["refused"] = bool(flag)
            save_rollouts(rolls, path)
            atomic_write_text(mark, key + "\n")
            partial.unlink(missing_ok=True)  # our own scratch file, now in rollouts/<group>.jsonl

    @staticmethod
    def _partial_rollouts(partial: Path, key: str, rollout_cls: Any) -> dict[int, Any]:
        """Finished batches of an interrupted group (complete lines only; another configuration's are ignored)."""
        if not partial.exists():
            return {}
        lines = partial.read_text(encoding="utf-8", errors="replace").split("\n")
        try:
            if json.loads(lines[0]).get("key") != key:
                return {}
        except (ValueError, AttributeError):
            return {}
        done: dict[int, Any] = {}
        for line in lines[1:-1]:  # the last piece is "" or a torn line
            try:
                rec = json.loads(line)
                done[int(rec["index"])] = rollout_cls.from_dict(rec["rollout"])
            except (ValueError, KeyError, TypeError, MechcliffError):
                break
        return done

    def _fit_probe(self, rollouts: dict[str, list]) -> Any:
        from mechcliff.generation import encode_rollouts
        from mechcliff.probe import choose_labels, fit_probe

        # the default pool may be absent (runs on other prompt groups fall back to every rollout); a chosen one may not
        missing = [g for g in self.cfg.probe_groups if g not in rollouts]
        if missing and self.cfg.probe_groups != RunConfig().probe_groups:
            raise MechcliffError(f"probe_groups {missing} are not among this run's groups ({', '.join(rollouts)})")
        h = self.model()
        pool = [r for g in self.cfg.probe_groups if g in rollouts for r in rollouts[g]]
        if not pool:
            pool = [r for rs in rollouts.values() for r in rs]
        behaviour = [int(r.meta.get("refused", False)) for r in pool]
        dataset = [int(r.group != "harmless") for r in pool]
        labels, source, note = choose_labels(behaviour, dataset, self.cfg.label_source)
        if note:
            self.log(f"[probe] {note}")
        layer = self.cfg.probe_layer
        batch = encode_rollouts(h, pool, enable_thinking=self.cfg.enable_thinking)
        self.log(f"[probe] {len(pool)} rollouts, {source} labels, layer {layer}")
        return fit_probe(h, batch, labels, layer=layer if layer == "best" else int(layer), position=self.cfg.position,
                         seed=self.cfg.seed, label_source=source, batch_size=self.cfg.batch_size,
                         provenance={"rollouts_hash": content_hash([r.to_dict() for r in pool])})

    def _ground_truth(self) -> Any:
        if self.cfg.model != "organism":
            return None
        from mechcliff.model.organism import OrganismGroundTruth

        return OrganismGroundTruth()

    def _results(self, probe: Any, trace: Any, dpa: Any, ab: Any, attack: str) -> dict[str, Any]:
        from mechcliff.interventions import head_label

        gstats = trace.group_stats()
        n_heads_total = dpa.per_example.shape[1] * dpa.per_example.shape[2]
        scale = float(np.max(np.abs(dpa.logit))) if len(dpa.logit) else 1.0
        res: dict[str, Any] = {
            "model": self.cfg.model,
            "probe": {"layer": probe.layer, "val_accuracy": probe.metrics["val_accuracy"],
                      "val_auroc": probe.metrics["val_auroc"], "label_source": probe.label_source,
                      "position": probe.position,
                      "by_layer": [{k: r[k] for k in ("layer", "val_accuracy", "val_auroc")} for r in probe.metrics["by_layer"]]},
            "cliff": {"plateau": trace.plateau, "groups": {g: {k: s[k] for k in ("n", "plateau_max", "plateau_mean", "final", "ms", "drop", "t_cliff_rel")}
                                                           for g, s in gstats.items()}},
            "attribution": {"group": attack, "position": "t_cliff", "n_examples": int(dpa.per_example.shape[0]),
                            "top_suppression_heads": dpa.top(min(10, n_heads_total)),
                            "top_promotion_heads": dpa.top(min(10, n_heads_total), sign="pos"),
                            "exact": dpa.exact, "exact_max_abs_error": dpa.max_abs_error,
                            "probe_logit_scale": scale, "exact_relative_error": dpa.max_abs_error / max(scale, 1e-12)},
            "ablation": {"heads": ab.heads, "mode": ab.mode, "gamma": ab.gamma, "judge": ab.judge,
                         "group": attack, "asr_before": ab.asr_before["rate"], "asr_before_ci": [ab.asr_before["low"], ab.asr_before["high"]],
                         "asr_after": ab.asr_after["rate"], "asr_after_ci": [ab.asr_after["low"], ab.asr_after["high"]],
                         "asr_random_heads": ab.asr_random_mean, "asr_random_heads_sets": [r["rate"] for r in ab.asr_random],
                         "random_heads": ab.random_heads,
                         # imported groups whose unablated baseline the ablation stage generated (Run._baseline)
                         "baseline_generated": [g for g in (attack, "harmless") if g in self.cfg.rollouts],
                         "harmless_refusal_before": ab.harmless_refusal_before["rate"],
                         "harmless_refusal_after": ab.harmless_refusal_after["rate"],
                         "probe_judge_asr_before": ab.probe_asr_before, "probe_judge_asr_after": ab.probe_asr_after,
                         "asr_by_category_before": {c: r["rate"] for c, r in ab.asr_before["by_category"].items()},
                         "asr_by_category_after": {c: r["rate"] for c, r in ab.asr_after["by_category"].items()}},
        }
        if "per_prompt" in ab.asr_after:  # several samples per prompt: the ASR is over all samples, and per prompt
            res["ablation"].update(n_samples=self.cfg.n_samples, asr_per_prompt_before=ab.asr_before.get("per_prompt"),
                                   asr_per_prompt_after=ab.asr_after["per_prompt"])
        gt = self._ground_truth()
        if gt is not None:
            planted = [head_label(h) for h in gt.planted_suppression_heads]
            res["organism"] = {"planted_suppression_heads": planted,
                               "recovered_top_k": sorted(dpa.top(len(planted))) == sorted(planted)}
        return res

    def _write_manifest(self, groups: dict[str, list[Prompt]], status: str, seconds: float | None = None) -> None:
        old = self._old_manifest() or {}
        h = self.handle
        write_manifest(
            self.dir, "mechcliff_run", status=status, config=self.cfg.to_dict(), prompts=groups, handle=h,
            seconds=seconds,
            seeds={"run": self.cfg.seed, "generation": self.cfg.seed, "probe_split": self.cfg.seed,
                   "random_heads": self.cfg.seed},
            sampling={"temperature": self.cfg.temperature, "top_p": self.cfg.top_p, "n_samples": self.cfg.n_samples,
                      "seed": self.cfg.seed, "greedy": self.cfg.temperature == 0,
                      "seeds": "per sample: SeedSequence([seed, prompt index, sample, phase]), independent of batching "
                               "(mechcliff.generation.Sampling)"},
            model_source=model_source(self.cfg.model, self.cfg.adapter),
            conformance=(h.conformance.to_dict() if h is not None and h.conformance
                         else {"skipped": True} if h is not None else old.get("conformance")),
            stage_seconds={**old.get("stage_seconds", {}), **self.stages.seconds},
            **({"rollouts_source": self._rollouts_sources()} if self.cfg.rollouts else {}),
        )

    def _rollouts_sources(self) -> dict[str, dict[str, Any]]:
        """Where each imported group's rollouts come from: the file the run read, how many it used, and (when
        ``mechcliff import-rollouts`` wrote the file) the file it was imported from, its format and the report."""
        from mechcliff.rollout_import import IMPORT_REPORT

        out: dict[str, dict[str, Any]] = {}
        for g, f in self.cfg.rollouts.items():
            entry: dict[str, Any] = {"file": f, "n": len((self._imported or {}).get(g, []))}
            report = Path(f).resolve().parent.parent / IMPORT_REPORT  # RUN/rollouts/<group>.jsonl -> RUN/import_report.json
            try:
                doc = json.loads(report.read_text(encoding="utf-8"))
                imports = [e for e in doc.get("imports", []) if isinstance(e, dict)]
            except (OSError, ValueError, AttributeError):
                imports = []
            for e in reversed(imports):  # the latest import that wrote this file
                if any(Path(x).resolve() == Path(f).resolve() for x in (e.get("files") or {}).values()):
                    entry.update(imported_from=e.get("source"), format=e.get("format"), formats=e.get("formats"),
                                 import_report=str(report))
                    break
            out[g] = entry
        return out


def run_pipeline(model: str = "organism", out: str | Path = "runs/demo", *, config: RunConfig | None = None,
                 quick: bool = False, progress: bool = True, log: Callable[[str], None] | None = None,
                 overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume) the whole pipeline; returns the ``results.json`` content.

    A folder that holds another configuration's results is refused (:meth:`Run._check_same_experiment`) unless
    ``overwrite``; a folder another run is writing is refused (its lock, :mod:`mechcliff.runlock`)."""
    cfg = config or default_config(model, quick=quick)
    return Run(out, cfg, log=log, progress=progress, overwrite=overwrite).run()


def model_source(model: str, adapter: str | None) -> str:
    """A cheap fingerprint of the files a model and adapter are read from (names, sizes, modification times), so
    that a folder whose weights changed under the same path is not taken for the same experiment; built-in names
    fingerprint as themselves."""
    import hashlib
    import os

    h = hashlib.sha256()
    for spec in (model, adapter):
        if not spec:
            continue
        h.update(spec.encode())
        path = Path(spec).expanduser()
        if spec.startswith((".", "/", "~")) or path.exists():
            files = [path] if path.is_file() else sorted(q for q in path.rglob("*") if q.is_file()) if path.is_dir() else []
            for f in files:
                st = os.stat(f)
                h.update(f"{f.relative_to(path) if f != path else f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]
