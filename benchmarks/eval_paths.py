"""The hand-written evaluation (log-likelihoods and greedy generation of `evaluation/choice.py` and `modeling.py`)
against the lm-eval-harness path (`recipes/evaluate.py` through `HFLM`), on the same items of the shared data.

    NLTK_DATA=../shared/data/nltk_data python benchmarks/eval_paths.py [--model PATH] [--limit 40] [--ifeval 16]

Writes benchmarks/results/eval_paths_<model>.md: per task, both paths' figures, how many items' predictions (or
IFEval responses) differ, the largest log-likelihood difference, and each path's time. The hand-written path was
removed after this comparison; run it at the commit that has both (see the results file).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sftmix_trl.configs import ModelArguments  # noqa: E402
from sftmix_trl.evaluation import EvalArguments, evaluate  # noqa: E402
from sftmix_trl.evaluation.choice import accuracy, load_mmlu, load_pubmedqa, score_choices  # noqa: E402
from sftmix_trl.evaluation.ifeval import load_ifeval, score_ifeval  # noqa: E402
from sftmix_trl.evaluation.modeling import generate_responses, load_eval_model  # noqa: E402
from sftmix_trl.evaluation.runner import sample_items  # noqa: E402
from sftmix_trl.model import load_tokenizer  # noqa: E402

DATA = Path(os.environ.get("SFTMIX_DATA_DIR", ROOT.parent / "shared" / "data"))


def old_path(model_args, eval_args) -> tuple[dict, dict, dict]:
    """Figures and samples of the hand-written path on the items `limit`/`limit_seed` choose."""
    tokenizer = load_tokenizer(model_args)
    model = load_eval_model(model_args)
    results, samples, seconds = {}, {}, {}
    for task in eval_args.tasks:
        start = time.perf_counter()
        if task == "ifeval":
            prompts = load_ifeval(eval_args.ifeval_data)
            prompts = [prompts[i] for i in sample_items(prompts, eval_args.limit, eval_args.limit_seed)]
            conversations = [[{"role": "user", "content": p.prompt}] for p in prompts]
            responses = generate_responses(
                model, tokenizer, conversations, eval_args.max_new_tokens, eval_args.batch_size
            )
            results[task], samples[task] = score_ifeval(prompts, responses)
        else:
            if task == "pubmedqa":
                items = load_pubmedqa(eval_args.pubmedqa_data)
            else:
                items = load_mmlu(eval_args.mmlu_medical_data, eval_args.mmlu_subjects, eval_args.mmlu_split)
            groups = [i.group for i in items] if task == "mmlu_medical" else None
            items = [items[i] for i in sample_items(items, eval_args.limit, eval_args.limit_seed, groups)]
            scored = score_choices(model, tokenizer, items, eval_args.batch_size, eval_args.max_length)
            results[task], samples[task] = accuracy(scored), scored
        seconds[task] = time.perf_counter() - start
    return results, samples, seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(Path.home() / ".cache" / "sftmix-trl" / "SmolLM2-135M-Instruct"))
    parser.add_argument("--limit", type=int, default=40, help="PubMedQA items, and MMLU items per subject")
    parser.add_argument("--ifeval", type=int, default=16, help="IFEval prompts")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    model_args = ModelArguments(model_name_or_path=args.model, load_in_4bit=False, dtype="float32")
    common = {
        "pubmedqa_data": str(DATA / "eval" / "pubmedqa"),
        "mmlu_medical_data": str(DATA / "eval" / "mmlu_medical"),
        "mmlu_split": "val",
        "ifeval_data": str(DATA / "eval" / "ifeval" / "input_data.jsonl"),
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
    }
    figures = {}
    with tempfile.TemporaryDirectory() as out:
        for tasks, limit in ((["pubmedqa", "mmlu_medical"], args.limit), (["ifeval"], args.ifeval)):
            eval_args = EvalArguments(tasks=tasks, limit=limit, output_dir=out, **common)
            start = time.perf_counter()
            new = evaluate(eval_args, model_args)
            new_seconds = time.perf_counter() - start
            new_samples = {t: [json.loads(x) for x in open(Path(out) / f"samples_{t}.jsonl")] for t in tasks}
            old, old_samples, old_seconds = old_path(model_args, eval_args)
            for task in tasks:
                figures[task] = compare(task, old[task], new["results"][task], old_samples[task], new_samples[task])
                figures[task]["seconds"] = (round(old_seconds[task], 1), round(new_seconds / len(tasks), 1))
    write_report(args, figures)


def compare(task: str, old: dict, new: dict, old_rows: list[dict], new_rows: list[dict]) -> dict:
    if task == "ifeval":
        metrics = (
            "prompt_level_strict_acc",
            "inst_level_strict_acc",
            "prompt_level_loose_acc",
            "inst_level_loose_acc",
        )
        differ = sum(a["response"] != b["response"] for a, b in zip(old_rows, new_rows))
        return {"n": len(new_rows), "old": {m: old[m] for m in metrics}, "new": {m: new[m] for m in metrics},
                "differing": differ, "max_abs_loglikelihood": None}  # fmt: skip
    assert [r["id"] for r in old_rows] == [r["id"] for r in new_rows]
    gap = max(abs(a - b) for x, y in zip(old_rows, new_rows) for a, b in zip(x["loglikelihoods"], y["loglikelihoods"]))
    return {"n": len(new_rows), "old": {"acc": old["acc"], "acc_norm": old["acc_norm"]},
            "new": {"acc": new["acc"], "acc_norm": new["acc_norm"]},
            "differing": sum(a["prediction"] != b["prediction"] for a, b in zip(old_rows, new_rows)),
            "max_abs_loglikelihood": gap}  # fmt: skip


def write_report(args, figures: dict) -> None:
    name = Path(args.model).name
    lines = [
        f"# Hand-written evaluation vs lm-eval-harness ({name})",
        "",
        f"`python benchmarks/eval_paths.py --model {args.model} --limit {args.limit} --ifeval {args.ifeval} "
        f"--max_new_tokens {args.max_new_tokens}` (float32 base, CPU, batch {args.batch_size}; same items: the "
        "seeded `limit` sample, limit_seed 0; MMLU: the val split, `limit` per subject).",
        "",
        "| task | n | metric | hand-written | lm-eval | items differing | max abs log-lik diff | seconds (hand / lm-eval) |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for task, f in figures.items():
        for metric in f["old"]:
            gap = f"{f['max_abs_loglikelihood']:.2e}" if f["max_abs_loglikelihood"] is not None else ""
            lines.append(
                f"| {task} | {f['n']} | {metric} | {f['old'][metric]:.4f} | {f['new'][metric]:.4f} | "
                f"{f['differing']} | {gap} | {f['seconds'][0]} / {f['seconds'][1]} |"
            )
    lines += [
        "",
        "Items differing: multiple choice, predictions (argmax log-likelihood); IFEval, response texts. `acc_norm` "
        "differs by definition: the hand-written path divided by the bytes of ' ' + option, lm-eval divides by the "
        "option's characters. lm-eval's seconds are the whole `evaluate` call split evenly over its tasks (model load "
        "included).",
    ]
    path = ROOT / "benchmarks" / "results" / f"eval_paths_{name}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
