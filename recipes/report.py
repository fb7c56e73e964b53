"""The data report of an existing stage-1 table (see sftmix_trl/commands/report.py).

python recipes/report.py --config configs/demo/sftmix_qlora.yaml
sftmix-trl report --config my.yaml                       (an installed package, no clone)
"""

from sftmix_trl.commands.report import ARGUMENTS, main, run  # noqa: F401  (`main` and `ARGUMENTS`: for tests and imports)

if __name__ == "__main__":
    run()
