"""IFEval: prompts from a local file, their NLTK prerequisite, and lm-eval-harness's scoring of responses.

The task is lm-eval-harness's own `ifeval` (`lm_eval.tasks.ifeval`: its rules, `process_results` and aggregation;
`tasks/sftmix_ifeval.yaml` is its configuration with a local-file loader). This module loads and checks the prompts,
seeds the one rule that draws a random letter (`process_results`), and scores responses made elsewhere as the task
does (`score_ifeval`, with `match_responses` to pair published responses with prompts).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

from sftmix_trl.data.load import DataSource, read_source
from sftmix_trl.errors import EvalError

IFEVAL_HUB_ID = "google/IFEval"
IFEVAL_FIELDS = ("key", "prompt", "instruction_id_list", "kwargs")
PUNKT = "tokenizers/punkt_tab/english/"


@dataclass
class IFEvalPrompt:
    key: int
    prompt: str
    instruction_id_list: list[str]
    kwargs: list[dict[str, Any]]


def check_punkt() -> None:
    """Fail (in one line) unless NLTK's punkt_tab, which the rules need, is installed.

    Checked before lm-eval's rules are imported: on import they try to download it, which offline hangs or fails
    half-way through a run.
    """
    import nltk

    for folder in os.environ.get("NLTK_DATA", "").split(os.pathsep):  # also when set after nltk was imported
        if folder and folder not in nltk.data.path:
            nltk.data.path.insert(0, folder)
    try:
        nltk.data.find(PUNKT)
    except LookupError:
        raise EvalError(
            "IFEval's rules need NLTK's `punkt_tab` sentence splitter, which is not installed: set NLTK_DATA to a "
            "folder holding tokenizers/punkt_tab/english (`scripts/fetch_eval_data.py` writes one to eval_data/nltk_data), or run "
            "`python -m nltk.downloader punkt_tab` where a network is reachable"
        ) from None


def _rules():
    check_punkt()
    try:
        import langdetect
        from lm_eval.tasks.ifeval import instructions_registry, utils
    except ImportError as error:
        raise EvalError(
            f"IFEval needs lm-eval-harness ({error}); install it with `pip install -e '.[eval]'`"
        ) from None
    langdetect.DetectorFactory.seed = 0  # the language rules call langdetect, which is random unless seeded
    return utils, instructions_registry


def load_ifeval(path: str = IFEVAL_HUB_ID, limit: int | None = None) -> list[IFEvalPrompt]:
    """IFEval prompts from a local input_data.jsonl or the Hub (`google/IFEval`, split train), validated."""
    _, registry = _rules()
    records = read_source(DataSource(path=path, split="train"))
    if not records:
        raise EvalError(f"{path}: no IFEval prompt in it")
    prompts = []
    for where, record in records[:limit]:
        if not isinstance(record, dict):
            raise EvalError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for name in IFEVAL_FIELDS:
            if record.get(name) is None:
                raise EvalError(f"{where}: missing field '{name}' (an IFEval prompt needs {', '.join(IFEVAL_FIELDS)})")
        ids, kwargs = record["instruction_id_list"], record["kwargs"]
        if not isinstance(record["prompt"], str):
            raise EvalError(f"{where}: field 'prompt' must be a string")
        if not isinstance(ids, list) or not isinstance(kwargs, list) or len(ids) != len(kwargs):
            raise EvalError(f"{where}: 'instruction_id_list' and 'kwargs' must be lists of the same length")
        unknown = [i for i in ids if i not in registry.INSTRUCTION_DICT]
        if unknown:
            raise EvalError(f"{where}: field 'instruction_id_list' names unknown instruction(s) {unknown}")
        prompts.append(IFEvalPrompt(int(record["key"]), record["prompt"], list(ids), [dict(k or {}) for k in kwargs]))
    return prompts


def _common_prefix(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


def match_responses(prompts: list[IFEvalPrompt], records: list[dict]) -> list[str]:
    """The response to each prompt from `{prompt, response}` records, matched by prompt text.

    A prompt without an identical record takes the record sharing its longest common prefix (one IFEval prompt was
    edited upstream after published responses were made), if that prefix is at least half the prompt.
    """
    exact = {r["prompt"]: r["response"] for r in records}
    responses = []
    for p in prompts:
        if p.prompt in exact:
            responses.append(exact[p.prompt])
            continue
        best = max(records, key=lambda r: _common_prefix(r["prompt"], p.prompt), default=None)
        if best is None or _common_prefix(best["prompt"], p.prompt) < len(p.prompt) / 2:
            raise EvalError(f"no response for IFEval prompt {p.key}: {p.prompt[:80]!r}")
        responses.append(best["response"])
    return responses


def process_results(doc: dict, results: list[str]) -> dict:
    """lm-eval's verdicts on one response (`lm_eval.tasks.ifeval.utils.process_results`), with Python's `random`
    seeded by the prompt's key and restored afterwards.

    One rule draws a random value: `keywords:letter_frequency` checks a random letter when the prompt's `letter` is
    not one (IFEval prompts 1122 and 1129 ask for "#" and "!"), so unseeded, a verdict depends on every draw made
    before it in the run (GPT-4's reference responses score 0.7671, 0.7689 or 0.7708 prompt-level strict). Seeded
    per prompt, a prompt's verdict does not depend on the run, on `limit`, on the number of processes or on which
    other prompts are scored with it. lm-eval-harness's ifeval task is otherwise used as it is.
    """
    utils, _ = _rules()
    state = random.getstate()
    random.seed(str(doc["key"]))
    try:
        return utils.process_results(doc, results)
    finally:
        random.setstate(state)


def score_ifeval(prompts: list[IFEvalPrompt], responses: list[str]) -> tuple[dict[str, float], list[dict]]:
    """Prompt- and instruction-level accuracy, strict and loose, and the per-prompt verdicts, computed as this
    package's ifeval task computes them (`process_results` and lm-eval's aggregation), for responses made elsewhere.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    utils, _ = _rules()
    samples = []
    for p, response in zip(prompts, responses):
        doc = {"key": p.key, "prompt": p.prompt, "instruction_id_list": p.instruction_id_list, "kwargs": p.kwargs}
        verdicts = process_results(doc, [response])
        samples.append(
            {
                "key": p.key,
                "prompt": p.prompt,
                "response": response,
                "instruction_id_list": p.instruction_id_list,
                **{
                    f"follow_{kind}_{mode}": verdicts[f"{level}_level_{mode}_acc"]
                    for mode in ("strict", "loose")
                    for level, kind in (("prompt", "all_instructions"), ("inst", "instruction_list"))
                },
            }
        )
    metrics = {}
    for mode in ("strict", "loose"):
        metrics[f"prompt_level_{mode}_acc"] = sum(s[f"follow_all_instructions_{mode}"] for s in samples) / max(
            len(samples), 1
        )
        metrics[f"inst_level_{mode}_acc"] = utils.agg_inst_level_acc(
            [s[f"follow_instruction_list_{mode}"] for s in samples]
        )
    metrics["n_prompts"] = len(samples)
    metrics["n_instructions"] = sum(len(s["instruction_id_list"]) for s in samples)
    return metrics, samples
