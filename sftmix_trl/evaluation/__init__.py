"""Evaluation of a base model or a base + LoRA adapter: IFEval, medical multiple choice, response perplexity.

`evaluate(EvalArguments, ModelArguments)` runs it all (every task but perplexity through lm-eval-harness, see
`harness`) and writes the results; `recipes/evaluate.py` is its launcher. The pieces are public for other uses:
`score_ifeval` scores any responses, `response_perplexity` any normalised dataset.
"""

from sftmix_trl.errors import EvalError
from sftmix_trl.evaluation.args import MMLU_MEDICAL_SUBJECTS, TASKS, EvalArguments
from sftmix_trl.evaluation.choice import ChoiceItem, load_medmcqa, load_medqa, load_mmlu, load_pubmedqa
from sftmix_trl.evaluation.ifeval import IFEvalPrompt, check_punkt, load_ifeval, match_responses, score_ifeval
from sftmix_trl.evaluation.perplexity import load_perplexity_data, response_perplexity
from sftmix_trl.evaluation.runner import evaluate

__all__ = [
    "MMLU_MEDICAL_SUBJECTS",
    "TASKS",
    "ChoiceItem",
    "EvalArguments",
    "EvalError",
    "IFEvalPrompt",
    "check_punkt",
    "evaluate",
    "load_ifeval",
    "load_medmcqa",
    "load_medqa",
    "load_mmlu",
    "load_perplexity_data",
    "load_pubmedqa",
    "match_responses",
    "response_perplexity",
    "score_ifeval",
]
