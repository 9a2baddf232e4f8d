"""Shared fixtures for the fast test tier.

Everything here is built in code: the organism (hand-built tiny Llama) and a few tiny random-weight Hugging Face
models (Llama with GQA, Qwen2 with attention biases, Qwen3, Gemma3 text) that reuse the organism's word-level
tokenizer. Nothing is downloaded. Expensive objects are session-scoped and shared by all test modules.

Tiers: every test carries exactly one of the markers ``unit`` (needs no model at all), ``organism`` (the organism or
the tiny random models below) and ``integration`` (real SmolLM2 weights; excluded by default), as a module-level
``pytestmark`` or a decorator. The few model-free tests that start a program outside Python (Chromium, a Jupyter
kernel) are ``unit`` and also ``external``: they take tens of seconds, and ``make test-unit`` (``pytest -m "unit and
not external"``) is the tier that runs in seconds.
Collection fails, naming the tests, when one has no tier or two, or when a ``unit`` test requests a model fixture
(:data:`MODEL_FIXTURES`); a ``unit`` test that builds a Hugging Face model itself fails when it does.

Device: ``pytest --device cuda`` (default ``cpu``; any torch device string) loads the shared model fixtures
(``organism``, ``tiny_models``, the integration tier's SmolLM2) onto that device and the tests run unchanged; the
choice is the session fixture ``device``. Models that a test builds or loads itself stay on the CPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import random

import numpy as np
import pytest
import torch

# The models here are tiny: one thread is as fast as two when the machine is idle and many times faster when other
# processes compete for the cores (multi-threaded BLAS spin-waits), so the suite's time stays predictable.
torch.set_num_threads(1)

TIERS = ("unit", "organism", "integration")

# Fixtures that build or load a model (directly or through another fixture); a `unit` test may request none of them.
# item.fixturenames is the whole closure, so a test module's own fixture on top of one of these is caught too.
MODEL_FIXTURES = frozenset({
    "organism", "organism_rollouts", "organism_batch", "organism_labels", "organism_probe",
    "tiny_hf", "tiny_models", "smol",
})


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="torch device of the model fixtures (organism, tiny models, SmolLM2): cpu (default), cuda, "
                          "cuda:1, mps ...")


def pytest_configure(config):
    device = config.getoption("--device")
    try:
        torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise pytest.UsageError(f"--device {device!r} is not a torch device: {e}") from None
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--device {device}: torch sees no CUDA device (torch {torch.__version__})")


@pytest.hookimpl(tryfirst=True)  # before -m deselects: every collected test is checked, whatever tier is run
def pytest_collection_modifyitems(config, items):
    """Every test carries exactly one tier; a `unit` test requests no model fixture."""
    problems = []
    for item in items:
        tiers = sorted({m.name for m in item.iter_markers() if m.name in TIERS})
        if len(tiers) != 1:
            problems.append(f"{item.nodeid}: {'tiers ' + ', '.join(tiers) if tiers else 'no tier'}")
        elif tiers == ["unit"] and MODEL_FIXTURES.intersection(item.fixturenames):
            used = ", ".join(sorted(MODEL_FIXTURES.intersection(item.fixturenames)))
            problems.append(f"{item.nodeid}: marked unit but uses the model fixture(s) {used}")
    if problems:
        raise pytest.UsageError(
            "test tiers: every test needs exactly one of the markers " + ", ".join(TIERS) + " (a module-level "
            "`pytestmark` or a decorator; unit = no model at all, organism = the organism or the tiny models of "
            "tests/conftest.py, integration = real SmolLM2 weights):\n  " + "\n  ".join(problems))


class ModelInUnitTest(RuntimeError):
    """A test marked ``unit`` built a Hugging Face model."""


@pytest.fixture(autouse=True)
def _unit_tests_build_no_model(request):
    """In a `unit` test, building any Hugging Face model (the organism, a tiny model, SmolLM2) raises and fails it.

    Patches ``torch.nn.Module.__init__`` for the test's duration (cheap, and needs no import of transformers): every
    model class derives from ``PreTrainedModel``. The test also fails when it catches the error itself.
    """
    if request.node.get_closest_marker("unit") is None:
        yield
        return
    original, built = torch.nn.Module.__init__, []

    def guarded_init(self, *args, **kwargs):
        if any(c.__name__ == "PreTrainedModel" for c in type(self).__mro__):
            built.append(type(self).__name__)
            raise ModelInUnitTest(f"{request.node.nodeid} is marked unit but builds a model ({type(self).__name__}); "
                                  "mark it organism (or integration)")
        original(self, *args, **kwargs)

    torch.nn.Module.__init__ = guarded_init
    try:
        yield
    finally:
        torch.nn.Module.__init__ = original
    if built:
        pytest.fail(f"marked unit but builds a model ({', '.join(sorted(set(built)))}); mark it organism", False)


@pytest.fixture(scope="session")
def device(request) -> str:
    """The torch device of the model fixtures: ``pytest --device`` (default ``cpu``)."""
    return request.config.getoption("--device")


@pytest.fixture(autouse=True)
def _seed_everything():
    """Seed torch, numpy and random before every test (tests must not depend on execution order)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def organism(device):
    """The built-in model organism (seed 0), loaded through ``load_model`` with the conformance check, on ``device``."""
    from mechcliff.model.loading import load_model

    return load_model("organism", device=device)


