"""What each merge target ships: the demo QLoRA run merged into the original weights and into the dequantised 4-bit
weights it was trained against, measured on the run's held-out split.

    python benchmarks/merge_targets.py [--adapter outputs/bench/merge_targets/sft_qlora] [--max_train_examples 48]

Run from the repository root (the demo config's data paths are relative to it). Trains the demo NTP run
(`recipes/sft.py --config configs/demo/sft_qlora.yaml`) unless the adapter folder already holds one, then merges it
with `sftmix-trl merge` for each target and dtype (each merge measures itself: held-out response perplexity of the
merged folder and of base (4-bit) + adapter as trained), and scores the base alone (original and 4-bit) for scale: the
fine-tune's gain against the gap each target leaves. Writes benchmarks/results/merge_targets_cpu.{md,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from sftmix_trl.adapter import load_with_adapter
from sftmix_trl.after_training.merge import MergeArguments, MergedModel, merge, merge_eval_data
from sftmix_trl.commands.evaluate import quiet_logging
from sftmix_trl.evaluation.perplexity import response_perplexity
from sftmix_trl.run_record import quantisation_label, read_run_record, trained_model_arguments

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
VARIANTS = (("original", "float32"), ("dequantized", "float32"), ("original", "bfloat16"), ("dequantized", "bfloat16"))


def train(adapter: Path, max_train_examples: int) -> float:
    cmd = [sys.executable, str(ROOT / "recipes" / "sft.py"), "--config", "configs/demo/sft_qlora.yaml",
           "--output_dir", str(adapter), "--max_train_examples", str(max_train_examples), "--save_strategy", "no"]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - start


def base_perplexity(trained_as, tokenizer, data, batch_size: int, max_length: int, load_in_4bit: bool) -> float:
    """The base alone, as the run loaded it (4-bit) or unquantised in float32."""
    if not load_in_4bit:
        trained_as = dataclasses.replace(trained_as, load_in_4bit=False, dtype="float32")
    model = load_with_adapter(trained_as)
    metrics, _ = response_perplexity(model, tokenizer, data, batch_size, max_length, "base")
    del model
    gc.collect()
    return metrics["perplexity"]


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--adapter", default="outputs/bench/merge_targets/sft_qlora")
    parser.add_argument("--merged_dir", default="outputs/bench/merge_targets")
    parser.add_argument("--max_train_examples", type=int, default=48)
    args = parser.parse_args()
    os.chdir(ROOT)
    quiet_logging()  # each merge logs its table
    torch.manual_seed(0)
    adapter, merged_dir = Path(args.adapter), Path(args.merged_dir)
    train_seconds = None
    if not (adapter / "adapter_model.safetensors").is_file():
        train_seconds = train(adapter, args.max_train_examples)
    data, description = merge_eval_data(str(adapter))
    rows = []
    for target, dtype in VARIANTS:
        out = merged_dir / f"merged_{target}_{dtype}"
        start = time.perf_counter()
        merge(MergeArguments(adapter_path=str(adapter), output_dir=str(out), target=target, dtype=dtype,
                             overwrite_output_dir=True))  # fmt: skip
        seconds = time.perf_counter() - start
        record = MergedModel.load(out)
        figures = record.figures
        rows.append(
            {
                "target": target,
                "dtype": dtype,
                "merged_perplexity": figures.merged_perplexity,
                "trained_perplexity": figures.trained_perplexity,
                "difference": figures.difference,
                "size_mb": round(folder_mb(out), 1),
                "merge_and_measure_s": round(seconds, 1),
                "measure_s": figures.seconds,
            }
        )
        print(rows[-1], flush=True)
    config = read_run_record(adapter)["config"]
    trained_as, _ = trained_model_arguments(str(adapter), config["model_name_or_path"])
    tokenizer = AutoTokenizer.from_pretrained(merged_dir / "merged_original_float32")  # what measure_merge scores with
    scoring = (config.get("per_device_eval_batch_size") or 8, config.get("max_length") or 2048)
    payload = {
        "command": "python benchmarks/merge_targets.py " + shlex.join(sys.argv[1:]),
        "base": Path(config["model_name_or_path"]).name,
        "trained_as": quantisation_label(trained_as),
        "held_out": description,
        "examples": len(data),
        "tokens": MergedModel.load(merged_dir / "merged_original_float32").figures.tokens,
        "train_seconds": round(train_seconds, 1) if train_seconds else None,
        "base_original_perplexity": base_perplexity(trained_as, tokenizer, data, *scoring, load_in_4bit=False),
        "base_4bit_perplexity": base_perplexity(trained_as, tokenizer, data, *scoring, load_in_4bit=True),
        "rows": rows,
        "threads": torch.get_num_threads(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "merge_targets_cpu.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
