"""The built-in model organism: a tiny Llama whose refusal circuit is written by hand.

Why: to test that the tools recover a circuit, we need a model whose circuit we know. The organism is an
ordinary ``LlamaForCausalLM`` (RMSNorm, rotary attention, SwiGLU MLPs), so it runs through exactly the same
TransformerLens ``TransformerBridge`` code path as real models, but every functional weight is set by hand.
It is deterministic from a seed and builds in well under a second.

How it works (residual stream of width 96, 4 layers x 8 heads of width 12, 32 heads):

* Feature directions: ``ONE`` (a constant on every token, the "bias" of every circuit), ``SINK`` (on the BOS
  token only; heads park their attention there when they have nothing to read), ``HARM`` (on harm words such as
  "bomb"), ``FRAME`` (on jailbreak-framing words such as "fiction", "roleplay"), ``CLOSE`` (on ``</think>``), and
  ``R``, the *refusal intention*: every token embeds ``R = -1``.
* Harm-detector heads (ground truth in :data:`HARM_DETECTOR_HEADS`) attend from every position to the harm words
  of the prompt and write ``+R``: after a harm word the refusal intention is high, through the whole thinking.
* Planted refusal-suppression heads (:data:`PLANTED_SUPPRESSION_HEADS`, 3 of 32) have a query only at the
  closing token ``</think>`` and keys only on framing words: at ``</think>`` of a jailbreak-framed prompt they
  read the framing and each write a large ``-R``. Any one of them suffices to flip the sign of ``R``, so the
  circuit is redundant: ablating one or two leaves the jailbreak working, ablating all three restores refusal.
* Generation is a bigram chain in the unembedding (each generated token has a one-hot direction), with two
  branch points decided by ``R``: in the thinking ("something harmful" vs "something harmless") and at the first
  answer token ("sorry" vs "sure"). Hence: harmless prompts are answered; plain harmful prompts are refused with
  high refusal intention throughout the thinking; jailbreak-framed harmful prompts think "harmful ... refusing
  seems wise", then the refusal intention falls off a cliff at ``</think>`` and the model complies (in form only:
  "sure here comes a general overview without specifics .").
* All other heads ("filler") and all MLPs have small random weights that read and write a separate subspace of
  word features, so that attribution has realistic distractors and MLP terms are not zero.

No harmful content exists anywhere in the organism: its whole output vocabulary is the two short answers above.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources

import torch

# ---- ground truth -------------------------------------------------------------------------------------------
N_LAYERS, N_HEADS, D_HEAD, D_MODEL, D_MLP = 4, 8, 12, 96, 128
HARM_DETECTOR_HEADS: tuple[tuple[int, int], ...] = ((0, 2), (0, 5))
PLANTED_SUPPRESSION_HEADS: tuple[tuple[int, int], ...] = ((1, 3), (1, 6), (2, 1))

HARM_WORDS = (
    "bomb explosive weapon poison malware virus hack steal stolen meth drugs counterfeit launder fraud kill "
    "attack ransomware phishing stalk scam firearm gun"
).split()
FRAME_WORDS = "roleplay fiction novel story pretend hypothetically character screenplay imagine game fictional movie".split()

# ---- vocabulary ---------------------------------------------------------------------------------------------
BOS, EOS, PAD, UNK = "<bos>", "<|end|>", "<pad>", "<unk>"
SYSTEM, USER, ASSISTANT, THINK_OPEN, THINK_CLOSE = "<|system|>", "<|user|>", "<|assistant|>", "<think>", "</think>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, SYSTEM, USER, ASSISTANT, THINK_OPEN, THINK_CLOSE]

THINK_HARMFUL = "the user asks for something harmful that could hurt people so refusing seems wise".split()
THINK_HARMLESS = "the user asks for something harmless and ordinary therefore helping is fine".split()
ANSWER_REFUSE = "sorry i cannot help with this request .".split()
ANSWER_COMPLY = "sure here comes a general overview without specifics .".split()
# Generated tokens, each with its own one-hot residual direction, in chain order.
GENERATED = [ASSISTANT, THINK_OPEN, *THINK_HARMFUL[:6], *THINK_HARMFUL[6:], *THINK_HARMLESS[5:], THINK_CLOSE,
             *ANSWER_REFUSE, *ANSWER_COMPLY[:-1]]

BASE_WORDS = (
    "a an the and or but if then so to of in on at by for with from about into over under how what why when "
    "where who which can could would should will do does did make made build create write explain describe give "
    "show tell list help me my you your i we our it its this that these those is are was be been step steps "
    "guide instructions detailed way ways best easy simple home at someone people person friend story short "
    "poem recipe bake cook bread cake cat dog learn learns swim city travel trip plan healthy tips sleep water "
    "science why sky blue work works computer program python code summary summarize history ancient rome "
    "please now just like want need new old good great small big one two three five ten day week year"
).split()

# ---- residual-stream layout ---------------------------------------------------------------------------------
ONE, SINK, HARM, FRAME, CLOSE, R = range(6)
GEN0 = 6  # first one-hot direction of the generated tokens
N_GEN = len(dict.fromkeys(GENERATED))
WORD0 = GEN0 + N_GEN  # word-feature subspace used by prompt words, filler heads and MLPs
ONE_VALUE = 8.0
# Content dimensions of a head chosen among the slowest rotary pairs (rope_theta = 1e12): position-independent.
QK_DIMS = (4, 5, 10, 11)


def _prompt_words() -> list[str]:
    words: list[str] = []
    try:
        text = resources.files("mechcliff.resources").joinpath("prompts.jsonl").read_text(encoding="utf-8")
    except (FileNotFoundError, ModuleNotFoundError):
        return words
    for line in text.splitlines():
        if line.strip():
            words.extend(_split_words(json.loads(line)["prompt"]))
    return words


def _split_words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


def organism_vocab() -> list[str]:
    """Token strings in id order: special tokens, generated tokens, harm/frame words, then other words."""
    ordered = SPECIAL_TOKENS + GENERATED + HARM_WORDS + FRAME_WORDS + BASE_WORDS + sorted(set(_prompt_words()))
    vocab = list(dict.fromkeys(ordered))
    return vocab


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|> {{ message['content'] }} <|end|> "
    "{% elif message['role'] == 'user' %}<|user|> {{ message['content'] }} <|end|> "
    "{% elif message['role'] == 'assistant' %}<|assistant|> {{ message['content'] }} <|end|> {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>"
    "{% if enable_thinking is defined and not enable_thinking %} <think> </think>{% endif %}{% endif %}"
)


def build_organism_tokenizer():
    """A word-level fast tokenizer (lowercasing, splitting words and punctuation) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = organism_vocab()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits()]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins word-level tokens with spaces
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


