"""What an evaluation writes: eval_results.json (every figure and where it came from), eval_results.md, samples."""

from __future__ import annotations

import json
import math
import platform
from importlib import metadata
from pathlib import Path

import torch

from sftmix_trl.atomic import atomic_write

RESULTS_JSON = "eval_results.json"
RESULTS_MD = "eval_results.md"
PACKAGES = (
    "sftmix-trl",
    "torch",
    "transformers",
    "trl",
    "peft",
    "bitsandbytes",
    "accelerate",
    "datasets",
    "lm-eval",
    "nltk",
    "langdetect",
)


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()})"


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def _rows(task: str, figures: dict) -> list[str]:
    n = figures.get("n", figures.get("n_prompts", ""))
    skipped = ("n", "n_prompts", "n_instructions", "benchmarks", "subjects", "tokens", "truncated")
    return [
        f"| {task} | {metric} | {_fmt(value)} | {n} |"
        for metric, value in figures.items()
        if metric not in skipped and isinstance(value, (int, float))
    ]


def markdown_table(payload: dict) -> str:
    """A Markdown summary: one row per figure."""
    model = payload["model"]
    lines = [
        f"# Evaluation of {model['model_name_or_path']}"
        + (f" + {model['adapter_path']}" if model["adapter_path"] else ""),
        "",
        f"{'4-bit' if model['load_in_4bit'] else model['dtype']} base; limit {payload['config'].get('limit')}; "
        f"{payload['device']}; {payload['wall_seconds']:.0f} s.",
        "",
        "| task | metric | value | n |",
        "| --- | --- | ---: | ---: |",
    ]
    for task, figures in payload["results"].items():
        # an lm-eval group or tag gives {task or group: figures}: one row per figure of each
        nested = [(name, sub) for name, sub in figures.items() if name != "subjects" and isinstance(sub, dict)]
        for name, sub in [(task, figures), *((f"{task}/{name}", sub) for name, sub in nested)]:
            lines += _rows(name, sub)
        for subject, sub in figures.get("subjects", {}).items():
            lines.append(f"| mmlu_{subject} | acc | {_fmt(sub['acc'])} | {sub['n']} |")
    return "\n".join(lines) + "\n"


def write_outputs(output_dir: str, payload: dict, samples: dict[str, list[dict]]) -> list[Path]:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / RESULTS_JSON, out / RESULTS_MD]
    atomic_write(written[0], json.dumps(payload, indent=2, default=str) + "\n")
    atomic_write(written[1], markdown_table(payload))
    for stale in out.glob("samples_*.jsonl"):  # an earlier evaluation's tasks: not this run's figures
        if stale.stem.removeprefix("samples_") not in samples:
            stale.unlink()
    for task, rows in samples.items():
        path = out / f"samples_{task}.jsonl"
        atomic_write(path, "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows))
        written.append(path)
    return written
