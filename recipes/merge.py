"""A saved LoRA adapter merged into its base: a standalone model folder, measured (`sftmix-trl merge` as a script).

python recipes/merge.py --adapter_path ADAPTER --output_dir OUT [--target dequantized] [--eval_file FILE ...]

What it reads, does and writes: sftmix_trl/commands/merge.py.
"""

from sftmix_trl.commands.merge import ARGUMENTS, main, run  # noqa: F401  (`main` and `ARGUMENTS`: for tests and imports)

if __name__ == "__main__":
    run()
