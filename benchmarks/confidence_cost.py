"""Cost of SFTMix stage 1 (reference training + C scoring passes) against one epoch of plain NTP training.

    python benchmarks/confidence_cost.py [--examples 64] [--max_length 256]

Same run, same data, same model (SmolLM2-135M-Instruct, 4-bit base + LoRA r=16 on all linears), same per-device
batch (8) for NTP and the reference. Targets with reference_epochs = 1 and C = 3: one scoring pass <= 0.35 of an NTP
epoch, the whole stage <= 2.0 NTP epochs, padding < 10% of scored tokens. Model loading is excluded from both sides
(it is reported separately). Results are printed and written to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    from trl import SFTTrainer

    from sftmix_trl.confidence import ConfidenceConfig, compute_confidence
    from sftmix_trl.configs import ModelArguments, ScriptArguments
    from sftmix_trl.data.load import load_datasets
    from sftmix_trl.demo_model import prepare_demo_model
    from sftmix_trl.model import load_model, load_tokenizer, lora_config
    from sftmix_trl.sftmix.config import SFTMixConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args()

    model_args = ModelArguments(model_name_or_path=str(prepare_demo_model()), load_in_4bit=True)
    mixture = {
        "datasets": [{"path": str(ROOT / "data/demo" / f)} for f in ("instruct_alpaca.jsonl", "health_qa.json")]
    }
    dataset = load_datasets(ScriptArguments(dataset_mixture=mixture, max_train_examples=args.examples))[0]
    work = Path(tempfile.mkdtemp(prefix="confidence-cost-"))
    config = SFTMixConfig(
        output_dir=str(work / "run"),
        report_to="none",
        max_length=args.max_length,
        num_train_epochs=1,
        per_device_train_batch_size=args.batch_size,
        reference_batch_size=args.batch_size,
        reference_epochs=1,
        num_confidence_checkpoints=3,
        scoring_batch_size=32,
        activation_checkpointing=False,
        save_strategy="no",
        logging_steps=1000,
        learning_rate=2e-4,
        reference_learning_rate=2e-4,
        dataloader_pin_memory=False,
    )

    # One epoch of plain NTP (TRL's SFTTrainer), timed by the trainer itself
    start = time.perf_counter()
    model = load_model(model_args)
    tokenizer = load_tokenizer(model_args)
    ntp_load = time.perf_counter() - start
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(model_args),
    )
    ntp_seconds = trainer.train().metrics["train_runtime"]
    ntp_tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    del trainer, model

    # Stage 1 in the same process
    start = time.perf_counter()
    table = compute_confidence(dataset, model_args, config, ConfidenceConfig.from_args(config), work / "confidence")
    stage_wall = time.perf_counter() - start
    meta = table.metadata
    reference = meta["reference_training_seconds"]
    passes = meta["scoring"]
    scoring = sum(p["seconds"] for p in passes)
    stage = reference + scoring
    padding = max(p["padding_fraction"] for p in passes)
    throughput = sum(p["tokens"] for p in passes) / scoring

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    lines = [
        f"# Confidence stage cost vs one NTP epoch, {device}",
        "",
        f"SmolLM2-135M-Instruct, 4-bit + LoRA r=16; {len(dataset)} demo examples ({ntp_tokens} tokens), max length "
        f"{args.max_length}, batch {args.batch_size}; reference_epochs = 1, C = 3, scoring batch 32.",
        "",
        "| part | seconds | / NTP epoch | target |",
        "| --- | --- | --- | --- |",
        f"| NTP epoch (TRL SFTTrainer) | {ntp_seconds:.1f} | 1.000 | |",
        f"| reference training (1 epoch) | {reference:.1f} | {reference / ntp_seconds:.3f} | |",
    ]
    lines += [
        f"| scoring pass {i + 1} (step {p['step']}) | {p['seconds']:.1f} | {p['seconds'] / ntp_seconds:.3f} | <= 0.35 |"
        for i, p in enumerate(passes)
    ]
    lines += [
        f"| **whole stage** | {stage:.1f} | **{stage / ntp_seconds:.3f}** | <= 2.0 |",
        "",
        f"Scoring throughput {throughput:.0f} tokens/s; padding {100 * padding:.1f}% of scored tokens (target < 10%).",
        f"Model loading (not counted above): {ntp_load:.1f} s; stage-1 wall time with its loads, snapshot saves and "
        f"table writing: {stage_wall:.1f} s.",
        "",
    ]
    print("\n".join(lines))
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "cuda" if torch.cuda.is_available() else "cpu"
    (RESULTS / f"confidence_cost_{name}.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
