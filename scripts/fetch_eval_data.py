"""Fetch the evaluation data of this package's tasks into the layout `sftmix-trl evaluate` reads.

    python scripts/fetch_eval_data.py --output_dir eval_data

writes, from the public sources:

    eval_data/ifeval/input_data.jsonl               IFEval's 541 prompts (Hub: google/IFEval, split train)
    eval_data/pubmedqa/ori_pqal.json                PubMedQA-L, 1,000 expert-labelled items, and the ids and labels
    eval_data/pubmedqa/test_ground_truth.json       of its standard 500-item test split (GitHub: pubmedqa/pubmedqa)
    eval_data/mmlu_medical/<subject>_<split>.csv    MMLU's six medical subjects, no header: question, A, B, C, D,
                                                    answer letter (Hub: cais/mmlu; splits test, val, dev)
    eval_data/nltk_data/                            NLTK's punkt_tab, which IFEval's rules need (NLTK_DATA)

then prints the `sftmix-trl evaluate` line that reads them. Needs network access, `datasets` and `nltk` (the `eval`
extra). Files already there are fetched again.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from sftmix_trl.evaluation.args import MMLU_MEDICAL_SUBJECTS

IFEVAL_HUB_ID = "google/IFEval"
MMLU_HUB_ID = "cais/mmlu"
MMLU_SPLITS = {"test": "test", "val": "validation", "dev": "dev"}  # file suffix -> the Hub dataset's split
PUBMEDQA_COMMIT = "1cbae8e92f72f20c8d3747cbb3bf5bc53554d997"
PUBMEDQA_FILES = ("ori_pqal.json", "test_ground_truth.json")
PUBMEDQA_URL = "https://raw.githubusercontent.com/pubmedqa/pubmedqa/{commit}/data/{name}"
LETTERS = "ABCD"


def write_ifeval(rows: Iterable[dict], folder: Path) -> Path:
    """IFEval prompts as the original input_data.jsonl: `kwargs` keeps only the arguments an instruction takes (the
    Hub's table gives every instruction every argument, unused ones null)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "input_data.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            kwargs = [{k: v for k, v in (arguments or {}).items() if v is not None} for arguments in row["kwargs"]]
            record = {
                "key": row["key"],
                "prompt": row["prompt"],
                "instruction_id_list": list(row["instruction_id_list"]),
                "kwargs": kwargs,
            }
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def write_mmlu(rows: Iterable[dict], folder: Path, subject: str, split: str) -> Path:
    """One subject's split as MMLU's original CSV (no header): question, the four options, the answer letter."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{subject}_{split}.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        for row in rows:
            if len(row["choices"]) != len(LETTERS):
                raise ValueError(f"{MMLU_HUB_ID} {subject} {split}: a question with {len(row['choices'])} options")
            writer.writerow([row["question"], *row["choices"], LETTERS[int(row["answer"])]])
    return path


def write_pubmedqa(files: dict[str, bytes], folder: Path) -> list[Path]:
    """PubMedQA's two JSON files as the repository holds them, after checking that each parses."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in PUBMEDQA_FILES:
        json.loads(files[name])
        (folder / name).write_bytes(files[name])
        paths.append(folder / name)
    return paths


def fetch(output_dir: Path, mmlu_splits: list[str]) -> None:
    from datasets import load_dataset

    print(f"IFEval: {IFEVAL_HUB_ID}, split train", flush=True)
    write_ifeval(load_dataset(IFEVAL_HUB_ID, split="train"), output_dir / "ifeval")
    print(f"PubMedQA: github.com/pubmedqa/pubmedqa @ {PUBMEDQA_COMMIT[:7]}", flush=True)
    files = {}
    for name in PUBMEDQA_FILES:
        with urllib.request.urlopen(PUBMEDQA_URL.format(commit=PUBMEDQA_COMMIT, name=name), timeout=60) as response:
            files[name] = response.read()
    write_pubmedqa(files, output_dir / "pubmedqa")
    for subject in MMLU_MEDICAL_SUBJECTS:
        print(f"MMLU: {MMLU_HUB_ID} {subject}, splits {', '.join(mmlu_splits)}", flush=True)
        for split in mmlu_splits:
            rows = load_dataset(MMLU_HUB_ID, subject, split=MMLU_SPLITS[split])
            write_mmlu(rows, output_dir / "mmlu_medical", subject, split)
    import nltk

    print("NLTK: punkt_tab", flush=True)
    if not nltk.download("punkt_tab", download_dir=str(output_dir / "nltk_data"), quiet=True):
        raise OSError("nltk could not download punkt_tab")


def evaluate_line(output_dir: Path, mmlu_split: str) -> str:
    return (
        f"NLTK_DATA={output_dir}/nltk_data sftmix-trl evaluate --model_name_or_path MODEL "
        f"--tasks ifeval pubmedqa mmlu_medical --ifeval_data {output_dir}/ifeval/input_data.jsonl "
        f"--pubmedqa_data {output_dir}/pubmedqa --mmlu_medical_data {output_dir}/mmlu_medical --mmlu_split {mmlu_split}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--output_dir", type=Path, default=Path("eval_data"))
    parser.add_argument("--mmlu_splits", nargs="+", choices=list(MMLU_SPLITS), default=list(MMLU_SPLITS))
    args = parser.parse_args(argv)
    try:
        fetch(args.output_dir, args.mmlu_splits)
    except (OSError, ValueError, ConnectionError) as error:  # no network, a Hub or GitHub refusal, a changed file
        raise SystemExit(f"error: fetching the evaluation data failed: {error}") from None
    print(f"done; evaluate with:\n{evaluate_line(args.output_dir, args.mmlu_splits[0])}")


if __name__ == "__main__":
    sys.exit(main())
