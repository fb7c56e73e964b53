"""NTP vs SFTMix under the same budget: held-out perplexity, IFEval and PubMedQA over several seeds.

    NLTK_DATA=../shared/data/nltk_data python benchmarks/quality.py [--seeds 42 43 44] [--train_examples 64] ...

SmolLM2-135M-Instruct, 4-bit base + LoRA, on CPU (or a GPU unchanged). Both methods train on the same examples with
the same LoRA settings, learning rate, schedule, batch size and number of optimiser steps; they differ only in the
loss (TRL's SFTTrainer vs SFTMixTrainer) and in SFTMix's pairing of confident with unconfident examples. Stage 1 (the
confidence table) runs once, with the first seed, and is shared by every SFTMix seed: its cost is reported apart.

Training data: `--train_examples` of MedAlpaca's medical meadow (WikiDoc patient Q/A). Held out, disjoint from it:
`--held_out` medical meadow examples (in-domain perplexity) and as many Alpaca examples (other-domain perplexity).
IFEval (`--ifeval_limit` prompts, greedy, `--max_new_tokens`) and PubMedQA (`--pubmedqa_limit` items
of the 500-item test split) are scored for the base model and every adapter with `sftmix_trl.evaluation`.

Every finished run and evaluation is kept under `--work_dir` and reused when the script is run again (delete the
folder to start over). The table, the plot and the raw figures go to benchmarks/results/quality_<device>.{md,png,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("base", "NTP", "SFTMix")
# (label, where in the evaluation payload, higher is better)
METRICS = (
    ("held-out perplexity, medical (in-domain)", ("ppl_medical", "perplexity", "perplexity"), False),
    ("held-out perplexity, Alpaca (other domain)", ("ppl_alpaca", "perplexity", "perplexity"), False),
    ("IFEval prompt-level strict", ("tasks", "ifeval", "prompt_level_strict_acc"), True),
    ("IFEval prompt-level loose", ("tasks", "ifeval", "prompt_level_loose_acc"), True),
    ("PubMedQA accuracy", ("tasks", "pubmedqa", "acc"), True),
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data_dir = os.environ.get("SFTMIX_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--data_dir", default=data_dir, help="the shared data folder (SFTMIX_DATA_DIR)")
    parser.add_argument("--work_dir", default=str(ROOT / "outputs" / "quality"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--train_examples", type=int, default=96)
    parser.add_argument("--held_out", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=4, help="per step: K = batch_size / 2 pairs for SFTMix")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--ifeval_limit", type=int, default=32)
    parser.add_argument("--pubmedqa_limit", type=int, default=60)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    return parser.parse_args()


def write_splits(data_dir: Path, work: Path, n_train: int, n_held_out: int) -> dict[str, Path]:
    """Disjoint train / held-out subsets of the shared files, written to the work folder (never the repository)."""
    medical = json.loads((data_dir / "medical" / "medical_meadow_small.json").read_text())
    alpaca = json.loads((data_dir / "instruct" / "alpaca_5000.json").read_text())
    order = list(range(len(medical)))
    random.Random(0).shuffle(order)
    alpaca_order = list(range(len(alpaca)))
    random.Random(1).shuffle(alpaca_order)
    # Extra medical examples in the train file: the loader drops duplicates, and `max_train_examples` takes n_train
    splits = {
        "train": [medical[i] for i in order[: n_train + 32]],
        "medical_held_out": [medical[i] for i in order[n_train + 32 : n_train + 32 + n_held_out]],
        "alpaca_held_out": [alpaca[i] for i in alpaca_order[:n_held_out]],
    }
    paths = {}
    for name, records in splits.items():
        paths[name] = work / "data" / f"{name}.json"
        paths[name].parent.mkdir(parents=True, exist_ok=True)
        paths[name].write_text(json.dumps(records))
    return paths


def training_config(cls, args, seed: int, output_dir: Path, **extra):
    """The settings both methods share; SFTMix adds its own through `extra` (which may also override these)."""
    values = dict(
        output_dir=str(output_dir),
        seed=seed,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        max_length=args.max_length,
        activation_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        dataloader_pin_memory=False,
    )
    return cls(**(values | extra))


def train(method: str, seed: int, args, model_args, dataset, table, run_dir: Path) -> dict:
    """One training run (skipped when its summary exists); returns its summary."""
    from trl import SFTTrainer

    from sftmix_trl.configs import SFTConfig
    from sftmix_trl.model import load_model, load_tokenizer, lora_config
    from sftmix_trl.sftmix.config import SFTMixConfig
    from sftmix_trl.sftmix.trainer import SFTMixTrainer

    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        return json.loads(summary_path.read_text())
    tokenizer = load_tokenizer(model_args)
    model = load_model(model_args)
    common = dict(model=model, train_dataset=dataset, processing_class=tokenizer, peft_config=lora_config(model_args))
    if method == "NTP":
        trainer = SFTTrainer(args=training_config(SFTConfig, args, seed, run_dir), **common)
    else:
        config = training_config(
            SFTMixConfig, args, seed, run_dir, mixup_alpha=0.5, mixup_weight=0.2, mixup_lambda_per="pair"
        )
        trainer = SFTMixTrainer(args=config, confidence=table, **common)
    metrics = trainer.train().metrics
    trainer.save_model(str(run_dir / "adapter"))
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    summary = {
        "method": method,
        "seed": seed,
        "steps": trainer.state.global_step,
        "examples_seen": trainer.state.global_step * args.batch_size,
        "train_runtime": metrics["train_runtime"],
        "train_loss": metrics["train_loss"],
        "log": logs,
    }
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary


def evaluate_model(args, model_args, adapter: Path | None, out: Path, paths: dict[str, Path]) -> dict:
    """IFEval, PubMedQA and both held-out perplexities of one model (each task with its own limit); cached."""
    from sftmix_trl.evaluation import EvalArguments, evaluate

    summary_path = out / "summary.json"
    if summary_path.is_file():
        return json.loads(summary_path.read_text())
    data_dir = Path(args.data_dir) / "eval"
    jobs = {
        "ifeval": dict(
            ifeval_data=str(data_dir / "ifeval" / "input_data.jsonl"),
            max_new_tokens=args.max_new_tokens,
            limit=args.ifeval_limit,
        ),
        "pubmedqa": dict(pubmedqa_data=str(data_dir / "pubmedqa"), limit=args.pubmedqa_limit),
        "ppl_medical": dict(perplexity_data=str(paths["medical_held_out"])),
        "ppl_alpaca": dict(perplexity_data=str(paths["alpaca_held_out"])),
    }
    summary = {"tasks": {}, "seconds": {}}
    for name, settings in jobs.items():
        payload = evaluate(
            EvalArguments(
                tasks=["perplexity" if name.startswith("ppl") else name],
                output_dir=str(out / name),
                adapter_path=str(adapter) if adapter else None,
                batch_size=8,
                max_length=1024,
                **settings,
            ),
            model_args,
        )
        if name.startswith("ppl"):
            summary[name] = payload["results"]
        else:
            summary["tasks"][name] = payload["results"][name]
        summary["seconds"][name] = payload["wall_seconds"]
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary


def stage_one(args, model_args, dataset, work: Path):
    """The confidence table of the training set (reference run with the first seed), computed once."""
    from sftmix_trl.confidence import ConfidenceConfig, compute_confidence
    from sftmix_trl.sftmix.config import SFTMixConfig

    config = training_config(
        SFTMixConfig,
        args,
        args.seeds[0],
        work / "confidence_run",
        reference_epochs=args.epochs,
        reference_learning_rate=args.learning_rate,
        reference_batch_size=args.batch_size,
        num_confidence_checkpoints=3,
        scoring_batch_size=16,
    )
    return compute_confidence(dataset, model_args, config, ConfidenceConfig.from_args(config), work / "confidence")


def _get(summary: dict, path: tuple[str, ...]) -> float:
    for key in path:
        summary = summary[key]
    return float(summary)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def half_losses(log: list[dict]) -> dict[str, float]:
    """SFTMix's logged NTP loss of each half: over the whole run and over its last quarter of steps."""
    tail = log[-max(1, len(log) // 4) :]
    return {
        f"{half}_{span}": statistics.fmean(entry[f"ntp_loss_{half}"] for entry in entries)
        for half in ("confident", "unconfident")
        for span, entries in (("all", log), ("last_quarter", tail))
    }


def report(args, evals: dict, runs: list[dict], table, stage_seconds: float, wall: float, device: str) -> str:
    confident, unconfident = table.split()
    ppl = table.perplexities.mean(axis=1)
    ids = list(table.example_ids)
    position = {example_id: i for i, example_id in enumerate(ids)}
    ref_ppl = {
        name: statistics.fmean(ppl[position[i]] for i in half)
        for name, half in (("confident", confident), ("unconfident", unconfident))
    }
    steps = {run["steps"] for run in runs}
    eval_seconds = sum(sum(e["seconds"].values()) for m in evals.values() for e in m)
    lines = [
        f"# NTP vs SFTMix, same budget: SmolLM2-135M-Instruct 4-bit + LoRA, {device}",
        "",
        f"- Training: {args.train_examples} medical meadow (MedAlpaca WikiDoc) examples, {args.epochs:g} epoch, batch "
        f"{args.batch_size}, {'/'.join(map(str, sorted(steps)))} optimiser steps per run, learning rate "
        f"{args.learning_rate:g} (cosine, 10% warm-up), LoRA r=16 alpha=32 on all linear layers, max length "
        f"{args.max_length}. SFTMix: alpha=0.5, weight mu=0.2, one lambda per pair, K={args.batch_size // 2} pairs "
        "per micro-batch.",
        f"- Seeds: {', '.join(map(str, args.seeds))} (LoRA init, data order, dropout and lambdas). The base model is "
        "deterministic (greedy decoding) and evaluated once.",
        f"- Confidence split (stage 1, once, seed {args.seeds[0]}; 1 reference epoch, C=3 snapshots): "
        f"**{len(confident)} confident / {len(unconfident)} unconfident**; mean reference perplexity "
        f"{ref_ppl['confident']:.2f} vs {ref_ppl['unconfident']:.2f}. Stage-1 cost: {stage_seconds:.0f} s, on top "
        "of SFTMix's training budget below.",
        f"- Evaluation: held-out response perplexity on {args.held_out} medical meadow examples disjoint from the "
        f"training set (in-domain) and {args.held_out} Alpaca-5000 examples (other domain); IFEval, "
        f"{args.ifeval_limit} of 541 prompts, greedy, at most {args.max_new_tokens} new tokens; PubMedQA, "
        f"{args.pubmedqa_limit} of the 500 test items, by option log-likelihood (both a seeded random sample, "
        "the same items for every model). All in 4-bit, as trained. These "
        "subsets are small: one IFEval prompt is "
        f"{100 / args.ifeval_limit:.1f} points and one PubMedQA item {100 / args.pubmedqa_limit:.1f} points.",
        f"- Time: stage 1 {stage_seconds / 60:.1f} min, training {sum(r['train_runtime'] for r in runs) / 60:.1f} min "
        f"({len(runs)} runs), evaluation {eval_seconds / 60:.1f} min ({sum(map(len, evals.values()))} models); this "
        f"invocation's wall time {wall / 60:.1f} min (finished parts are reused, not re-run).",
        "",
        "| metric | base | NTP (mean ± std) | SFTMix (mean ± std) | SFTMix - NTP | better |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, path, higher in METRICS:
        base = _get(evals["base"][0], path)
        ntp = _mean_std([_get(e, path) for e in evals["NTP"]])
        mix = _mean_std([_get(e, path) for e in evals["SFTMix"]])
        diff = mix[0] - ntp[0]
        better = "tie" if abs(diff) < 1e-12 else ("SFTMix" if (diff > 0) == higher else "NTP")
        lines.append(
            f"| {label} | {base:.4f} | {ntp[0]:.4f} ± {ntp[1]:.4f} | {mix[0]:.4f} ± {mix[1]:.4f} | {diff:+.4f} | "
            f"{better} |"
        )
    lines += [
        "",
        "Per run (train loss: the NTP cross-entropy; for SFTMix the mean of its logged NTP part, without the Mixup "
        "term):",
        "",
        "| method | seed | steps | train loss | train s | ppl med | ppl alpaca | "
        "IFEval strict | IFEval loose | PubMedQA |",
        "| --- " * 10 + "|",
    ]
    for method in ("NTP", "SFTMix"):
        for run, ev in zip([r for r in runs if r["method"] == method], evals[method], strict=True):
            values = " | ".join(f"{_get(ev, path):.4f}" for _, path, _ in METRICS)
            loss = run["train_loss"] if method == "NTP" else statistics.fmean(e["ntp_loss"] for e in run["log"])
            lines.append(
                f"| {method} | {run['seed']} | {run['steps']} | {loss:.4f} | {run['train_runtime']:.0f} | {values} |"
            )
    lines += [
        "",
        "SFTMix's NTP training loss of each half (logged every step; whole run / last quarter of steps):",
        "",
        "| seed | confident | unconfident | confident, last quarter | unconfident, last quarter |",
        "| --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        if run["method"] == "SFTMix":
            h = half_losses(run["log"])
            lines.append(
                f"| {run['seed']} | {h['confident_all']:.4f} | {h['unconfident_all']:.4f} | "
                f"{h['confident_last_quarter']:.4f} | {h['unconfident_last_quarter']:.4f} |"
            )
    return "\n".join(lines) + "\n"


def plot(evals: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 4))
    colours = {"base": "tab:gray", "NTP": "tab:orange", "SFTMix": "tab:blue"}
    for ax, (label, key, higher) in zip(axes, METRICS, strict=True):
        for x, method in enumerate(METHODS):
            mean, std = _mean_std([_get(e, key) for e in evals[method]])
            ax.bar(x, mean, yerr=std, capsize=4, color=colours[method])
        ax.set_xticks(range(len(METHODS)), METHODS)
        ax.set_title(label + ("\n(higher is better)" if higher else "\n(lower is better)"), fontsize=9)
    fig.suptitle(f"NTP vs SFTMix, same budget; error bars: std over {len(evals['NTP'])} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    from sftmix_trl.configs import ModelArguments, ScriptArguments
    from sftmix_trl.data.load import load_datasets
    from sftmix_trl.demo_model import prepare_demo_model
    from sftmix_trl.evaluation.ifeval import check_punkt

    args = parse_args()
    start = time.perf_counter()
    check_punkt()  # before an hour of training, not after
    work = Path(args.work_dir)
    paths = write_splits(Path(args.data_dir), work, args.train_examples, args.held_out)
    model_args = ModelArguments(model_name_or_path=str(prepare_demo_model()), load_in_4bit=True)
    dataset = load_datasets(ScriptArguments(dataset_name=str(paths["train"]), max_train_examples=args.train_examples))[
        0
    ]

    table = stage_one(args, model_args, dataset, work)
    stage_seconds = table.metadata["reference_training_seconds"] + sum(p["seconds"] for p in table.metadata["scoring"])
    runs = [
        train(method, seed, args, model_args, dataset, table, work / f"{method.lower()}_seed{seed}")
        for seed in args.seeds
        for method in ("NTP", "SFTMix")
    ]
    evals = {"base": [evaluate_model(args, model_args, None, work / "eval_base", paths)]}
    for method in ("NTP", "SFTMix"):
        evals[method] = [
            evaluate_model(
                args,
                model_args,
                work / f"{method.lower()}_seed{s}" / "adapter",
                work / f"eval_{method.lower()}_seed{s}",
                paths,
            )
            for s in args.seeds
        ]

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    text = report(args, evals, runs, table, stage_seconds, time.perf_counter() - start, device)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "cuda" if torch.cuda.is_available() else "cpu"
    (RESULTS / f"quality_{name}.md").write_text(text)
    plot(evals, RESULTS / f"quality_{name}.png")
    raw = {"args": vars(args), "stage_one_seconds": stage_seconds, "runs": runs, "evals": evals}
    (RESULTS / f"quality_{name}.json").write_text(json.dumps(raw, indent=2))


if __name__ == "__main__":
    main()
