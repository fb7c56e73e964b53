"""SFTMix stage 1: train the reference adapter, score every example at C snapshots, write the confidence table.

accelerate launch recipes/confidence.py --config configs/demo/sftmix_qlora.yaml
sftmix-trl confidence --config my.yaml                   (an installed package, no clone)

Reads the same YAML as the SFTMix recipe; the table lands in `confidence_dir` (default `<output_dir>/confidence`),
where the SFTMix recipe finds and reuses it. A run that was killed resumes where it stopped.
"""

from sftmix_trl.commands.confidence import ARGUMENTS, main, run  # noqa: F401  (`main` and `ARGUMENTS`: for tests and imports)

if __name__ == "__main__":
    run()
