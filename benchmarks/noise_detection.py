"""Which stage-1 signal finds mislabelled training examples: measured on injected noise in real medical data.

    python benchmarks/noise_detection.py detect      # base-model signals, every rate and seed (no training)
    python benchmarks/noise_detection.py stage1      # the whole stage 1 with its data report, one rate and seed
    python benchmarks/noise_detection.py exclusion   # held-out loss of NTP with and without the suspicious share
    python benchmarks/noise_detection.py table       # benchmarks/results/noise_detection.md from the three above

Data: `--examples` records of medical_meadow_small.json (SFTMIX_DATA_DIR, default ../shared/data), drawn with a fixed
seed. Noise: a share `rate` of them get another record's answer: the chosen records' answers are rotated among
themselves (a random cycle), so the set of answers is the same at every rate and each injected answer is a real,
fluent medical answer, just not to its question. Model: SmolLM2-135M-Instruct (4-bit base, LoRA r=16 reference).

For each signal: AUROC (injected vs clean), and precision and recall among the top 10% flagged. The signals:
- `confidence` (SFTMix's, -mean perplexity over the C snapshots; low = suspicious),
- `variability` (std of the perplexity across the snapshots; high = suspicious),
- `perplexity_base` (the base model's perplexity of the response given its prompt; high = suspicious),
- `prompt_fit_base`, `prompt_fit_reference` (PPL(response | prompt) / PPL(response alone); high = suspicious),
- `suspicious` (the report's rank, `sftmix_trl.data_report.suspicious_score`).
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
    from sftmix_trl.data import load_datasets

    path = work / f"{name}.json"
    path.write_text(json.dumps(records))
    return load_datasets(ScriptArguments(dataset_name=str(path)))[0]


def _injected_ids(dataset, noisy: list[dict], injected: list[bool]) -> set[str]:
    """The example ids of the injected records (found by their text: the loader shuffles)."""
    from sftmix_trl.data import EXAMPLE_ID

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
    from sftmix_trl.sftmix_config import SFTMixConfig

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

    from sftmix_trl.data import EXAMPLE_ID
    from sftmix_trl.model import load_model, load_tokenizer, lora_config
    from sftmix_trl.padding_free import TruncatingSFTTrainer
    from sftmix_trl.prompt_fit import adapter_disabled, response_frame_ids, score_prompt_fit

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["detect", "stage1", "exclusion", "table"])
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.05, 0.10, 0.20])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "noise_detection"))
    args = parser.parse_args()
    {"detect": detect}[args.step](args)


if __name__ == "__main__":
    main()
