"""SFTMix stage 1 alone: the confidence table (`sftmix-trl confidence` as a script).

accelerate launch recipes/confidence.py --config configs/demo/sftmix_qlora.yaml

What it reads, does and writes: sftmix_trl/commands/confidence.py.
"""

from sftmix_trl.commands.confidence import ARGUMENTS, main, run  # noqa: F401  (`main` and `ARGUMENTS`: for tests and imports)

if __name__ == "__main__":
    run()
