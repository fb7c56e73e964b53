"""NTP baseline: QLoRA supervised fine-tuning with TRL's SFTTrainer (`sftmix-trl sft` as a script).

accelerate launch recipes/sft.py --config configs/demo/sft_qlora.yaml [--key value ...]

What it reads, does and writes: sftmix_trl/commands/sft.py.
"""

from sftmix_trl.commands.sft import ARGUMENTS, main, run  # noqa: F401  (`main` and `ARGUMENTS`: for tests and imports)

if __name__ == "__main__":
    run()
