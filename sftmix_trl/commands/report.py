"""The data report of an existing stage-1 table: every example's text, confidence, variability and prompt fit, ranked
by how suspicious it is (report.parquet, report.md, data_map.png beside the table).

sftmix-trl report --config configs/demo/sftmix_qlora.yaml [--prompt_fit_model reference] [--report_top_k 50]
python recipes/report.py --config my.yaml

Reads the YAML of the run that computed the table. Trains nothing: it runs the prompt-fit passes (or reuses their
cached scores) and rewrites the report files, so a changed `report_top_k` or `exclude_suspicious_fraction` costs
seconds.
"""

from __future__ import annotations

from pathlib import Path

from sftmix_trl.confidence import TABLE_FILE, ConfidenceConfig, ConfidenceError, write_data_report
from sftmix_trl.confidence.report import DATA_MAP, REPORT_PAGE, REPORT_TABLE
from sftmix_trl.configs import ModelArguments, ScriptArguments
from sftmix_trl.data.prepare import prepare_run_data
from sftmix_trl.runs import check_promised, launch, setup_logging
from sftmix_trl.sftmix.config import SFTMixConfig

ARGUMENTS = (ScriptArguments, SFTMixConfig, ModelArguments)


def main(script_args: ScriptArguments, training_args: SFTMixConfig, model_args: ModelArguments) -> None:
    setup_logging(training_args)
    directory = Path(training_args.confidence_table or training_args.confidence_dir)
    if not (directory / TABLE_FILE).is_file():  # before the data is prepared
        raise ConfidenceError(
            f"no confidence table in {directory}: run stage 1 first (`sftmix-trl confidence --config ...`)"
        )
    config = ConfidenceConfig.from_args(training_args)
    # The data as the run that wrote the table prepared it: same examples, same scored tokens, same template
    data = prepare_run_data(script_args, training_args, model_args, confidence_config=config).data
    write_data_report(data.examples, model_args, training_args, config, directory, prepared=data.reference_train)
    if training_args.should_save:  # the process that wrote them
        check_promised(directory, (REPORT_TABLE, REPORT_PAGE, DATA_MAP), "report")
        print(f"data report: {directory / REPORT_PAGE}")


def run() -> None:
    launch(main, ARGUMENTS)


if __name__ == "__main__":
    run()
