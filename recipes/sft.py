"""NTP baseline: QLoRA supervised fine-tuning with TRL's SFTTrainer.

accelerate launch recipes/sft.py --config configs/demo/sft_qlora.yaml [--key value ...]
sftmix-trl sft --config my.yaml                          (an installed package, no clone)
"""

from sftmix_trl.commands.sft import ARGUMENTS, main, run  # noqa: F401  (`main` and `ARGUMENTS`: for tests and imports)

if __name__ == "__main__":
    run()
