"""Evaluate a base model, or a base + saved LoRA adapter, through lm-eval-harness: this package's IFEval and medical
multiple choice on local files, any lm-eval task by name, and held-out response perplexity.

python recipes/evaluate.py --model_name_or_path BASE [--adapter_path ADAPTER] --tasks ifeval pubmedqa ... [--key value]
python recipes/evaluate.py --config my_eval.yaml [--key value ...]
accelerate launch recipes/evaluate.py --config my_eval.yaml     # several processes share the items
sftmix-trl evaluate --config my_eval.yaml                        # an installed package, no clone

IFEval's rules need NLTK's punkt_tab: set NLTK_DATA (`scripts/fetch_eval_data.py` writes it to eval_data/nltk_data).

Writes eval_results.json (every figure, the model, adapter and configuration it came from, package versions),
eval_results.md and samples_<task>.jsonl into `output_dir`.
"""

from __future__ import annotations

import logging
import sys

import datasets
import transformers

from sftmix_trl.configs import ModelArguments
from sftmix_trl.evaluation import EvalArguments, evaluate
from sftmix_trl.runs import launch

logger = logging.getLogger(__name__)
ARGUMENTS = (EvalArguments, ModelArguments)


def quiet_logging() -> None:
    """INFO from this package, WARNING from transformers and datasets (the commands that do not train)."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=[logging.StreamHandler(sys.stdout)]
    )
    for name in ("sftmix_trl", "__main__"):
        logging.getLogger(name).setLevel(logging.INFO)
    datasets.utils.logging.set_verbosity_warning()
    transformers.utils.logging.set_verbosity_warning()


def main(eval_args: EvalArguments, model_args: ModelArguments) -> None:
    quiet_logging()
    payload = evaluate(eval_args, model_args)
    logger.info("done in %.0f s: %s/eval_results.json", payload["wall_seconds"], eval_args.output_dir)


def run() -> None:
    launch(main, ARGUMENTS)


if __name__ == "__main__":
    run()
