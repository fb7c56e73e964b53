"""Which stage-1 signal finds mislabelled training examples: measured on injected noise in real medical data.

    SFTMIX_DATA_DIR=../shared/data python benchmarks/noise_detection.py detect
    SFTMIX_DATA_DIR=../shared/data python benchmarks/noise_detection.py stage1 --examples 60 --rate 0.2
    SFTMIX_DATA_DIR=../shared/data python benchmarks/noise_detection.py exclusion --examples 60 --rate 0.2
    python benchmarks/noise_detection.py table --demo_metadata outputs/demo/sftmix_qlora/confidence/metadata.json

`detect`: base-model signals at every rate and seed (no training). `stage1`: the whole stage 1 with its data report,
both prompt-fit models, one rate and seed. `exclusion`: held-out loss of NTP with and without the suspicious share.
`table`: benchmarks/results/noise_detection.md from the three (and the demo's stage-1 metadata for the cost).

Data: `--examples` records of medical_meadow_small.json (SFTMIX_DATA_DIR, default ../shared/data), drawn with a fixed
seed. Noise: a share `rate` of them get another record's answer: the chosen records' answers are rotated among
themselves (a random cycle), so the set of answers is the same at every rate and each injected answer is a real,
fluent medical answer, just not to its question. Model: SmolLM2-135M-Instruct (4-bit base, LoRA r=16 reference).

For each signal: AUROC (injected vs clean), and precision and recall among the top 10% flagged. The signals:
- `confidence` (SFTMix's, -mean perplexity over the C snapshots; low = suspicious),
- `variability` (std of the perplexity across the snapshots; high = suspicious),
- `perplexity_base` (the base model's perplexity of the response given its prompt; high = suspicious),
- `prompt_fit_base`, `prompt_fit_reference` (PPL(response | prompt) / PPL(response alone); high = suspicious),
- `suspicious` (the report's rank, `sftmix_trl.confidence.report.suspicious_score`).
`detect` needs no reference: it runs every rate and seed; `stage1` trains one reference (rate 10%, seed 0) through
`compute_confidence`, as a user's stage 1 does, and times the report's extra passes against the rest of stage 1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA = (
    Path(os.environ.get("SFTMIX_DATA_DIR", ROOT.parent / "shared" / "data")) / "medical" / "medical_meadow_small.json"
)
FLAGGED_SHARE = 0.10


# ----------------------------------------------------------------------------------------------------------------------
# Noise and metrics (pure)


def sample_records(path: Path, count: int, seed: int = 0) -> list[dict]:
    """`count` distinct records (no two with the same question or answer), drawn with `seed`."""
    records = json.loads(path.read_text())
    random.Random(seed).shuffle(records)
    chosen, questions, answers = [], set(), set()
    for record in records:
        question = (record["instruction"], record.get("input", ""))
        if question in questions or record["output"] in answers or not record["output"].strip():
            continue
        questions.add(question)
        answers.add(record["output"])
        chosen.append(record)
        if len(chosen) == count:
            return chosen
    raise SystemExit(f"{path} has only {len(chosen)} distinct records, {count} asked")


def inject_noise(records: list[dict], rate: float, seed: int) -> tuple[list[dict], list[bool]]:
    """A copy where round(rate x N) records carry another chosen record's answer (a random cycle among them)."""
    rng = random.Random(seed)
    count = round(rate * len(records))
    chosen = rng.sample(range(len(records)), count)
    noisy = [dict(r) for r in records]
    for position, index in enumerate(chosen):  # record chosen[k] gets the answer of chosen[k + 1]
        noisy[index]["output"] = records[chosen[(position + 1) % count]]["output"]
    injected = [False] * len(records)
    for index in chosen:
        injected[index] = True
    return noisy, injected


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random injected example scores above a random clean one (ties count half)."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    pos, neg = scores[positive], scores[~positive]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def top_share_precision_recall(scores: np.ndarray, positive: np.ndarray, share: float) -> tuple[float, float]:
    """Precision and recall of flagging the ceil(share x N) highest scores (ties broken by position)."""
    positive = np.asarray(positive, dtype=bool)
    k = int(np.ceil(share * len(scores)))
    flagged = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]
    hits = int(positive[flagged].sum())
    return hits / k, hits / max(int(positive.sum()), 1)


