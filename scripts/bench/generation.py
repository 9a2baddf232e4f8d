"""Benchmark: mechcliff's batched generation (through the TransformerBridge) vs plain Hugging Face ``generate``.

    python scripts/bench/generation.py [--model smollm2-135m-instruct] [--batch 16] [--new-tokens 32] [--json]

Same weights, same left-padded chat-formatted batch, greedy, a fixed number of new tokens (``min_new_tokens``):
one model as mechcliff loads it (HF modules wrapped by the bridge, hooks live) and one plain HF copy. Prints
tokens/s of each and their ratio; ``--json`` adds one JSON object on the last line with key
``tokens_per_s_ratio_vs_hf``. Outputs are checked to be identical.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings


def main() -> None:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    from mechcliff import builtin_prompts, encode, load_model
    from mechcliff.model.organism import build_organism

    if args.model == "organism":
        plain = build_organism()[0]
        h = load_model("organism", check=False)
    else:
        h = load_model(args.model, check=False)
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(h.hf_model.config._name_or_path, dtype=torch.float32).eval()
    prompts = [p.text for p in builtin_prompts()][: args.batch]
    batch = encode(h, prompts, open_thinking=True)
    kw = dict(attention_mask=batch.attention_mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
              do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=h.tokenizer.pad_token_id)

    def timed(model):
        best, out = float("inf"), None
        for _ in range(args.repeats):
            t = time.perf_counter()
            with torch.no_grad():
                out = model.generate(batch.tokens, **kw)
            best = min(best, time.perf_counter() - t)
        return best, out

    t_ours, out_ours = timed(h.hf_model)
    t_hf, out_hf = timed(plain)
    n = args.batch * args.new_tokens
    ours_tps, hf_tps = n / t_ours, n / t_hf
    print(f"model {args.model}: batch {args.batch}, {args.new_tokens} new tokens each, greedy")
    print(f"{'generation':34s} {'tokens/s':>9s}")
    print(f"{'mechcliff (bridge-wrapped HF)':34s} {ours_tps:9.1f}")
    print(f"{'plain Hugging Face generate':34s} {hf_tps:9.1f}")
    print(f"ratio {ours_tps / hf_tps:.2f}; identical outputs: {torch.equal(out_ours, out_hf)}")
    if args.json:
        print(json.dumps({"model": args.model, "tokens_per_s_ratio_vs_hf": ours_tps / hf_tps,
                          "tokens_per_s": ours_tps, "hf_tokens_per_s": hf_tps,
                          "identical": bool(torch.equal(out_ours, out_hf))}))


if __name__ == "__main__":
    main()
