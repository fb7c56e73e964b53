"""Replies of a base model, or a base + saved LoRA adapter, to a few prompts (`sftmix-trl generate` as a script).

python recipes/generate.py --adapter_path ADAPTER --prompts_file prompts.txt [--do_sample true --temperature 0.7]

What it reads, does and writes: sftmix_trl/commands/generate.py.
"""

from sftmix_trl.commands.generate import ARGUMENTS, main, run  # noqa: F401  (`main` and `ARGUMENTS`: for tests and imports)

if __name__ == "__main__":
    run()
