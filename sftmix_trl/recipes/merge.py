"""Merge a saved LoRA adapter into its (unquantised) base: a standalone model folder, served without PEFT.

sftmix-trl merge --adapter_path outputs/demo/sftmix_qlora --output_dir outputs/demo/merged [--dtype bfloat16]
python recipes/merge.py --adapter_path ADAPTER [--model_name_or_path BASE] --output_dir OUT [--push_to_hub true ...]

Writes model.safetensors (or shards), config.json, generation_config.json, the tokenizer with the base's own chat
template (no `{% generation %}` markers) and a README.md model card naming the base, the adapter and the method.
"""

from __future__ import annotations

import logging

from ..merge import MergeArguments, merge
from ..runs import launch
from .evaluate import quiet_logging

logger = logging.getLogger(__name__)
ARGUMENTS = (MergeArguments,)


def main(args: MergeArguments) -> None:
    quiet_logging()
    merge(args)


def run() -> None:
    launch(main, ARGUMENTS)


if __name__ == "__main__":
    run()
