"""SFTMix: stage 1 (confidence table, computed or reused) then stage 2 (QLoRA training with the Mixup regulariser).

accelerate launch recipes/sftmix.py --config configs/demo/sftmix_qlora.yaml [--key value ...]
sftmix-trl sftmix --config my.yaml                       (an installed package, no clone)
"""

from sftmix_trl.commands.sftmix import ARGUMENTS, main, run  # noqa: F401  (`main` and `ARGUMENTS`: for tests and imports)

if __name__ == "__main__":
    run()