@pytest.fixture(scope="session")
def builtin():
    """The built-in prompt set (120 prompts: 40 harmless, 40 harmful, 40 harmful_jailbreak)."""
    from mechcliff.data import builtin_prompts

    return builtin_prompts()


@pytest.fixture(scope="session")
def organism_rollouts(organism, builtin):
    """Greedy rollouts of the organism on the built-in prompts (same order as ``builtin``)."""
    from mechcliff.generation import generate_rollouts

    return generate_rollouts(organism, builtin, progress=False, batch_size=64)


@pytest.fixture(scope="session")
def organism_batch(organism, organism_rollouts):
    """The organism rollouts, encoded token-exactly (left padded)."""
    from mechcliff.generation import encode_rollouts

    return encode_rollouts(organism, organism_rollouts)


@pytest.fixture(scope="session")
def refusal_judge():
    from mechcliff.judges import get_judge

    return get_judge("refusal")


@pytest.fixture(scope="session")
def organism_labels(organism_rollouts, refusal_judge):
    """Behaviour labels of the organism rollouts: 1 = refused, 0 = complied."""
    return [int(f) for f in refusal_judge.judge_many([r.response for r in organism_rollouts])]


@pytest.fixture(scope="session")
def organism_probe(organism, organism_batch, organism_labels):
    """The refusal probe fitted on all organism rollouts with behaviour labels (layer sweep)."""
    from mechcliff.probe import fit_probe

    return fit_probe(organism, organism_batch, organism_labels, seed=0)


# ---- tiny random-weight models ------------------------------------------------------------------------------

TINY_KINDS = ("llama_gqa", "qwen2", "qwen3", "gemma3")


def _tiny_hf(kind: str, tok):
    """A tiny random-weight HF causal LM of ``kind`` whose vocabulary is the organism tokenizer's."""
    import transformers as tf

    common = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False, initializer_range=0.2,
    )
    if kind == "llama_gqa":
        cfg, cls = tf.LlamaConfig(**common, attention_bias=False), tf.LlamaForCausalLM
    elif kind == "qwen2":
        cfg, cls = tf.Qwen2Config(**common), tf.Qwen2ForCausalLM  # q/k/v projections carry biases
    elif kind == "qwen3":
        cfg, cls = tf.Qwen3Config(**common), tf.Qwen3ForCausalLM
    elif kind == "gemma3":
        cfg = tf.Gemma3TextConfig(**common, sliding_window=16, query_pre_attn_scalar=16)
        cls = tf.Gemma3ForCausalLM
    else:  # pragma: no cover - test bug
        raise ValueError(kind)
    cfg.architectures = [cls.__name__]
    torch.manual_seed(1234 + TINY_KINDS.index(kind))
    model = cls(cfg).eval()
    if kind == "qwen2":
        # Default init zeroes biases; make them non-zero so attribution really has to account for them.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="session")
def tiny_hf():
    """Builder ``tiny_hf(kind, tokenizer)`` -> a fresh (unwrapped) tiny HF model; same weights as ``tiny_models(kind)``.

    On the CPU, like any freshly built HF model: its users save it or pass it to ``load_model``, which places it."""
    return _tiny_hf


@pytest.fixture(scope="session")
def tiny_models(device):
    """Factory ``tiny_models(kind)`` -> ModelHandle on ``device``, for kind in TINY_KINDS; each built once per session."""
    from mechcliff.model.loading import load_model
    from mechcliff.model.organism import build_organism_tokenizer

    cache: dict[str, object] = {}

    def get(kind: str):
        if kind not in cache:
            tok = build_organism_tokenizer()
            cache[kind] = load_model(model=_tiny_hf(kind, tok), tokenizer=tok, name=f"tiny-{kind}", device=device)
        return cache[kind]

    return get
