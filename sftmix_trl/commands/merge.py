"""Merge a saved LoRA adapter into its base: a standalone model folder, served without PEFT, whose card says which
weights it ships and what that costs.

sftmix-trl merge --adapter_path outputs/demo/sftmix_qlora --output_dir outputs/demo/merged [--target dequantized]
python recipes/merge.py --adapter_path ADAPTER [--model_name_or_path BASE] --output_dir OUT [--eval_file FILE ...]

`--target original` (default) merges into the base's own 16/32-bit weights, `--target dequantized` into the run's
4-bit weights dequantised (the weights the adapter was trained against). Then the held-out response perplexity of the
merged folder and of base + adapter as trained is printed and written into the card (`--measure false` skips it).
Writes model.safetensors (or shards), config.json, generation_config.json, the tokenizer with the chat template the run
trained with, without its `{% generation %}` markers (the base's own when it renders the same), sftmix_merge.json and a
README.md model card.
"""

from __future__ import annotations

import logging

from sftmix_trl.after_training.merge import MergeArguments, merge
from sftmix_trl.commands.evaluate import quiet_logging
from sftmix_trl.runs import launch

logger = logging.getLogger(__name__)
ARGUMENTS = (MergeArguments,)


def main(args: MergeArguments) -> None:
    quiet_logging()
    merge(args)


def run() -> None:
    launch(main, ARGUMENTS)


if __name__ == "__main__":
    run()
