"""`EvalArguments`: what `recipes/evaluate.py` evaluates, on which data, and where it writes."""

from __future__ import annotations

from dataclasses import dataclass, field

from sftmix_trl.data.load import ASSISTANT_TURNS
from sftmix_trl.errors import EvalError
from sftmix_trl.evaluation.harness import check_task_names

MMLU_MEDICAL_SUBJECTS = (
    "anatomy",
    "clinical_knowledge",
    "college_biology",
    "college_medicine",
    "medical_genetics",
    "professional_medicine",
)
# This package's tasks -> the EvalArguments field that says where its data is
TASK_DATA = {
    "ifeval": "ifeval_data",
    "pubmedqa": "pubmedqa_data",
    "mmlu_medical": "mmlu_medical_data",
    "medqa": "medqa_data",
    "medmcqa": "medmcqa_data",
    "perplexity": "perplexity_data",
}
TASKS = tuple(TASK_DATA)
MULTIPLE_CHOICE_TASKS = ("pubmedqa", "mmlu_medical", "medqa", "medmcqa")


def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    return [part.strip() for item in value for part in str(item).split(",") if part.strip()]


@dataclass
class EvalArguments:
    """Tasks, data and settings of an evaluation run (the base model itself comes from `ModelArguments`)."""

    tasks: list[str] = field(
        default_factory=list,
        metadata={
            "help": f"Tasks to run (a list in YAML; space- or comma-separated on the command line): this package's "
            f"{', '.join(TASKS)}, or any task, group or tag of lm-eval-harness (`lm_eval ls tasks`; a stock task "
            "reads its dataset the way lm-eval does, from the Hub or its cache). `lm_eval:<name>` picks lm-eval's "
            "own task where this package has one of that name (e.g. `lm_eval:pubmedqa`, from the Hub)."
        },
    )
    adapter_path: str | None = field(
        default=None,
        metadata={
            "help": "Folder of a saved PEFT (LoRA) adapter to evaluate on top of `model_name_or_path`; unset "
            "evaluates the base model alone. Checked against the base (architecture, target modules, shapes) "
            "before anything is generated."
        },
    )
    chat_template_path: str | None = field(
        default=None,
        metadata={
            "help": "A .jinja chat template for the prompts that go through one (IFEval, perplexity, lm-eval tasks "
            "with `apply_chat_template`). Default: the tokenizer saved in `adapter_path` (the template, special and "
            "padding tokens the run trained with), else the base's."
        },
    )
    output_dir: str = field(
        default="outputs/eval",
        metadata={
            "help": "Folder for eval_results.json, eval_results.md and the per-task samples_<task>.jsonl; files of "
            "an earlier evaluation there are overwritten."
        },
    )
    ifeval_data: str = field(
        default="google/IFEval",
        metadata={
            "help": "IFEval prompts: a local input_data.jsonl (key, prompt, instruction_id_list, kwargs) or a Hub "
            "dataset id (split `train`)."
        },
    )
    pubmedqa_data: str | None = field(
        default=None,
        metadata={
            "help": "Folder holding PubMedQA's pubmedqa_ori_pqal.json (or ori_pqal.json) and "
            "pubmedqa_test_ground_truth.json (or test_ground_truth.json): the 500-item test split is scored."
        },
    )
    mmlu_medical_data: str | None = field(
        default=None,
        metadata={
            "help": "Folder of MMLU CSV files named <subject>_<split>.csv, without header: question, A, B, C, D, "
            "answer letter (<subject>_dev.csv: the few-shot examples of a `num_fewshot` run)."
        },
    )
    mmlu_split: str = field(
        default="test",
        metadata={"help": "Which MMLU CSV files to score: <subject>_<mmlu_split>.csv (test, val or dev)."},
    )
    mmlu_subjects: list[str] = field(
        default_factory=lambda: list(MMLU_MEDICAL_SUBJECTS),
        metadata={
            "help": "MMLU subjects scored by the `mmlu_medical` task (any of MMLU's 57, as lm-eval's own "
            "mmlu_<subject> tasks on the local `<subject>_<split>.csv`); each is reported on its own too."
        },
    )
    medqa_data: str | None = field(
        default=None,
        metadata={
            "help": "MedQA as a local .json/.jsonl file: records {question, options, answer} where options is a "
            "{letter: text} mapping or a list, and answer is a letter, a 0-based index or the option's text "
            "(MedQA's own `answer_idx` is read too)."
        },
    )
    medmcqa_data: str | None = field(
        default=None,
        metadata={
            "help": "MedMCQA as a local .json/.jsonl file, in the same schema as `medqa_data`, four options per "
            "question."
        },
    )
    perplexity_data: str | None = field(
        default=None,
        metadata={
            "help": "Data for held-out response perplexity: anything `dataset_name` of the training recipes "
            "accepts (local .json/.jsonl/.parquet file or folder, or a Hub id), in any format they read. Unset with "
            "`adapter_path`: the held-out split of the run that trained it, re-read from its sftmix_run.json (as "
            "`merge` measures)."
        },
    )
    perplexity_format: str = field(
        default="auto",
        metadata={
            "help": "Record format of `perplexity_data` (as `dataset_format`).",
            "choices": ["auto", "alpaca", "prompt_completion", "messages"],
        },
    )
    perplexity_split: str = field(default="train", metadata={"help": "Split of a Hub `perplexity_data`."})
    perplexity_held_out: float = field(
        default=0.0,
        metadata={
            "help": "0 scores every example of `perplexity_data`. Otherwise only the held-out split a training "
            "run with `eval_split_size` = this value and `dataset_seed` = `perplexity_seed` made of the same file."
        },
    )
    perplexity_seed: int = field(default=42, metadata={"help": "Seed of that held-out split (`dataset_seed`)."})
    perplexity_turns: str = field(
        default="all",
        metadata={
            "help": "Which assistant replies of a multi-turn conversation are scored: 'all' (as the recipes train "
            "them by default) or 'last' (earlier turns are context; as `assistant_turns: last` trains).",
            "choices": list(ASSISTANT_TURNS),
        },
    )
    max_new_tokens: int = field(
        default=1280,
        metadata={"help": "Longest IFEval response generated (greedy); lm-eval-harness uses 1280."},
    )
    batch_size: int = field(
        default=8, metadata={"help": "Sequences per forward pass (lm-eval's `batch_size`, and perplexity's)."}
    )
    max_length: int = field(
        default=2048,
        metadata={
            "help": "Longest sequence scored (multiple choice, lm-eval tasks, perplexity) and longest prompt of a "
            "generation: longer prompts lose their start; a perplexity response longer than this loses its end."
        },
    )
    num_fewshot: int | None = field(
        default=None,
        metadata={
            "help": "Few-shot examples for lm-eval tasks that take them (unset: each task's own default, 0 for this "
            "package's tasks). PubMedQA's come from the labelled items outside its test split, MMLU's from "
            "<subject>_dev.csv; medqa and medmcqa (one file each) take none."
        },
    )
    apply_chat_template: bool = field(
        default=False,
        metadata={
            "help": "Render lm-eval's stock tasks through the tokenizer's chat template (lm-eval's "
            "`--apply_chat_template`). This package's tasks ignore it: IFEval always uses the template, multiple "
            "choice never (prompts in the benchmarks' plain-text format)."
        },
    )
    limit: int | None = field(
        default=None,
        metadata={
            "help": "Score only `limit` items of each task (of each subject for MMLU), for quick runs: a random "
            "sample drawn with `limit_seed`, not the first ones (files are often sorted, PubMedQA's by label). "
            "Figures from a limited run are not comparable with published ones."
        },
    )
    limit_seed: int = field(
        default=0,
        metadata={"help": "Seed of the `limit` sample: the same seed gives every model the same items."},
    )

    def __post_init__(self):
        self.tasks = _as_list(self.tasks)
        self.mmlu_subjects = _as_list(self.mmlu_subjects)
        validate_tasks(self.tasks)
        for task in (t for t in self.tasks if t in TASK_DATA):
            if task == "perplexity" and self.adapter_path:
                continue  # the run's own held-out split, when `perplexity_data` is unset
            if getattr(self, TASK_DATA[task]) in (None, ""):
                raise EvalError(f"task {task!r} needs `{TASK_DATA[task]}`: where its data is")
        if "mmlu_medical" in self.tasks and not self.mmlu_subjects:
            raise EvalError("`mmlu_subjects` is empty")
        if self.num_fewshot:
            self._check_fewshot()
        for name in ("max_new_tokens", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise EvalError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.max_length < 2:  # a scored token needs at least one token of context before it
            raise EvalError(f"`max_length` must be >= 2 (a context token and a scored token), got {self.max_length}")
        if self.limit is not None and self.limit < 1:
            raise EvalError(f"`limit` must be >= 1 (or unset), got {self.limit}")
        if self.perplexity_turns not in ASSISTANT_TURNS:
            raise EvalError(f"`perplexity_turns` must be one of {ASSISTANT_TURNS}, got {self.perplexity_turns!r}")
        if self.perplexity_held_out < 0:
            raise EvalError(f"`perplexity_held_out` must be >= 0, got {self.perplexity_held_out}")

    def _check_fewshot(self) -> None:
        """Few-shot examples must not be scored questions: refuse the runs whose only examples would be."""
        one_file = [t for t in ("medqa", "medmcqa") if t in self.tasks]
        if one_file:
            raise EvalError(
                f"`num_fewshot` {self.num_fewshot} with {', '.join(one_file)}: each reads one file, so its few-shot "
                "examples would be scored questions; run it in a separate evaluation without `num_fewshot`"
            )
        if "mmlu_medical" in self.tasks and self.mmlu_split == "dev":
            raise EvalError(
                f"`num_fewshot` {self.num_fewshot} with `mmlu_split` dev: MMLU's few-shot examples are the dev "
                "questions; score test or val"
            )


def validate_tasks(tasks: list[str]) -> None:
    """A non-empty list without repeats, of this package's tasks and tasks lm-eval knows (its index is read only
    when a task is not this package's: it takes seconds)."""
    if not tasks:
        raise EvalError(
            f"no task to evaluate: set `tasks` to one or more of this package's tasks ({', '.join(TASKS)}) or "
            "lm-eval-harness tasks"
        )
    if len(set(tasks)) < len(tasks):
        raise EvalError(f"task list {tasks} names a task twice")

    check_task_names(tasks, TASKS)
