"""SFTMix, both stages: the confidence table (computed or reused), then QLoRA with the Mixup regulariser
(`sftmix-trl sftmix` as a script).

accelerate launch recipes/sftmix.py --config configs/demo/sftmix_qlora.yaml [--key value ...]

What it reads, does and writes: sftmix_trl/commands/sftmix.py.
"""

from sftmix_trl.commands.sftmix import ARGUMENTS, main, run  # noqa: F401  (`main` and `ARGUMENTS`: for tests and imports)

if __name__ == "__main__":
    run()