def signal_metrics(signals: dict[str, np.ndarray], injected: list[bool], share: float = FLAGGED_SHARE) -> dict:
    """Per signal (oriented: higher = more suspicious): AUROC, precision and recall among the top `share`."""
    out = {}
    for name, scores in signals.items():
        precision, recall = top_share_precision_recall(scores, np.asarray(injected), share)
        out[name] = {"auroc": auroc(scores, np.asarray(injected)), "precision": precision, "recall": recall}
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Runs


def _load(records: list[dict], work: Path, name: str):
    from sftmix_trl.configs import ScriptArguments
    from sftmix_trl.data.load import load_datasets

    path = work / f"{name}.json"
    path.write_text(json.dumps(records))
    return load_datasets(ScriptArguments(dataset_name=str(path)))[0]


def _injected_ids(dataset, noisy: list[dict], injected: list[bool]) -> set[str]:
    """The example ids of the injected records (found by their text: the loader shuffles)."""
    from sftmix_trl.data.load import EXAMPLE_ID

    wanted = {
        (f"{r['instruction']}\n\n{r['input']}" if r.get("input") else r["instruction"], r["output"])
        for r, bad in zip(noisy, injected)
        if bad
    }
    ids = {
        row[EXAMPLE_ID]
        for row in dataset
        if (row["prompt"][-1]["content"], row["completion"][-1]["content"]) in wanted
    }
    if len(ids) != len(wanted):
        raise RuntimeError(f"found {len(ids)} of {len(wanted)} injected examples")
    return ids


def _demo_args(work: Path, max_length: int, **overrides):
    from sftmix_trl.configs import ModelArguments
    from sftmix_trl.demo_model import prepare_demo_model
    from sftmix_trl.sftmix.config import SFTMixConfig

    values = dict(
        output_dir=str(work / "run"),
        report_to="none",
        max_length=max_length,
        per_device_train_batch_size=8,
        reference_batch_size=8,
        scoring_batch_size=16,
        gradient_checkpointing=False,
        save_strategy="no",
        logging_steps=1000,
        disable_tqdm=False,
    )
    values.update(overrides)
    return ModelArguments(model_name_or_path=str(prepare_demo_model()), load_in_4bit=True), SFTMixConfig(**values)


def detect(args) -> None:
    """Base-model signals (no reference to train) at every rate and seed, scored in one prepared dataset: the clean
    rows once, each variant's injected rows once."""
    from datasets import concatenate_datasets

    from sftmix_trl.confidence.prompt_fit import adapter_disabled, response_frame_ids, score_prompt_fit
    from sftmix_trl.data.load import EXAMPLE_ID
    from sftmix_trl.model import load_model, load_tokenizer, lora_config
    from sftmix_trl.sft_trainer import TruncatingSFTTrainer

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    records = sample_records(DATA, args.examples)
    variants = {}
    for rate in args.rates:
        for seed in args.seeds:
            noisy, injected = inject_noise(records, rate, seed)
            dataset = _load(noisy, work, f"r{rate}-s{seed}")
            variants[(rate, seed)] = (dataset, _injected_ids(dataset, noisy, injected))
    union = concatenate_datasets([dataset for dataset, _ in variants.values()])
    seen, keep = set(), []
    for index, example_id in enumerate(union[EXAMPLE_ID]):
        if example_id not in seen:
            seen.add(example_id)
            keep.append(index)
    union = union.select(keep)

    model_args, training_args = _demo_args(work, args.max_length)
    tokenizer = load_tokenizer(model_args, False, None, False)
    trainer = TruncatingSFTTrainer(
        model=load_model(model_args, False),
        args=training_args,
        train_dataset=union,
        processing_class=tokenizer,
        peft_config=lora_config(model_args),
    )
    prepared = trainer.train_dataset
    start = time.perf_counter()
    with adapter_disabled(trainer.model):
        scores = score_prompt_fit(
            trainer.model, prepared, response_frame_ids(tokenizer), 16, tokenizer.pad_token_id, desc="base"
        )
    seconds = time.perf_counter() - start
    by_id = {
        example_id: (given, fit)
        for example_id, given, fit in zip(prepared[EXAMPLE_ID], scores.ppl_given_prompt, scores.prompt_fit)
    }
    rows = []
    for (rate, seed), (dataset, injected_ids) in variants.items():
        ids = [i for i in dataset[EXAMPLE_ID] if i in by_id]
        signals = {
            "perplexity_base": np.array([by_id[i][0] for i in ids]),
            "prompt_fit_base": np.array([by_id[i][1] for i in ids]),
        }
        metrics = signal_metrics(signals, [i in injected_ids for i in ids])
        rows.append({"rate": rate, "seed": seed, "scored": len(ids), "injected": len(injected_ids), **metrics})
        print(rate, seed, json.dumps(metrics))
        (work / f"base-r{rate}-s{seed}.json").write_text(
            json.dumps({i: {"prompt_fit_base": by_id[i][1], "injected": i in injected_ids} for i in ids})
        )
    out = {
        "examples": args.examples,
        "max_length": args.max_length,
        "rows_scored": len(prepared),
        "scoring_seconds": seconds,
        "results": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "noise_detection_detect.json").write_text(json.dumps(out, indent=2))


