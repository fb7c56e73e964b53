"""Replies of a base model, or a base + saved LoRA adapter, to a few prompts, through the chat template: a first
look at what training changed. Greedy by default.

sftmix-trl generate --adapter_path outputs/demo/sftmix_qlora --prompt "What causes anaemia?"
python recipes/generate.py --adapter_path ADAPTER --prompts_file prompts.txt [--do_sample true --temperature 0.7]

The base is the one the adapter records unless `--model_name_or_path` says otherwise, loaded as for evaluation
(4-bit by default: `--load_in_4bit false` for the 16/32-bit base).
"""

from __future__ import annotations

from sftmix_trl.after_training.generate import GenerateArguments, generate
from sftmix_trl.commands.evaluate import quiet_logging
from sftmix_trl.configs import ModelArguments
from sftmix_trl.runs import launch

ARGUMENTS = (GenerateArguments, ModelArguments)


def main(args: GenerateArguments, model_args: ModelArguments) -> None:
    quiet_logging()
    generate(args, model_args)


def run() -> None:
    launch(main, ARGUMENTS)


if __name__ == "__main__":
    run()
