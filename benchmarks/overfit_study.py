"""NTP vs SFTMix where a regulariser has something to do: several epochs on little data, learning curves, ablations.

    python benchmarks/overfit_study.py [--seeds 42 43 44] [--epochs 6] [--train_examples 40] ...
    python benchmarks/overfit_study.py --report_only     # aggregate whatever runs have finished

SmolLM2-135M-Instruct, 4-bit base + LoRA, constant learning rate, on CPU (or a GPU unchanged). Every variant trains
on the same medical meadow examples with the same LoRA settings, learning rate, batch size and optimiser steps; they
differ only in the loss: TRL's `SFTTrainer` (NTP) or `SFTMixTrainer` with `mixup_weight` 0.2 (the paper's), 0.5 or
1.0. Stage 1 (the confidence table) runs once PER SEED, with that seed, so the reference run's randomness is part of
the spread over seeds; its cost is reported apart.

Every epoch the trainer evaluates the held-out response loss on `--held_out` medical meadow examples disjoint from the
training set (in-domain) and as many Alpaca-5000 examples (other domain), through `eval_dataset={...}`. After
training, every example of the training set is scored under the final adapter with stage 1's `score_perplexities`:
the spread (std) of that per-example perplexity is the paper's mechanism claim (SFTMix lowers it), and its
token-weighted mean loss is the training loss the generalisation gap is measured against.

Finished runs (a `summary.json` per run, a stage-1 table per seed) are kept under `--work_dir` and reused when the
script is run again; the report aggregates whatever runs have finished. Results go to
benchmarks/results/overfit_<device>.{md,png,json}; a "## Reading" section written by hand at the end of the .md is
kept when the figures are regenerated.

The defaults (8 training examples, max length 96, batch 2, 6 epochs) are sized for a 2-core CPU shared with other
jobs: 4 seeds x 4 variants took 57 min there, and NTP overfits after epoch 2. On a free machine or a GPU, raise
`--train_examples` and `--max_length` (NTP still has to overfit within `--epochs` for the comparison to mean anything).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import _mean_std, training_config, write_splits  # noqa: E402  (the first study's helpers)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# variant name -> mixup_weight (None: plain NTP through SFTTrainer)
VARIANTS = {"NTP": None, "SFTMix mu=0.2": 0.2, "SFTMix mu=0.5": 0.5, "SFTMix mu=1.0": 1.0}
FIRST = ("NTP", "SFTMix mu=0.2", "SFTMix mu=1.0")  # run for every seed before the others
READING = "## Reading"  # the hand-written section of the results file
HELD_OUT = ("medical", "alpaca")  # eval_dataset keys: in-domain, other domain


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data_dir = os.environ.get("SFTMIX_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--data_dir", default=data_dir, help="the shared data folder (SFTMIX_DATA_DIR)")
    parser.add_argument("--work_dir", default=str(ROOT / "outputs" / "overfit"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44, 45])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--train_examples", type=int, default=8)
    parser.add_argument("--held_out", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=2, help="per step: K = batch_size / 2 pairs for SFTMix")
    parser.add_argument("--epochs", type=float, default=6.0)
    parser.add_argument("--learning_rate", type=float, default=5e-4, help="constant, no warm-up")
    parser.add_argument("--max_length", type=int, default=96)
    parser.add_argument("--reference_epochs", type=float, default=1.0, help="stage 1's reference run")
    parser.add_argument("--report_only", action="store_true", help="aggregate the finished runs, train nothing")
    return parser.parse_args(argv)


def run_name(variant: str, seed: int) -> str:
    return variant.lower().replace("sftmix mu=", "sftmix_mu") + f"_seed{seed}"


# ----------------------------------------------------------------------------------------------------------------------
# Curves and spread: pure functions of what a run leaves behind


def _epoch_index(epoch: float) -> int:
    """1-based epoch a log entry belongs to: a step logged at epoch 1.2 is in epoch 2, an eval at 2.0 ends epoch 2."""
    return max(1, math.ceil(round(epoch, 6)))


def epoch_curves(log_history: list[dict], eval_names: tuple[str, ...] = HELD_OUT) -> dict[str, list[float]]:
    """Per-epoch curves from a Trainer's `log_history` (as in `trainer_state.json`).

    `eval_<name>_loss` per held-out set (one evaluation per epoch); the training metrics logged every step are
    averaged over the steps of each epoch: `train_ntp_loss` (SFTTrainer's `loss`, or SFTMix's `ntp_loss` without the
    Mixup term) and, where logged, SFTMix's per-half NTP losses and `mixup_token_share`.
    """
    steps: dict[str, dict[int, list[float]]] = {}
    evals: dict[str, dict[int, float]] = {name: {} for name in eval_names}
    sources = {
        "train_ntp_loss": ("ntp_loss", "loss"),
        "ntp_loss_confident": ("ntp_loss_confident",),
        "ntp_loss_unconfident": ("ntp_loss_unconfident",),
        "mixup_token_share": ("mixup_token_share",),
        "mixup_loss": ("mixup_loss",),
    }
    for entry in log_history:
        if "epoch" not in entry:
            continue
        epoch = _epoch_index(entry["epoch"])
        for name in eval_names:
            if f"eval_{name}_loss" in entry:
                evals[name][epoch] = entry[f"eval_{name}_loss"]
        if "loss" not in entry:  # not a training step (an evaluation, or the final train summary)
            continue
        for curve, keys in sources.items():
            key = next((k for k in keys if k in entry), None)
            if key is not None:
                steps.setdefault(curve, {}).setdefault(epoch, []).append(float(entry[key]))
    curves = {curve: [statistics.fmean(by_epoch[e]) for e in sorted(by_epoch)] for curve, by_epoch in steps.items()}
    for name, by_epoch in evals.items():
        if by_epoch:
            if sorted(by_epoch) != list(range(1, len(by_epoch) + 1)):
                raise ValueError(f"held-out '{name}' was not evaluated at every epoch: epochs {sorted(by_epoch)}")
            curves[f"eval_{name}_loss"] = [by_epoch[e] for e in sorted(by_epoch)]
    return curves


def curves_from_state(path: str | os.PathLike) -> dict[str, list[float]]:
    """`epoch_curves` of a saved `trainer_state.json` (a file, or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "trainer_state.json"
    return epoch_curves(json.loads(path.read_text())["log_history"])


def confidence_spread(perplexities: np.ndarray, num_tokens: np.ndarray) -> dict[str, float]:
    """How spread the per-example confidence (-perplexity) is, and the token-weighted mean loss of the set.

    `ppl_std` is the paper's measure (confidence = -PPL); `log_ppl_std` (the std of per-example mean NLL) is the same
    question less dominated by a few very unconfident examples. `loss` = sum_i n_i log PPL_i / sum_i n_i, the
    token-mean NLL that the trainer's `eval_loss` reports for a held-out set evaluated in one batch.
    """
    ppl = np.asarray(perplexities, dtype=np.float64)
    n = np.asarray(num_tokens, dtype=np.float64)
    log_ppl = np.log(ppl)
    return {
        "ppl_mean": float(ppl.mean()),
        "ppl_std": float(ppl.std(ddof=0)),
        "log_ppl_std": float(log_ppl.std(ddof=0)),
        "loss": float((log_ppl * n).sum() / n.sum()),
    }


def score_training_set(model, prepared_dataset, pad_token_id: int, batch_size: int = 16) -> dict[str, float]:
    """Stage 1's scoring (`score_perplexities`) of the prepared training set under the current adapter."""
    from sftmix_trl.perplexity import score_perplexities

    ppl, counts, stats = score_perplexities(model, prepared_dataset, batch_size, pad_token_id, "scoring train set")
    return confidence_spread(ppl, counts) | {"seconds": stats.seconds}


def run_summary_scalars(summary: dict) -> dict[str, float]:
    """The figures of one run the report compares: best and last held-out epoch, the rise, the gap, the spread."""
    out = {}
    for name in HELD_OUT:
        curve = summary["curves"].get(f"eval_{name}_loss")
        if not curve:
            continue
        best = int(np.argmin(curve))
        out[f"{name}_best"] = curve[best]
        out[f"{name}_best_epoch"] = best + 1
        out[f"{name}_last"] = curve[-1]
        out[f"{name}_rise"] = curve[-1] - curve[best]
        out[f"{name}_gap"] = curve[-1] - summary["train_scores"]["loss"]
    out["train_loss_final"] = summary["train_scores"]["loss"]
    out["ppl_std"] = summary["train_scores"]["ppl_std"]
    out["log_ppl_std"] = summary["train_scores"]["log_ppl_std"]
    out["ppl_mean"] = summary["train_scores"]["ppl_mean"]
    out["wall_seconds"] = summary["wall_seconds"]
    return out


def aggregate(summaries: list[dict]) -> dict[str, dict]:
    """Mean and std over seeds, per variant: every per-epoch curve (over the seeds that have it, epoch by epoch) and
    every scalar of `run_summary_scalars`. Works on whatever runs exist; `n` says how many seeds went in."""
    by_variant: dict[str, list[dict]] = {}
    for summary in summaries:
        by_variant.setdefault(summary["variant"], []).append(summary)
    result = {}
    for variant, runs in by_variant.items():
        curves = {}
        for curve in sorted({c for run in runs for c in run["curves"]}):
            series = [run["curves"][curve] for run in runs if curve in run["curves"]]
            length = min(map(len, series))
            stats = [_mean_std([s[e] for s in series]) for e in range(length)]
            curves[curve] = {"mean": [m for m, _ in stats], "std": [s for _, s in stats], "n": len(series)}
        scalars = [run_summary_scalars(run) for run in runs]
        result[variant] = {
            "seeds": sorted(run["seed"] for run in runs),
            "curves": curves,
            "scalars": {
                key: dict(zip(("mean", "std"), _mean_std([s[key] for s in scalars]), strict=True))
                for key in scalars[0]
            },
        }
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Runs


def stage_one(args, model_args, dataset, seed: int, work: Path):
    """This seed's confidence table: reference run with the seed, the training schedule, C=3 snapshots."""
    from sftmix_trl.confidence import ConfidenceConfig, compute_confidence
    from sftmix_trl.sftmix.config import SFTMixConfig

    config = _config(
        SFTMixConfig,
        args,
        seed,
        work / f"confidence_run_seed{seed}",
        reference_epochs=args.reference_epochs,
        reference_learning_rate=args.learning_rate,
        reference_batch_size=args.batch_size,
        num_confidence_checkpoints=3,
        scoring_batch_size=16,
    )
    return compute_confidence(
        dataset, model_args, config, ConfidenceConfig.from_args(config), work / f"confidence_seed{seed}"
    )


def _config(cls, args, seed: int, output_dir: Path, **extra):
    """quality.py's shared settings, with a constant learning rate and an evaluation at the end of every epoch."""
    return training_config(
        cls,
        args,
        seed,
        output_dir,
        lr_scheduler_type="constant",
        warmup_steps=0,
        eval_strategy="epoch",
        per_device_eval_batch_size=max(args.held_out, 1),  # one batch: eval_loss is the token mean of the set
        **extra,
    )


def train_variant(variant: str, seed: int, args, model_args, dataset, eval_datasets: dict, table, run_dir: Path):
    """One training run with per-epoch held-out evaluation and the post-training score of the training set; skipped
    when its `summary.json` exists. Returns the summary."""
    from trl import SFTTrainer

    from sftmix_trl.configs import SFTConfig
    from sftmix_trl.model import load_model, load_tokenizer, lora_config
    from sftmix_trl.sftmix.config import SFTMixConfig
    from sftmix_trl.sftmix.trainer import SFTMixTrainer

    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        return json.loads(summary_path.read_text())
    start = time.perf_counter()
    tokenizer = load_tokenizer(model_args)
    model = load_model(model_args)
    common = dict(
        model=model,
        train_dataset=dataset,
        eval_dataset=eval_datasets,
        processing_class=tokenizer,
        peft_config=lora_config(model_args),
    )
    weight = VARIANTS[variant]
    if weight is None:
        trainer = SFTTrainer(args=_config(SFTConfig, args, seed, run_dir), **common)
    else:
        config = _config(
            SFTMixConfig, args, seed, run_dir, mixup_alpha=0.5, mixup_weight=weight, mixup_lambda_per="pair"
        )
        trainer = SFTMixTrainer(args=config, confidence=table, **common)
    metrics = trainer.train().metrics
    trainer.save_model(str(run_dir / "adapter"))
    trainer.save_state()  # trainer_state.json: the curves are read back from it
    # Scored after saving: bitsandbytes' CPU repacking in eval mode must not reach a state_dict (load_model guards it)
    scores = score_training_set(trainer.model, trainer.train_dataset, tokenizer.pad_token_id)
    summary = {
        "variant": variant,
        "mixup_weight": weight,
        "seed": seed,
        "steps": trainer.state.global_step,
        "train_runtime": metrics["train_runtime"],
        "eval_seconds": sum(
            e[f"eval_{n}_runtime"]
            for e in trainer.state.log_history
            for n in eval_datasets
            if f"eval_{n}_runtime" in e
        ),
        "curves": curves_from_state(run_dir),
        "train_scores": scores,
        "wall_seconds": time.perf_counter() - start,
    }
    summary_path.write_text(json.dumps(summary, indent=2))
    del trainer, model
    return summary


def finished_runs(work: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(work.glob("*_seed*/summary.json"))]


def stage_one_costs(work: Path) -> dict[int, dict]:
    """Per seed: stage-1 seconds and the confident/unconfident split, from each finished table's metadata."""
    costs = {}
    for meta_path in sorted(work.glob("confidence_seed*/metadata.json")):
        meta = json.loads(meta_path.read_text())
        seed = int(meta_path.parent.name.removeprefix("confidence_seed"))
        costs[seed] = {
            "seconds": meta.get("reference_training_seconds", 0.0) + sum(p["seconds"] for p in meta["scoring"]),
            "num_confident": meta["num_confident"],
            "num_unconfident": meta["num_unconfident"],
        }
    return costs


# ----------------------------------------------------------------------------------------------------------------------
# Report


def _fmt(stat: dict, digits: int = 3) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def report(args, agg: dict, runs: list[dict], stage1: dict, device: str) -> str:
    variants = [v for v in VARIANTS if v in agg]
    steps = sorted({r["steps"] for r in runs})
    lines = [
        f"# Overfitting regime: NTP vs SFTMix, SmolLM2-135M-Instruct 4-bit + LoRA, {device}",
        "",
        f"- Training: {args.train_examples} medical meadow (MedAlpaca WikiDoc) examples, {args.epochs:g} epochs, batch "
        f"{args.batch_size}, {'/'.join(map(str, steps))} optimiser steps per run, learning rate "
        f"{args.learning_rate:g} constant (no warm-up), LoRA r=16 alpha=32 on all linear layers, max length "
        f"{args.max_length}. SFTMix: alpha=0.5, one lambda per pair, K={args.batch_size // 2} random "
        "confident/unconfident pairs per micro-batch; mixup_weight mu as named.",
        f"- Seeds: {', '.join(str(s) for s in sorted({r['seed'] for r in runs}))} (LoRA init, data order, dropout, "
        "lambdas, and the stage-1 reference run: one confidence table per seed). Same training and held-out examples "
        "for every seed.",
        f"- Stage 1 per seed ({args.reference_epochs:g} reference epoch, constant lr, C=3 snapshots): "
        + "; ".join(
            f"seed {s}: {c['num_confident']} confident / {c['num_unconfident']} unconfident, {c['seconds']:.0f} s"
            for s, c in sorted(stage1.items())
        )
        + ". Not counted in the runs' wall time below.",
        f"- Held out, evaluated at the end of every epoch (TRL's eval loss: token-mean response NLL, one batch per set): "
        f"{args.held_out} medical meadow examples disjoint from the training set (in-domain) and {args.held_out} "
        "Alpaca-5000 examples (other domain). Perplexity = exp(loss).",
        "- After training, every training example is scored under the final adapter with stage 1's "
        "`score_perplexities`: `train loss` is their token-mean NLL (eval mode, same definition as the held-out "
        "loss), the gap is held-out loss minus it at the last epoch, and the spread is the std over examples of "
        "their perplexity (the paper's confidence = -PPL) and of log-perplexity.",
        "- Not run: length-aware pairing (built in parallel by another issue, not available on this branch). One "
        "lambda per batch vs per pair was not run either"
        + (
            f": with K={args.batch_size // 2} pair per micro-batch the two are the same draw."
            if args.batch_size == 2
            else "."
        ),
        "- Wall time: runs went one or two at a time beside other jobs on the shared 2-core machine, so the wall "
        "seconds below measure the load as much as the method.",
        "",
        "## Held-out loss (mean ± std over seeds)",
        "",
        "| variant | seeds | medical best | best epoch | medical last | rise after best | alpaca best | best epoch "
        "| alpaca last | rise after best |",
        "| --- " * 10 + "|",
    ]
    for v in variants:
        s = agg[v]["scalars"]
        row = [v, str(len(agg[v]["seeds"]))]
        for name in HELD_OUT:
            row += [
                _fmt(s[f"{name}_best"]),
                f"{s[f'{name}_best_epoch']['mean']:.1f}",
                _fmt(s[f"{name}_last"]),
                _fmt(s[f"{name}_rise"]),
            ]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Perplexity (exp of the mean loss above): "
        + "; ".join(
            f"{v}: medical best {math.exp(agg[v]['scalars']['medical_best']['mean']):.2f} / last "
            f"{math.exp(agg[v]['scalars']['medical_last']['mean']):.2f}, alpaca best "
            f"{math.exp(agg[v]['scalars']['alpaca_best']['mean']):.2f} / last "
            f"{math.exp(agg[v]['scalars']['alpaca_last']['mean']):.2f}"
            for v in variants
        )
        + ".",
        "",
        "## Paired differences against NTP (same seed; mean ± std over seeds)",
        "",
        "Negative is better for SFTMix. Against it, the seed-to-seed std of NTP itself is in the first table.",
        "",
        "| variant | seeds | medical best | medical last | alpaca best | alpaca last | gap (medical) | train-set ppl std "
        "(ratio to NTP) |",
        "| --- " * 8 + "|",
    ]
    ntp = {r["seed"]: run_summary_scalars(r) for r in runs if r["variant"] == "NTP"}
    for v in variants[1:]:
        mine = {r["seed"]: run_summary_scalars(r) for r in runs if r["variant"] == v and r["seed"] in ntp}
        if not mine:
            continue
        cells = [v, str(len(mine))]
        for key in ("medical_best", "medical_last", "alpaca_best", "alpaca_last", "medical_gap"):
            m, s = _mean_std([mine[seed][key] - ntp[seed][key] for seed in mine])
            cells.append(f"{m:+.3f} ± {s:.3f}")
        m, s = _mean_std([mine[seed]["ppl_std"] / ntp[seed]["ppl_std"] for seed in mine])
        cells.append(f"{m:.3f} ± {s:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Last epoch: generalisation gap and confidence spread on the training set",
        "",
        "| variant | train loss (final adapter) | gap medical | gap alpaca | train-set ppl mean | ppl std "
        "| log-ppl std | wall s per run |",
        "| --- " * 8 + "|",
    ]
    for v in variants:
        s = agg[v]["scalars"]
        lines.append(
            f"| {v} | {_fmt(s['train_loss_final'])} | {_fmt(s['medical_gap'])} | {_fmt(s['alpaca_gap'])} | "
            f"{_fmt(s['ppl_mean'], 2)} | {_fmt(s['ppl_std'], 2)} | {_fmt(s['log_ppl_std'])} | "
            f"{_fmt(s['wall_seconds'], 0)} |"
        )
    lines += ["", "## Curves by epoch (mean ± std over seeds)", ""]
    for curve, label in (
        ("eval_medical_loss", "held-out loss, medical (in-domain)"),
        ("eval_alpaca_loss", "held-out loss, Alpaca (other domain)"),
        ("train_ntp_loss", "training NTP loss (logged per step, averaged over the epoch; train mode)"),
        ("ntp_loss_confident", "SFTMix: NTP loss of the confident half"),
        ("ntp_loss_unconfident", "SFTMix: NTP loss of the unconfident half"),
        ("mixup_token_share", "SFTMix: mixup_token_share (share of response tokens in the Mixup, 2M / total)"),
    ):
        present = [v for v in variants if curve in agg[v]["curves"]]
        if not present:
            continue
        epochs = max(len(agg[v]["curves"][curve]["mean"]) for v in present)
        lines += [
            f"{label}:",
            "",
            "| variant | " + " | ".join(f"epoch {e + 1}" for e in range(epochs)) + " |",
            "| --- " * (epochs + 1) + "|",
        ]
        for v in present:
            c = agg[v]["curves"][curve]
            cells = [f"{m:.3f} ± {s:.3f}" for m, s in zip(c["mean"], c["std"], strict=True)]
            lines.append(f"| {v} | " + " | ".join(cells + [""] * (epochs - len(cells))) + " |")
        lines.append("")
    lines += [
        "## Per run",
        "",
        "| variant | seed | steps | medical best (epoch) | medical last | alpaca best (epoch) | alpaca last "
        "| train loss | ppl std | train s | eval s | scoring s | wall s |",
        "| --- " * 13 + "|",
    ]
    for r in sorted(runs, key=lambda r: (list(VARIANTS).index(r["variant"]), r["seed"])):
        s = run_summary_scalars(r)
        lines.append(
            f"| {r['variant']} | {r['seed']} | {r['steps']} | {s['medical_best']:.3f} ({s['medical_best_epoch']}) | "
            f"{s['medical_last']:.3f} | {s['alpaca_best']:.3f} ({s['alpaca_best_epoch']}) | {s['alpaca_last']:.3f} | "
            f"{s['train_loss_final']:.3f} | {s['ppl_std']:.2f} | {r['train_runtime']:.0f} | {r['eval_seconds']:.0f} | "
            f"{r['train_scores']['seconds']:.0f} | {r['wall_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(agg: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in VARIANTS if v in agg]
    colours = dict(zip(VARIANTS, ("tab:orange", "tab:blue", "tab:purple", "tab:green"), strict=True))
    panels = (
        ("eval_medical_loss", "held-out loss, medical (in-domain)"),
        ("eval_alpaca_loss", "held-out loss, Alpaca (other domain)"),
        ("train_ntp_loss", "training NTP loss (per-epoch mean)"),
        ("halves", "SFTMix NTP loss by half\n(solid confident, dashed unconfident)"),
        ("mixup_token_share", "SFTMix mixup_token_share\n(pairs depend on the seed, not on mu)"),
    )
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    axes = axes.ravel()
    for ax, (curve, title) in zip(axes, panels, strict=False):
        for v in variants:
            keys = ("ntp_loss_confident", "ntp_loss_unconfident") if curve == "halves" else (curve,)
            for key, style in zip(keys, ("-", "--"), strict=False):
                c = agg[v]["curves"].get(key)
                if c is None:
                    continue
                x = np.arange(1, len(c["mean"]) + 1)
                mean, std = np.array(c["mean"]), np.array(c["std"])
                ax.plot(x, mean, style, marker="o", ms=3, color=colours[v], label=v if style == "-" else None)
                ax.fill_between(x, mean - std, mean + std, color=colours[v], alpha=0.15)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    bars = (
        ("medical_gap", "generalisation gap, last epoch\n(held-out medical - train loss)"),
        ("ppl_std", "train-set perplexity std, final adapter\n(confidence spread)"),
        ("wall_seconds", "wall time per run (s)"),
    )
    for ax, (key, title) in zip(axes[len(panels) :], bars, strict=True):
        for x, v in enumerate(variants):
            stat = agg[v]["scalars"][key]
            ax.bar(x, stat["mean"], yerr=stat["std"], capsize=4, color=colours[v])
        ax.set_xticks(range(len(variants)), [v.replace("SFTMix ", "") for v in variants], fontsize=8)
        ax.set_title(title, fontsize=10)
    seeds = max(len(agg[v]["seeds"]) for v in variants)
    fig.suptitle(f"NTP vs SFTMix, overfitting regime; bands and error bars: std over seeds (up to {seeds})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    from sftmix_trl.configs import ModelArguments, ScriptArguments
    from sftmix_trl.data.load import load_datasets
    from sftmix_trl.demo_model import prepare_demo_model

    args = parse_args(argv)
    work = Path(args.work_dir)
    if not args.report_only:
        paths = write_splits(Path(args.data_dir), work, args.train_examples, args.held_out)
        model_args = ModelArguments(model_name_or_path=str(prepare_demo_model()), load_in_4bit=True)
        dataset = load_datasets(
            ScriptArguments(dataset_name=str(paths["train"]), max_train_examples=args.train_examples)
        )[0]
        eval_datasets = {
            "medical": load_datasets(ScriptArguments(dataset_name=str(paths["medical_held_out"])))[0],
            "alpaca": load_datasets(ScriptArguments(dataset_name=str(paths["alpaca_held_out"])))[0],
        }
        # NTP, the paper's weight and the strongest first over every seed, then the others: a study cut short has the
        # comparisons that matter most
        order = [(s, v) for s in args.seeds for v in FIRST if v in args.variants]
        order += [(s, v) for v in args.variants if v not in FIRST for s in args.seeds]
        tables = {}
        for seed, variant in order:
            if VARIANTS[variant] is not None and seed not in tables:
                tables[seed] = stage_one(args, model_args, dataset, seed, work)
            print(f"[{time.strftime('%H:%M:%S')}] {variant} seed {seed}", flush=True)
            train_variant(
                variant,
                seed,
                args,
                model_args,
                dataset,
                eval_datasets,
                tables.get(seed),
                work / run_name(variant, seed),
            )
    runs = finished_runs(work)
    if not runs:
        raise SystemExit(f"error: no finished run under {work}")
    agg = aggregate(runs)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    text = report(args, agg, runs, stage_one_costs(work), device)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "cuda" if torch.cuda.is_available() else "cpu"
    md = RESULTS / f"overfit_{name}.md"
    # The hand-written reading at the end of the file survives a regeneration of the figures above it
    reading = md.read_text().partition(READING)[2] if md.is_file() else ""
    md.write_text(text + (f"\n{READING}{reading}" if reading else ""))
    plot(agg, RESULTS / f"overfit_{name}.png")
    raw = {"args": vars(args), "stage_one": stage_one_costs(work), "runs": runs, "aggregate": agg}
    (RESULTS / f"overfit_{name}.json").write_text(json.dumps(raw, indent=2))


if __name__ == "__main__":
    main()