def _variant(args, work: Path):
    """The variant `--rate`, `--seed` of the `--examples` records, loaded, and the ids of its injected examples; and
    `--held_out` clean records that follow them in the draw."""
    records = sample_records(DATA, args.examples + args.held_out)
    noisy, injected = inject_noise(records[: args.examples], args.rate, args.seed)
    dataset = _load(noisy, work, f"n{args.examples}-r{args.rate}-s{args.seed}")
    return dataset, _injected_ids(dataset, noisy, injected), _load(records[args.examples :], work, "held-out")


def _stage1_report(dataset, work: Path, max_length: int, prompt_fit_model: str) -> tuple[dict, float | None]:
    """Stage 1 through `compute_confidence`, as a user's run does, with the data report of `prompt_fit_model` (kept
    as report-<model>.parquet); the second model's report reuses the table and runs only its own passes, as
    `sftmix-trl report` does. Returns the report and the seconds of its prompt-fit passes (None: made before)."""
    import shutil

    import pyarrow.parquet as pq

    from sftmix_trl.confidence import ConfidenceConfig, compute_confidence
    from sftmix_trl.confidence.report import REPORT_TABLE

    model_args, training_args = _demo_args(
        work, max_length, output_dir=str(work / "stage1"), prompt_fit_model=prompt_fit_model
    )
    directory = Path(training_args.confidence_dir)
    kept = directory / f"report-{prompt_fit_model}.parquet"
    seconds = None
    if not kept.is_file():
        (directory / REPORT_TABLE).unlink(missing_ok=True)  # so that stage 1 writes this model's report
        table = compute_confidence(
            dataset, model_args, training_args, ConfidenceConfig.from_args(training_args), directory
        )
        seconds = table.metadata["data_report"]["prompt_fit_seconds"]
        shutil.copy(directory / REPORT_TABLE, kept)
    return pq.read_table(kept).to_pydict(), seconds


def stage1(args) -> None:
    """Stage 1 with both prompt-fit models on one noisy variant: every signal's detection figures, and the time of
    each part of the stage."""
    from sftmix_trl.confidence.report import suspicious_score

    work = Path(args.work)
    dataset, injected_ids, _ = _variant(args, work)
    reference, reference_seconds = _stage1_report(dataset, work, args.max_length, "reference")
    base, base_seconds = _stage1_report(dataset, work, args.max_length, "base")
    ids = base["example_id"]
    if ids != reference["example_id"]:
        raise SystemExit("the two reports do not list the same examples in the same order")
    signals = {
        "confidence": -np.asarray(base["confidence"]),  # low confidence = suspicious
        "variability": np.asarray(base["variability"]),
        "prompt_fit_base": np.asarray(base["prompt_fit"]),
        "prompt_fit_reference": np.asarray(reference["prompt_fit"]),
        "suspicious": -np.asarray(base["suspicious_rank"], dtype=np.float64),  # the report's ranking (default)
    }
    # A combination, to check that nothing is left on the table: the mean of the rank percentiles of the base's
    # prompt fit and of low confidence
    percentile = lambda x: np.argsort(np.argsort(x)) / (len(x) - 1)  # noqa: E731
    signals["combined"] = (percentile(signals["prompt_fit_base"]) + percentile(signals["confidence"])) / 2
    assert np.allclose(suspicious_score(signals["prompt_fit_base"]), signals["prompt_fit_base"])
    metrics = signal_metrics(signals, [i in injected_ids for i in ids])
    print(json.dumps(metrics, indent=1))
    meta = json.loads((work / "stage1" / "confidence" / "metadata.json").read_text())
    previous = RESULTS / "noise_detection_stage1.json"  # a rerun that made no pass keeps the measured times
    previous = json.loads(previous.read_text()) if previous.is_file() else {}
    out = {
        "examples": args.examples,
        "rate": args.rate,
        "seed": args.seed,
        "injected": len(injected_ids),
        "max_length": args.max_length,
        "reference_training_seconds": meta.get("reference_training_seconds"),
        "scoring_seconds": [s["seconds"] for s in meta.get("scoring", [])],
        "prompt_fit_reference_seconds": reference_seconds or previous.get("prompt_fit_reference_seconds"),
        "prompt_fit_base_seconds": base_seconds or previous.get("prompt_fit_base_seconds"),
        "results": metrics,
    }
    (RESULTS / "noise_detection_stage1.json").write_text(json.dumps(out, indent=2))


