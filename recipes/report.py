"""The data report of an existing stage-1 table (`sftmix-trl report` as a script).

python recipes/report.py --config configs/demo/sftmix_qlora.yaml

What it reads, does and writes: sftmix_trl/commands/report.py.
"""

from sftmix_trl.commands.report import ARGUMENTS, main, run  # noqa: F401  (`main` and `ARGUMENTS`: for tests and imports)

if __name__ == "__main__":
    run()
