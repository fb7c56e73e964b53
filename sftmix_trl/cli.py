"""`sftmix-trl`: the recipes for an installed package, without a clone of the repository.

    sftmix-trl sft|confidence|sftmix|report|evaluate|merge|export|generate --config my.yaml [--key value ...]
    accelerate launch -m sftmix_trl.cli sftmix --config my.yaml [--key value ...]

Each command runs the same main as `recipes/<command>.py` in a clone.
"""

from __future__ import annotations

import importlib
import sys

RECIPES = {
    "sft": "NTP baseline: QLoRA supervised fine-tuning with TRL's SFTTrainer",
    "confidence": "SFTMix stage 1: the reference run and the confidence table",
    "sftmix": "SFTMix: stage 1 (computed or reused), then training with the Mixup regulariser",
    "report": "the data report of an existing stage-1 table: suspicious examples with their text, data map",
    "evaluate": "evaluate a base model or base + adapter through lm-eval-harness (any task) and perplexity",
    "merge": "merge a LoRA adapter into its unquantised base: a standalone model folder",
    "export": "merge, convert to GGUF with llama.cpp's converter, and check it against the merged model",
    "generate": "replies of a base model or base + adapter to a few prompts, through the chat template",
}
USAGE = (
    "usage: sftmix-trl {" + "|".join(RECIPES) + "} [--config FILE.yaml] [--key value ...]\n"
    "       accelerate launch [accelerate options] -m sftmix_trl.cli COMMAND --config FILE.yaml [--key value ...]\n\n"
    + "\n".join(f"  {name:<11} {text}" for name, text in RECIPES.items())
    + "\n\n`sftmix-trl COMMAND --help` lists every field of that command."
)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if argv else 2)
    command = argv[0]
    if command not in RECIPES:
        raise SystemExit(f"error: unknown command {command!r}; expected one of {', '.join(RECIPES)}\n\n{USAGE}")
    recipe = importlib.import_module(f"sftmix_trl.commands.{command}")
    sys.argv = [sys.argv[0], *argv[1:]]  # the recipe parses its own arguments, as `recipes/<command>.py` does
    recipe.run()


if __name__ == "__main__":
    main()