def _held_out_loss(model, tokenizer, held_out_prepared) -> float:
    """Token-weighted mean NLL of the held-out responses (log of their pooled perplexity)."""
    from sftmix_trl.perplexity import score_perplexities

    ppl, counts, _ = score_perplexities(model, held_out_prepared, 16, tokenizer.pad_token_id, "held-out")
    return float((np.log(ppl) * counts).sum() / counts.sum())


def exclusion(args) -> None:
    """NTP for one epoch (the reference's settings) on the `stage1` variant without the `--exclude` most suspicious
    share of its report (`exclude_suspicious`, as stage 2 does), against the same run on everything (the stage-1
    reference itself: its last snapshot), on clean held-out records."""
    from sftmix_trl.confidence import ConfidenceConfig, ConfidenceTable
    from sftmix_trl.confidence.reference import _reference_args
    from sftmix_trl.confidence.snapshots import load_snapshot
    from sftmix_trl.data.load import EXAMPLE_ID
    from sftmix_trl.model import load_model, load_tokenizer, lora_config
    from sftmix_trl.sft_trainer import TruncatingSFTTrainer
    from sftmix_trl.sftmix.exclusion import exclude_suspicious
    from sftmix_trl.sharded import load_adapter_state

    work = Path(args.work)
    dataset, injected_ids, held_out = _variant(args, work)
    directory = work / "stage1" / "confidence"
    _, kept, _ = exclude_suspicious(ConfidenceTable.load(directory), dataset, directory, args.exclude)
    arms = {f"top {args.exclude:.0%} suspicious left out": kept, "all examples": dataset}
    model_args, training_args = _demo_args(work, args.max_length, output_dir=str(work / "exclusion"))
    config = ConfidenceConfig.from_args(training_args)
    tokenizer = load_tokenizer(model_args, False, None, False)
    rows = []
    for name, data in arms.items():
        start = time.perf_counter()
        trainer = TruncatingSFTTrainer(
            model=load_model(model_args, False),
            args=_reference_args(training_args, config, work / "exclusion"),
            train_dataset=data,
            eval_dataset=held_out,
            processing_class=tokenizer,
            peft_config=lora_config(model_args),
        )
        if name == "all examples":  # the stage-1 reference is this very run on all examples: its last snapshot
            last = json.loads((directory / "snapshots" / "steps.json").read_text())[-1]
            load_adapter_state(trainer.model, load_snapshot(directory / "snapshots" / f"step-{last}"))
        else:
            trainer.train()
        loss = _held_out_loss(trainer.model, tokenizer, trainer.eval_dataset)
        rows.append(
            {
                "arm": name,
                "train_examples": len(data),
                "injected_in_training": len(set(data[EXAMPLE_ID]) & injected_ids),
                "held_out_loss": loss,
                "held_out_perplexity": float(np.exp(loss)),
                "seconds": time.perf_counter() - start,
            }
        )
        print(rows[-1])
        del trainer
    out = {"examples": args.examples, "rate": args.rate, "seed": args.seed, "held_out": len(held_out), "rows": rows}
    (RESULTS / "noise_detection_exclusion.json").write_text(json.dumps(out, indent=2))


