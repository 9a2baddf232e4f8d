"""Shared fixtures for the fast test tier.

Everything here is built in code: the organism (hand-built tiny Llama) and a few tiny random-weight Hugging Face
models (Llama with GQA, Qwen2 with attention biases, Qwen3, Gemma3 text) that reuse the organism's word-level
tokenizer. Nothing is downloaded. Expensive objects are session-scoped and shared by all test modules.
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


@pytest.fixture(autouse=True)
def _seed_everything():
    """Seed torch, numpy and random before every test (tests must not depend on execution order)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def organism():
    """The built-in model organism (seed 0), loaded through ``load_model`` with the conformance check."""
    from mechcliff.model.loading import load_model

    return load_model("organism")


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
    """Builder ``tiny_hf(kind, tokenizer)`` -> a fresh (unwrapped) tiny HF model; same weights as ``tiny_models(kind)``."""
    return _tiny_hf


@pytest.fixture(scope="session")
def tiny_models():
    """Factory ``tiny_models(kind)`` -> ModelHandle, for kind in TINY_KINDS; each model is built once per session."""
    from mechcliff.model.loading import load_model
    from mechcliff.model.organism import build_organism_tokenizer

    cache: dict[str, object] = {}

    def get(kind: str):
        if kind not in cache:
            tok = build_organism_tokenizer()
            cache[kind] = load_model(model=_tiny_hf(kind, tok), tokenizer=tok, name=f"tiny-{kind}")
        return cache[kind]

    return get