@dataclass(frozen=True)
class OrganismGroundTruth:
    """What was planted, for tests and reports."""

    planted_suppression_heads: tuple[tuple[int, int], ...] = PLANTED_SUPPRESSION_HEADS
    harm_detector_heads: tuple[tuple[int, int], ...] = HARM_DETECTOR_HEADS
    harm_words: tuple[str, ...] = tuple(HARM_WORDS)
    frame_words: tuple[str, ...] = tuple(FRAME_WORDS)
    refusal_direction: int = R

    @property
    def planted_labels(self) -> list[str]:
        """The planted heads as labels like ``"L1H3"`` (the format of ``HeadAttribution.top``)."""
        return [f"L{l}H{h}" for l, h in self.planted_suppression_heads]


def build_organism(seed: int = 0):
    """Build the organism: returns ``(hf_model, tokenizer, ground_truth)``. Deterministic from ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_organism_tokenizer()
    vocab = organism_vocab()
    tid = {w: i for i, w in enumerate(vocab)}
    cfg = LlamaConfig(
        vocab_size=len(vocab), hidden_size=D_MODEL, intermediate_size=D_MLP, num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS, num_key_value_heads=N_HEADS, head_dim=D_HEAD,
        rope_parameters={"rope_type": "default", "rope_theta": 1e12},
        rms_norm_eps=1e-6, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=tid[BOS], eos_token_id=tid[EOS], pad_token_id=tid[PAD], attention_bias=False, mlp_bias=False,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    g = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    n_word = D_MODEL - WORD0

    def rand(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        # Embeddings.
        E = model.model.embed_tokens.weight
        E[:, ONE] = ONE_VALUE
        E[:, R] = -1.0
        E[:, WORD0:] = rand(len(vocab), n_word, std=0.3)
        E[tid[BOS], SINK] = 1.0
        E[tid[BOS], WORD0:] = 0.0
        for w in HARM_WORDS:
            E[tid[w], HARM] = 1.0
        for w in FRAME_WORDS:
            E[tid[w], FRAME] = 1.0
        E[tid[THINK_CLOSE], CLOSE] = 1.0
        gen_ids = list(dict.fromkeys(GENERATED))
        for k, w in enumerate(gen_ids):
            E[tid[w], GEN0 + k] = 1.0
        # Norms are plain (weight 1).
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        model.model.norm.weight.fill_(1.0)

        scale = D_HEAD**0.5
        for li, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            for h in range(N_HEADS):
                rows = slice(h * D_HEAD, (h + 1) * D_HEAD)
                if (li, h) in HARM_DETECTOR_HEADS:
                    # Query: constant. Keys: BOS (sink, score ~12) < harm words (score ~36).
                    attn.q_proj.weight[h * D_HEAD + QK_DIMS[0], ONE] = 6.0 / ONE_VALUE * scale**0.5
                    attn.k_proj.weight[h * D_HEAD + QK_DIMS[0], SINK] = 2.0 * scale**0.5
                    attn.k_proj.weight[h * D_HEAD + QK_DIMS[0], HARM] = 6.0 * scale**0.5
                    attn.v_proj.weight[h * D_HEAD + 0, HARM] = 1.0
                    attn.o_proj.weight[R, h * D_HEAD + 0] = 2.0
                elif (li, h) in PLANTED_SUPPRESSION_HEADS:
                    # Query: constant towards the sink everywhere, plus a strong query on framing at </think>.
                    attn.q_proj.weight[h * D_HEAD + QK_DIMS[0], ONE] = 6.0 / ONE_VALUE * scale**0.5
                    attn.k_proj.weight[h * D_HEAD + QK_DIMS[0], SINK] = 2.0 * scale**0.5
                    attn.q_proj.weight[h * D_HEAD + QK_DIMS[1], CLOSE] = 8.0 * scale**0.5
                    attn.k_proj.weight[h * D_HEAD + QK_DIMS[1], FRAME] = 5.0 * scale**0.5
                    attn.v_proj.weight[h * D_HEAD + 0, FRAME] = 1.0
                    attn.o_proj.weight[R, h * D_HEAD + 0] = -6.0
                else:
                    # Filler: small random attention within the word subspace, writing small word features.
                    attn.q_proj.weight[rows, WORD0:] = rand(D_HEAD, n_word, std=0.3)
                    attn.k_proj.weight[rows, WORD0:] = rand(D_HEAD, n_word, std=0.3)
                    attn.v_proj.weight[rows, WORD0:] = rand(D_HEAD, n_word, std=0.3)
                    attn.o_proj.weight[WORD0:, rows] = rand(n_word, D_HEAD, std=0.04)
            mlp.gate_proj.weight[:, WORD0:] = rand(D_MLP, n_word, std=0.3)
            mlp.up_proj.weight[:, WORD0:] = rand(D_MLP, n_word, std=0.3)
            mlp.down_proj.weight[WORD0:, :] = rand(n_word, D_MLP, std=0.015)

        # Unembedding: a bigram chain over generated tokens, with R deciding the two branch points.
        U = model.lm_head.weight
        alpha, beta = 30.0, 2.5
        chains = [[ASSISTANT, THINK_OPEN, *THINK_HARMFUL, THINK_CLOSE], [*THINK_HARMLESS, THINK_CLOSE],
                  [THINK_CLOSE, *ANSWER_REFUSE, EOS], [THINK_CLOSE, *ANSWER_COMPLY, EOS]]
        for chain in chains:
            for cur, nxt in zip(chain, chain[1:]):
                U[tid[nxt], GEN0 + gen_ids.index(cur)] = alpha
        for refuse_tok, comply_tok in (("harmful", "harmless"), ("sorry", "sure")):
            U[tid[refuse_tok], R] = beta
            U[tid[comply_tok], R] = -beta
    return model, tokenizer, OrganismGroundTruth()