NOTES = """## Reading

- Prompt fit is the signal. On the base model it needs no reference, so it was measured at every rate and seed:
  at 10% noise about two thirds of the top 10% flagged are injected (target: half), AUROC about 0.9. SFTMix
  confidence and variability, and the base model's perplexity alone, sit near chance (AUROC 0.5-0.65): a low
  confidence mostly marks a long or technical answer, a hard one, not a wrong one. Ranking by prompt fit and
  confidence together is worse than prompt fit alone, so `suspicious_rank` is prompt fit alone.
- Base or reference: on the one reference run both prompt fits rank alike (AUROC 0.83 and 0.84; each flags 6
  examples, all injected). The base is the default: it needs no snapshot (so it works on any table, and on data
  before any training), and a reference that has trained on the mismatched pairs starts to learn them, which may
  blur its signal over more epochs (not measured here); the reference's prompt fit costs one pass instead of two.
- Precision at a fixed 10% flagged is bounded by the noise rate (at 5% noise at most half the flagged can be
  injected; recall is then high), so read recall at low rates and precision at high ones.
- Leaving the suspicious share out did not lower the held-out loss here: 3.338 without the top 10% (6 examples,
  all of them injected) against 3.315 on everything, on 40 clean held-out records. One seed, 60 training records,
  one epoch: the run without them also takes 7 optimizer steps instead of 8, and a mismatched answer is still a
  fluent medical answer, so at this scale it teaches the domain more than it misleads. No gain is shown, which is
  why `exclude_suspicious_fraction` stays opt-in (default 0) and the report is meant to be read: what a mismatched
  pair costs shows on larger data, over more epochs (where a model memorises it) and in answers to those questions.
- Scale: 200 records (detect) and 60 (one reference run) on a shared 2-core CPU; two seeds. The figures are
  indicative, not tight: a 10% flagged share of 200 is 20 examples.
- Larger models: a stronger base model predicts a well-matched answer better from its question, so PPL(response |
  prompt) falls further below PPL(response alone) for clean pairs and the two groups separate more; mismatches that
  stay on topic (same disease, wrong section), which a 135M model cannot tell apart, should then also be found.
  The price is two forward passes of that model (no backward), small next to the reference epoch. With a smaller
  reference model (`reference_model_name_or_path`), the base used is the reference's base, the cheaper one.
"""


def _fmt(metrics: dict) -> str:
    return f"{metrics['auroc']:.2f} | {metrics['precision']:.0%} | {metrics['recall']:.0%}"


