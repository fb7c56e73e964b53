"""A trained LoRA adapter as one GGUF file, checked against the merged model (`sftmix-trl export` as a script).

python recipes/export.py --adapter_path ADAPTER --output_dir OUT [--gguf q8_0|f16|bf16|q4_k_m] [--eval_data FILE]

What it reads, does and writes: sftmix_trl/commands/export.py.
"""

from sftmix_trl.commands.export import ARGUMENTS, main, run  # noqa: F401  (`main` and `ARGUMENTS`: for tests and imports)

if __name__ == "__main__":
    run()
