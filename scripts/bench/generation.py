"""Benchmark: mechcliff's batched generation (through the TransformerBridge) vs plain Hugging Face ``generate``.

    python scripts/bench/generation.py [--model smollm2-135m-instruct] [--batch 16] [--new-tokens 32] [--json]
        [--heads L0H0,L1H2] [--mode zero]

Same weights, same left-padded chat-formatted batch, greedy, a fixed number of new tokens (``min_new_tokens``):
one model as mechcliff loads it (HF modules wrapped by the bridge, hooks live) and one plain HF copy. Prints
tokens/s of each and their ratio; ``--json`` adds one JSON object on the last line with key
``tokens_per_s_ratio_vs_hf``. Outputs are checked to be identical.

Ablated generation (``--heads`` under ``--mode``, default zero-ablation of two heads), side by side in the same
run: *hooked* (the bridge-wrapped model under :func:`mechcliff.interventions.intervene`) and *folded* (the
intervention folded into a copy's weights, :func:`mechcliff.folding.fold`, plain HF ``generate`` without hooks),
each as tokens/s and as a ratio to plain HF ``generate`` of the unablated model; the JSON line adds
``folded_ablation_ratio_vs_hf``, ``hooked_ablation_ratio_vs_hf`` and ``folded_identical_to_hooked`` (the greedy
tokens of the two ablated paths are the same).
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
    ap.add_argument("--heads", default="L0H0,L1H2", help="heads ablated in the ablated-generation rows")
    ap.add_argument("--mode", default="zero", help="intervention mode of the ablated rows (a foldable one)")
    args = ap.parse_args()

    import torch

    from mechcliff import builtin_prompts, encode, load_model
    from mechcliff.folding import fold
    from mechcliff.interventions import intervene
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
    heads = [x for x in args.heads.split(",") if x]
    with intervene(h, heads, mode=args.mode):
        t_hooked, out_hooked = timed(h.hf_model)
    folded = fold(h, heads, mode=args.mode)
    t_folded, out_folded = timed(folded.model)
    n = args.batch * args.new_tokens
    ours_tps, hf_tps = n / t_ours, n / t_hf
    hooked_tps, folded_tps = n / t_hooked, n / t_folded
    same = bool(torch.equal(out_folded, out_hooked))
    print(f"model {args.model}: batch {args.batch}, {args.new_tokens} new tokens each, greedy")
    print(f"{'generation':44s} {'tokens/s':>9s} {'vs HF':>6s}")
    print(f"{'plain Hugging Face generate':44s} {hf_tps:9.1f} {1.0:6.2f}")
    print(f"{'mechcliff (bridge-wrapped HF)':44s} {ours_tps:9.1f} {ours_tps / hf_tps:6.2f}")
    print(f"{f'ablated {args.mode} {args.heads}, hooked (intervene)':44s} {hooked_tps:9.1f} {hooked_tps / hf_tps:6.2f}")
    print(f"{f'ablated {args.mode} {args.heads}, folded (plain HF)':44s} {folded_tps:9.1f} {folded_tps / hf_tps:6.2f}")
    print(f"ratio {ours_tps / hf_tps:.2f}; identical outputs: {torch.equal(out_ours, out_hf)}; "
          f"folded identical to hooked: {same}")
    if args.json:
        print(json.dumps({"model": args.model, "tokens_per_s_ratio_vs_hf": ours_tps / hf_tps,
                          "tokens_per_s": ours_tps, "hf_tokens_per_s": hf_tps,
                          "identical": bool(torch.equal(out_ours, out_hf)),
                          "folded_ablation_ratio_vs_hf": folded_tps / hf_tps,
                          "hooked_ablation_ratio_vs_hf": hooked_tps / hf_tps,
                          "folded_identical_to_hooked": same, "ablation": {"heads": heads, "mode": args.mode}}))

if __name__ == "__main__":
    main()