def table(args) -> None:
    """benchmarks/results/noise_detection.md from the JSON files of the three steps."""
    detect_out = json.loads((RESULTS / "noise_detection_detect.json").read_text())
    lines = [
        "# Finding injected mismatched answers with the stage-1 signals",
        "",
        "Made by `benchmarks/noise_detection.py` (steps detect, stage1, exclusion, table) on a shared 2-core CPU. "
        f"{detect_out['examples']} distinct records of medical_meadow_small.json; a share of them get another "
        "chosen record's answer (a random cycle among the chosen); SmolLM2-135M-Instruct in 4 bits, "
        f"max_length {detect_out['max_length']}. Flagged: the top {FLAGGED_SHARE:.0%} of each signal. Precision: "
        "injected among the flagged; recall: flagged among the injected; AUROC: injected vs clean.",
        "",
        "## Base model (no reference needed): every rate and seed",
        "",
        "Perplexity (base): the base model's PPL(response | prompt) alone, the signal a plain loss filter uses. "
        "Prompt fit (base): PPL(response | prompt) / PPL(response alone). At 5% noise, 10 injected among 20 "
        "flagged: precision cannot exceed 50%.",
        "",
        "| noise rate | seed | injected | perplexity AUROC | precision | recall | prompt fit AUROC | precision "
        "| recall |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in detect_out["results"]:
        lines.append(
            f"| {row['rate']:.0%} | {row['seed']} | {row['injected']} | {_fmt(row['perplexity_base'])} | "
            f"{_fmt(row['prompt_fit_base'])} |"
        )
    by_rate = {}
    for row in detect_out["results"]:
        by_rate.setdefault(row["rate"], []).append(row["prompt_fit_base"])
    lines += ["", "Prompt fit (base), mean over seeds:", ""]
    for rate, metrics in by_rate.items():
        mean = {k: float(np.mean([m[k] for m in metrics])) for k in ("auroc", "precision", "recall")}
        lines.append(
            f"- {rate:.0%} noise: AUROC {mean['auroc']:.2f}, precision {mean['precision']:.0%}, "
            f"recall {mean['recall']:.0%} ({len(metrics)} seeds)"
        )
    lines.append(
        f"\nBase passes: {detect_out['rows_scored']} rows twice (prompted, alone) in "
        f"{detect_out['scoring_seconds']:.0f} s."
    )
    stage1_path = RESULTS / "noise_detection_stage1.json"
    if stage1_path.is_file():
        out = json.loads(stage1_path.read_text())
        lines += [
            "",
            f"## Every signal, one reference run ({out['rate']:.0%} noise, seed {out['seed']}, "
            f"{out['injected']} injected of {out['examples']})",
            "",
            "Stage 1 through `compute_confidence` (reference: LoRA r=16, 1 epoch, C = 3 snapshots).",
            "",
            "| signal (suspicious when) | AUROC | precision in top 10% | recall in top 10% |",
            "| --- | --- | --- | --- |",
        ]
        when = {
            "confidence": "SFTMix confidence (low)",
            "variability": "variability across snapshots (high)",
            "prompt_fit_base": "prompt fit, base model (high)",
            "prompt_fit_reference": "prompt fit, reference's last snapshot (high)",
            "suspicious": "`suspicious_rank` of the report (= prompt fit, base)",
            "combined": "mean rank percentile of prompt fit (base) and low confidence",
        }
        for name, metrics in out["results"].items():
            lines.append(f"| {when[name]} | {_fmt(metrics)} |")
        lines += [
            "",
            f"Time (a shared, loaded CPU: compare within the run only): reference training "
            f"{out['reference_training_seconds']:.0f} s, {len(out['scoring_seconds'])} scoring passes "
            f"{sum(out['scoring_seconds']):.0f} s; the data report's prompt fit: base model (2 passes) "
            f"{out['prompt_fit_base_seconds']:.0f} s, reference (1 pass, response alone) "
            f"{out['prompt_fit_reference_seconds']:.0f} s.",
        ]
    exclusion_path = RESULTS / "noise_detection_exclusion.json"
    if exclusion_path.is_file():
        out = json.loads(exclusion_path.read_text())
        lines += [
            "",
            f"## Leaving the suspicious share out: held-out loss ({out['rate']:.0%} noise, {out['held_out']} clean "
            "held-out records)",
            "",
            "NTP, 1 epoch, the reference's settings (LoRA r=16, lr 2e-4, batch 8), the same seed; the examples left "
            "out by `exclude_suspicious` from the stage-1 report (base prompt fit), as stage 2 leaves them out. The "
            "run on everything is the stage-1 reference itself (its last snapshot).",
            "",
            "| trained on | examples | injected among them | held-out loss | held-out perplexity |",
            "| --- | --- | --- | --- | --- |",
        ]
        for row in out["rows"]:
            lines.append(
                f"| {row['arm']} | {row['train_examples']} | {row['injected_in_training']} | "
                f"{row['held_out_loss']:.4f} | {row['held_out_perplexity']:.3f} |"
            )
    if args.demo_metadata:
        meta = json.loads(Path(args.demo_metadata).read_text())
        scoring = sum(s["seconds"] for s in meta["scoring"])
        report = meta["data_report"]["prompt_fit_seconds"]
        stage = meta["reference_training_seconds"] + scoring
        lines += [
            "",
            "## Cost of the report in the demo's stage 1",
            "",
            "`recipes/confidence.py --config configs/demo/sftmix_qlora.yaml` (SmolLM2-135M-Instruct, 4 bits, "
            f"{meta['num_scored']} examples, max_length {meta['run']['max_length']}, C = "
            f"{len(meta['snapshot_steps'])}), from its metadata.json:",
            "",
            "| part | seconds | share of stage 1 without the report |",
            "| --- | --- | --- |",
            f"| reference training (1 epoch) | {meta['reference_training_seconds']:.0f} | "
            f"{meta['reference_training_seconds'] / stage:.0%} |",
            f"| {len(meta['scoring'])} scoring passes | {scoring:.0f} | {scoring / stage:.0%} |",
            f"| prompt fit, {meta['data_report']['prompt_fit_model']} model (prompted + alone) | {report:.0f} | "
            f"{report / stage:.0%} |",
        ]
    lines += ["", NOTES]
    (RESULTS / "noise_detection.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["detect", "stage1", "exclusion", "table"])
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.05, 0.10, 0.20])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "noise_detection"))
    parser.add_argument("--rate", type=float, default=0.10, help="stage1/exclusion: the noise rate")
    parser.add_argument("--seed", type=int, default=0, help="stage1/exclusion: the noise seed")
    parser.add_argument("--held_out", type=int, default=40, help="exclusion: clean held-out records")
    parser.add_argument("--exclude", type=float, default=0.10, help="exclusion: the share left out")
    parser.add_argument("--demo_metadata", help="table: metadata.json of the demo's stage 1, for the cost section")
    args = parser.parse_args()
    {"detect": detect, "stage1": stage1, "exclusion": exclusion, "table": table}[args.step](args)


if __name__ == "__main__":
    main()
