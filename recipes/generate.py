"""Replies of a base model, or a base + saved LoRA adapter, to a few prompts, through the chat template: a first
look at what training changed. Greedy by default.

sftmix-trl generate --adapter_path outputs/demo/sftmix_qlora --prompt "What causes anaemia?"
python recipes/generate.py --adapter_path ADAPTER --prompts_file prompts.txt [--do_sample true --temperature 0.7]

The base is the one the adapter records unless `--model_name_or_path` says otherwise, loaded as for evaluation
(4-bit by default: `--load_in_4bit false` for the 16/32-bit base).
"""

from sftmix_trl.commands.generate import ARGUMENTS, main, run  # noqa: F401  (`main` and `ARGUMENTS`: for tests and imports)

if __name__ == "__main__":
    run()
