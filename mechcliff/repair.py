"""Repair: supervised fine-tuning on selected safety examples (Cliff-as-a-Judge, arXiv 2510.06036).

Targets follow the authors' recipe (``src/train/create_data.py``): for a harmful prompt, the model's *own*
thinking followed by a refusal answer; mixed with ordinary examples (the model's own thinking and answer on
harmless prompts) so that harmless ability is kept. The loss is the mean cross-entropy of every token after the
generation prompt (thinking, closing template, answer and an end-of-turn token).

Training runs on a fresh copy of the base weights (never on a loaded handle's weights), with LoRA adapters
(``peft``) by default or full fine-tuning as an option, seeded (adapter initialisation and batch order), with a
progress bar and checkpoints. The output folder holds ``adapter/`` (load it with
``load_model(spec, adapter=folder)``), ``checkpoints/step-N/`` and ``training/`` (a :class:`FinetuneResult`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from mechcliff.data import Rollout, atomic_write_text, content_hash
from mechcliff.errors import MechcliffError
from mechcliff.results import Result

if TYPE_CHECKING:
    from mechcliff.model.handle import ModelHandle

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
DEFAULT_REFUSAL = "I'm sorry, but I can't help with that request."


@dataclasses.dataclass
class TrainExample:
    """One SFT example: the prompt, the thinking to keep, and the answer to learn. ``kind``: safety or mix."""

    prompt: str
    thinking: str | None
    answer: str
    kind: str = "safety"


@dataclasses.dataclass
class FinetuneConfig:
    """Fine-tuning options. Steps = max(``min_steps``, ceil(``epochs`` × examples / ``batch_size``)), capped by
    ``max_steps``; small selections therefore still get ``min_steps`` updates (budgets differ in data, and only
    above that floor in compute)."""

    method: str = "lora"  # "lora" or "full"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    lr: float = 1e-3
    weight_decay: float = 0.0
    epochs: float = 3.0
    min_steps: int = 30
    max_steps: int | None = None
    batch_size: int = 8
    max_grad_norm: float = 1.0
    warmup_ratio: float = 0.1  # linear warm-up over this share of the steps, then cosine decay to 0
    checkpoint_every: int = 0  # 0: only the final adapter
    seed: int = 0

    def validate(self) -> None:
        if self.method not in ("lora", "full"):
            raise MechcliffError(f"fine-tuning method must be 'lora' or 'full', not {self.method!r}")
        for name in ("lora_r", "batch_size", "min_steps"):
            if int(getattr(self, name)) < 1:
                raise MechcliffError(f"fine-tuning option '{name}' must be at least 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise MechcliffError(f"learning rate must be a positive number, got {self.lr!r}")
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            raise MechcliffError(f"epochs must be positive, got {self.epochs!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise MechcliffError("max_steps must be at least 1 (or None)")

    def n_steps(self, n_examples: int) -> int:
        steps = max(self.min_steps, math.ceil(self.epochs * n_examples / self.batch_size))
        return min(steps, self.max_steps) if self.max_steps else steps

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d


def refusal_answer(rollouts: Sequence[Rollout], judge: Any = None, default: str = DEFAULT_REFUSAL) -> str:
    """The refusal to train on: the model's most frequent refused answer in ``rollouts`` (judged by ``judge``,
    default the refusal-phrase judge), else ``default``."""
    from collections import Counter

    from mechcliff.judges import get_judge

    judge = judge or get_judge("refusal")
    refused = [r.response.strip() for r, f in zip(rollouts, judge.judge_many([r.response for r in rollouts])) if f]
    return Counter(refused).most_common(1)[0][0] if refused else default


def build_examples(selected: Sequence[Rollout], harmless: Sequence[Rollout], *, refusal: str, mix_ratio: float = 1.0,
                   min_mix: int = 8, seed: int = 0) -> list[TrainExample]:
    """Safety examples (own thinking + ``refusal``) for ``selected``, plus ``max(min_mix, ceil(mix_ratio ×
    len(selected)))`` harmless examples (own thinking + own answer) drawn without replacement (seeded), as many as
    there are. The floor keeps tiny selections from overwriting ordinary behaviour."""
    if not selected:
        raise MechcliffError("no selected examples to train on")
    if not (math.isfinite(mix_ratio) and mix_ratio >= 0):
        raise MechcliffError(f"mix_ratio must be >= 0, got {mix_ratio!r}")
    out = [TrainExample(r.prompt, r.thinking, refusal, "safety") for r in selected]
    n_mix = min(len(harmless), max(int(min_mix), math.ceil(mix_ratio * len(selected)))) if mix_ratio > 0 else 0
    if n_mix:
        rng = np.random.default_rng(seed)
        for i in rng.permutation(len(harmless))[:n_mix]:
            r = harmless[int(i)]
            out.append(TrainExample(r.prompt, r.thinking, r.response, "mix"))
    return out


@dataclasses.dataclass
class FinetuneResult(Result):
    """What a fine-tuning run did: losses per step, its config, data hash and where the adapter is."""

    KIND = "finetune"
    losses: np.ndarray
    config: dict[str, Any]
    base_model: dict[str, Any]
    examples_hash: str
    n_safety: int
    n_mix: int
    adapter_dir: str
    seconds: float
    trainable_parameters: int = 0
    checkpoints: list[str] = dataclasses.field(default_factory=list)

    def plot(self):
        import plotly.graph_objects as go

        from mechcliff.plotting import TEMPLATE

        fig = go.Figure(go.Scatter(x=np.arange(1, len(self.losses) + 1), y=self.losses, mode="lines", name="loss"))
        fig.update_layout(template=TEMPLATE, title=f"Fine-tuning loss ({self.config.get('method')}, "
                          f"{self.n_safety} safety + {self.n_mix} mix examples)",
                          xaxis_title="optimizer step", yaxis_title="cross-entropy (nats/token)")
        return fig

    def summary_rows(self) -> list[tuple[str, str]]:
        first, last = (float(self.losses[0]), float(self.losses[-1])) if len(self.losses) else (float("nan"),) * 2
        return [("method", str(self.config.get("method"))), ("steps", str(len(self.losses))),
                ("loss first → last", f"{first:.3f} → {last:.3f}"), ("adapter", self.adapter_dir)]


def _training_batch(handle: ModelHandle, items: Sequence[TrainExample], enable_thinking: bool) -> dict[str, torch.Tensor]:
    """Tokens with labels on everything after the generation prompt, plus an end-of-turn token."""
    from mechcliff.chat import encode

    tok = handle.tokenizer
    b = encode(handle, [e.prompt for e in items], thinking=[e.thinking for e in items],
               answers=[e.answer for e in items], enable_thinking=enable_thinking)
    eos = tok.convert_tokens_to_ids(tok.eos_token) if tok.eos_token is not None else None
    toks, mask = b.tokens, b.attention_mask
    if eos is not None:
        toks = torch.cat([toks, torch.full((len(items), 1), eos, dtype=toks.dtype)], 1)
        mask = torch.cat([mask, torch.ones((len(items), 1), dtype=mask.dtype)], 1)
    labels = torch.full_like(toks, -100)
    for j in range(len(items)):
        start = b.spans[j]["prefix"][1]
        labels[j, start:] = toks[j, start:]
    labels[mask == 0] = -100
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": toks, "attention_mask": mask, "labels": labels, "position_ids": position_ids}


def finetune(handle: ModelHandle, examples: Sequence[TrainExample], out: str | Path, config: FinetuneConfig | None = None, *,
             enable_thinking: bool = True, progress: bool = True, desc: str = "fine-tuning") -> FinetuneResult:
    """Fine-tune a fresh copy of ``handle``'s base weights on ``examples``; write ``out/adapter`` and return the
    :class:`FinetuneResult` (also saved as ``out/training``). ``handle`` supplies the model spec and chat format."""
    from mechcliff.model.loading import load_hf_model, weights_fingerprint

    cfg = config or FinetuneConfig()
    cfg.validate()
    if not examples:
        raise MechcliffError("no examples to fine-tune on")
    spec = handle.extra.get("spec")
    if spec is None:
        raise MechcliffError("fine-tuning needs a model loaded from a spec (organism, alias, folder or .gguf), "
                             "so that a fresh copy of its weights can be trained")
    out = Path(out)
    torch.manual_seed(cfg.seed)
    hf, _, _, _ = load_hf_model(spec, seed=int(handle.extra.get("seed", 0)))
    if "adapter" in handle.extra:
        from mechcliff.model.loading import apply_adapter

        hf = apply_adapter(hf, handle.extra["adapter"])
    base_hash = weights_fingerprint(hf)
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        names = {n.rsplit(".", 1)[-1] for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear)}
        missing = [t for t in cfg.target_modules if t not in names]
        if missing:
            raise MechcliffError(f"LoRA target modules {missing} are not linear layers of this model; "
                                 f"linear layers: {', '.join(sorted(names))}")
        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(hf, lcfg)
    else:
        model = hf
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.n_steps(len(examples))
    warm = max(1, int(round(cfg.warmup_ratio * steps)))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: (i + 1) / warm if i < warm else 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, steps - warm))))
    rng = np.random.default_rng(cfg.seed)
    order: list[int] = []
    losses: list[float] = []
    checkpoints: list[str] = []
    t0 = time.time()
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        idx: list[int] = []
        while len(idx) < min(cfg.batch_size, len(examples)):
            if not order:
                order = [int(i) for i in rng.permutation(len(examples))]
            idx.append(order.pop())
        batch = _training_batch(handle, [examples[i] for i in idx], enable_thinking)
        loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise MechcliffError(f"the training loss became {float(loss)} at step {step + 1}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
            ck = out / "checkpoints" / f"step-{step + 1}"
            _save_weights(model, ck, cfg)
            checkpoints.append(str(ck))
    model.eval()
    _save_weights(model, out / "adapter", cfg)
    res = FinetuneResult(
        losses=np.asarray(losses, dtype=np.float64), config=cfg.to_dict(),
        base_model={"spec": spec, "model_id": handle.model_id, "weights_hash": base_hash},
        examples_hash=content_hash([dataclasses.asdict(e) for e in examples]),
        n_safety=sum(e.kind == "safety" for e in examples), n_mix=sum(e.kind == "mix" for e in examples),
        adapter_dir=str(out / "adapter"), seconds=round(time.time() - t0, 2),
        trainable_parameters=int(sum(p.numel() for p in params)), checkpoints=checkpoints,
    )
    res.save(out / "training")
    atomic_write_text(out / "examples.jsonl", "".join(json.dumps(dataclasses.asdict(e)) + "\n" for e in examples))
    return res


def _save_weights(model: Any, path: Path, cfg: FinetuneConfig) -> None:
    """LoRA: the PEFT adapter files; full: every weight as ``model.safetensors``. Written to a temporary folder
    first and renamed, so a folder that exists is complete."""
    import shutil

    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if cfg.method == "lora":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(str(tmp))
    else:
        from safetensors.torch import save_model

        save_model(model, str(tmp / "model.safetensors"))  # de-duplicates tied weights
    atomic_write_text(tmp / "finetune_config.json", json.dumps(cfg.to_dict(), indent=1))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
