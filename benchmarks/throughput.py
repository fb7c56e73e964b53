"""Real-data throughput of NTP and SFTMix: real (non-pad) tokens per second, padding, mixed positions per step.

    python benchmarks/throughput.py                                  # CPU, the demo model in 4-bit
    python benchmarks/throughput.py --device cuda --model llama-3.1-8b-shape --examples 512 --budgets 4096,8192,16384

`benchmarks/step_cost.py` feeds NTP and SFTMix the same padded batches; users train on real length distributions,
where padding is half of a random micro-batch. This benchmark uses real lengths: the Alpaca and the medical meadow
files of the shared data folder (`SFTMIX_DATA_DIR`, default `../shared/data`), rendered with the demo model's
tokenizer and chat template, no truncation. Every variant trains one epoch over the same pool of `--examples`
examples (a seeded random confidence table splits it into equal halves, so every example is trained exactly once;
throughput does not depend on which half an example is in), one micro-batch per optimizer step; the first `--warmup`
steps are not timed. The fixed-size variants take the same number of steps; the token-budget ones fewer, larger
ones over the same examples. Variants:

  TRL NTP padded / padding_free      SFTTrainer fed the pairs of the random paired sampler (the same examples as
                                     SFTMix with random pairs), `per_device_train_batch_size` sequences a step
  SFTMix padded / padding_free       random pairs (today's SFTMix is "padded, random pairs")
  SFTMix ... length-aware pairs      `train_sampling_strategy: group_by_length`
  SFTMix ... budget B                `tokens_per_micro_batch: B` (whole pairs up to B computed tokens), length-aware

Repeats are interleaved (variant order rotated each
round) because the machine's speed drifts; each figure is the median over repeats of (real tokens / seconds) of the
timed steps. The default CPU run (9 variants x 2 datasets x 2 rounds of a 64-example epoch) takes about 45 minutes
on an idle 2-core CPU. Targets (Alpaca): SFTMix padding-free >= 0.95x TRL NTP padding-free, >= 1.6x today's SFTMix, padding
< 5% of computed tokens. Results are printed and written to benchmarks/results/throughput_<device>.md.

On a GPU machine (see ../shared/GPU.md): `--model llama-3.1-8b-shape` builds a random-init Llama-3.1-8B-shaped model
(vocabulary 128,256; 4-bit nf4 on load, LoRA r=16 on all linears, gradient checkpointing, bf16) once under
`--work_dir`; `--tokenizer` points at the demo tokenizer files (e.g. `.gpu/smollm2`); copy the two data files there
and set SFTMIX_DATA_DIR.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATASETS = {"alpaca": "instruct/alpaca_5000.json", "medical": "medical/medical_meadow_small.json"}
LLAMA_8B_SHAPE = dict(
    vocab_size=128_256,
    hidden_size=4096,
    intermediate_size=14_336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    tie_word_embeddings=False,
    max_position_embeddings=8192,
)


@dataclass(frozen=True)
class Variant:
    name: str
    method: str  # "ntp" or "sftmix"
    padding_free: bool
    length_aware: bool = False
    budget: int | None = None


def all_variants(budgets: list[int], padded_budget: int | None) -> list[Variant]:
    variants = [
        Variant("TRL NTP, padded", "ntp", False),
        Variant("TRL NTP, padding_free", "ntp", True),
        Variant("SFTMix, padded, random pairs (today)", "sftmix", False),
        Variant("SFTMix, padding_free, random pairs", "sftmix", True),
        Variant("SFTMix, padded, length-aware pairs", "sftmix", False, True),
        Variant("SFTMix, padding_free, length-aware pairs", "sftmix", True, True),
    ]
    variants += [Variant(f"SFTMix, padding_free, length-aware, budget {b}", "sftmix", True, True, b) for b in budgets]
    if padded_budget:
        variants.append(
            Variant(f"SFTMix, padded, length-aware, budget {padded_budget}", "sftmix", False, True, padded_budget)
        )
    return variants


def data_dir() -> Path:
    path = Path(os.environ.get("SFTMIX_DATA_DIR", ROOT.parent / "shared" / "data"))
    if not all((path / f).is_file() for f in DATASETS.values()):
        sys.exit(f"error: the data files {list(DATASETS.values())} are not under {path}; set SFTMIX_DATA_DIR")
    return path


def build_model(name: str, device: str, work: Path):
    from sftmix_trl.configs import ModelArguments
    from sftmix_trl.demo_model import prepare_demo_model

    if name == "demo":
        return ModelArguments(model_name_or_path=str(prepare_demo_model()), load_in_4bit=True)
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = work / "llama-3.1-8b-shape"
    if not (path / "config.json").is_file():  # built once (about 20 s to save its 16 GB), reused by every variant
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_8B_SHAPE), dtype=torch.bfloat16)
        model.save_pretrained(path)
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return ModelArguments(model_name_or_path=str(path), load_in_4bit=True, dtype="bfloat16")


def load_pool(path: Path, num_examples: int, seed: int = 0):
    """The same `num_examples` examples of a file for every variant, with a seeded random confidence table."""
    from sftmix_trl.confidence import ConfidenceTable
    from sftmix_trl.configs import ScriptArguments
    from sftmix_trl.data.load import load_datasets

    dataset = load_datasets(ScriptArguments(dataset_name=str(path)))[0]
    dataset = dataset.shuffle(seed=seed).select(range(min(num_examples, len(dataset)))).flatten_indices()
    rng = np.random.default_rng(seed)
    table = ConfidenceTable(list(dataset["example_id"]), rng.uniform(2, 50, (len(dataset), 3)), np.ones(len(dataset)))
    return dataset, table


def run_variant(variant: Variant, dataset, table, model_args, tokenizer, opts, work: Path) -> dict:
    """Train one variant for one epoch over the pool; per timed step: seconds, real and computed tokens, and
    mixed positions (SFTMix)."""
    from transformers import TrainerCallback
    from trl import SFTTrainer

    from sftmix_trl.configs import SFTConfig
    from sftmix_trl.model import load_model, lora_config
    from sftmix_trl.sftmix.config import SFTMixConfig
    from sftmix_trl.sftmix.sampler import PairedSampler
    from sftmix_trl.sftmix.trainer import ROW, SFTMixTrainer

    cuda = opts.device == "cuda"
    common = dict(
        output_dir=str(work / "run"),
        report_to="none",
        per_device_train_batch_size=opts.batch_size,
        max_length=None,  # no truncation: the real lengths (and what TRL's padding_free requires)
        padding_free=variant.padding_free,
        num_train_epochs=1,  # the whole pool: every variant trains on the same examples
        logging_steps=1,
        save_strategy="no",
        learning_rate=1e-4,
        seed=0,
        activation_checkpointing=cuda or opts.gradient_checkpointing,
        dataloader_pin_memory=False,
    )
    if variant.method == "sftmix":
        args = SFTMixConfig(
            **common,
            confidence_dir=str(work / "unused"),
            train_sampling_strategy="group_by_length" if variant.length_aware else "random",
            tokens_per_micro_batch=variant.budget,
        )
    else:
        args = SFTConfig(**common)

    class Meter:
        """Per micro-batch: computed and real tokens, and the dataset rows (SFTMix)."""

        def training_step(self, model, inputs, num_items_in_batch=None):
            computed = inputs["input_ids"].numel()
            real = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else computed
            rows = inputs[ROW].tolist() if ROW in inputs else None
            self.micro_batches.append((computed, real, rows))
            return super().training_step(model, inputs, num_items_in_batch)

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.started = [], 0.0

        def on_step_begin(self, *args, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.started = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.started)

    split = table.split()
    rows = {example_id: r for r, example_id in enumerate(dataset["example_id"])}

    class NTP(Meter, SFTTrainer):  # plain TRL, fed the random pairs SFTMix trains on
        def _get_train_sampler(self, train_dataset=None):
            # in row order, as SFTMixTrainer lists them: the same permutations then draw the same pairs
            confident, unconfident = sorted(rows[i] for i in split[0]), sorted(rows[i] for i in split[1])
            return PairedSampler(confident, unconfident, opts.batch_size // 2, seed=0)

    class Mix(Meter, SFTMixTrainer):
        pass

    torch.manual_seed(0)
    timer = Timer()
    kwargs = dict(
        model=load_model(model_args),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(model_args),
        callbacks=[timer],
    )
    trainer = Mix(confidence=table, **kwargs) if variant.method == "sftmix" else NTP(**kwargs)
    trainer.micro_batches = []
    trainer.train()

    responses = None
    if variant.method == "sftmix":
        responses = trainer._row_lengths()[1]
    if len(trainer.micro_batches) <= opts.warmup:
        sys.exit(f"error: '{variant.name}' took {len(trainer.micro_batches)} step(s), none timed: raise --examples")
    timed = trainer.micro_batches[opts.warmup :]  # one micro-batch per optimizer step
    result = {
        "seconds": timer.times[opts.warmup :],
        "computed": [c for c, _, _ in timed],
        "real": [r for _, r, _ in timed],
        "sequences": [None if rows_ is None else len(rows_) for _, _, rows_ in timed],
        # mixed positions of a pair: min(N_c, N_u) response positions
        "mixed": [
            None if rows_ is None else sum(min(responses[c], responses[u]) for c, u in zip(rows_[0::2], rows_[1::2]))
            for _, _, rows_ in timed
        ],
    }
    del trainer, kwargs
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def summarise(runs: list[dict]) -> dict:
    rates = [sum(r["real"]) / sum(r["seconds"]) for r in runs]
    real, computed = sum(sum(r["real"]) for r in runs), sum(sum(r["computed"]) for r in runs)
    mixed = [m for r in runs for m in r["mixed"] if m is not None]
    sequences = [s for r in runs for s in r["sequences"] if s is not None]
    return {
        "rates": rates,  # per round, in round order
        "pooled_tokens_per_s": real / sum(sum(r["seconds"]) for r in runs),
        "tokens_per_s": statistics.median(rates),
        "tokens_per_s_range": (min(rates), max(rates)),
        "step_s": statistics.median([s for r in runs for s in r["seconds"]]),
        "real_per_step": real / sum(len(r["real"]) for r in runs),
        "padding": 1 - real / computed,
        "mixed_per_step": statistics.mean(mixed) if mixed else None,
        "sequences_per_step": statistics.mean(sequences) if sequences else None,
    }


def table_lines(dataset: str, summaries: dict[str, dict]) -> list[str]:
    today = summaries.get("SFTMix, padded, random pairs (today)")
    ntp_free = summaries.get("TRL NTP, padding_free")
    lines = [
        f"## {dataset}",
        "",
        "| variant | real tokens/s (median, range) | step s | real tokens/step | sequences/step | padding | "
        "mixed positions/step | vs TRL NTP padding_free | vs SFTMix today |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in summaries.items():
        low, high = s["tokens_per_s_range"]
        mixed = "-" if s["mixed_per_step"] is None else f"{s['mixed_per_step']:.0f}"
        sequences = "-" if s["sequences_per_step"] is None else f"{s['sequences_per_step']:.1f}"
        vs_ntp = f"{s['tokens_per_s'] / ntp_free['tokens_per_s']:.2f}x" if ntp_free else "-"
        vs_today = f"{s['tokens_per_s'] / today['tokens_per_s']:.2f}x" if today else "-"
        lines.append(
            f"| {name} | {s['tokens_per_s']:.0f} ({low:.0f}-{high:.0f}) | {s['step_s']:.2f} | {s['real_per_step']:.0f} "
            f"| {sequences} | {100 * s['padding']:.1f}% | {mixed} | {vs_ntp} | {vs_today} |"
        )
    return lines + [""]


def target_lines(summaries: dict[str, dict]) -> list[str]:
    today = summaries.get("SFTMix, padded, random pairs (today)")
    ntp_free = summaries.get("TRL NTP, padding_free")
    lines = ["Targets (Alpaca lengths):", ""]
    free = {n: s for n, s in summaries.items() if n.startswith("SFTMix, padding_free")}
    if not free:
        lines.append("- SFTMix padding-free: not measured (left out with --only)")
    for name, s in free.items():
        parts = []
        if ntp_free:
            # rounds are interleaved, so a round's ratio compares the two at about the same machine speed
            paired = [a / b for a, b in zip(s["rates"], ntp_free["rates"])]
            parts.append(
                f"{s['tokens_per_s'] / ntp_free['tokens_per_s']:.2f}x TRL NTP padding_free (target >= 0.95; "
                f"per round {min(paired):.2f}-{max(paired):.2f}, median {statistics.median(paired):.2f}; all rounds "
                f"pooled {s['pooled_tokens_per_s'] / ntp_free['pooled_tokens_per_s']:.2f})"
            )
        if today:
            parts.append(f"{s['tokens_per_s'] / today['tokens_per_s']:.2f}x SFTMix today (target >= 1.6)")
        lines.append(f"- {name}: " + "; ".join(parts))
    for name, s in summaries.items():
        if name.startswith("SFTMix") and "today" not in name:
            verdict = "met" if s["padding"] < 0.05 else "not met"
            lines.append(f"- padding of {name}: {100 * s['padding']:.1f}% (target < 5%: {verdict})")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="demo", choices=["demo", "llama-3.1-8b-shape"])
    parser.add_argument("--tokenizer", help="tokenizer and chat template (default: the demo model's)")
    parser.add_argument("--datasets", default="alpaca,medical", help=f"comma-separated, of {list(DATASETS)}")
    parser.add_argument("--examples", type=int, default=64, help="the pool every variant trains one epoch on")
    parser.add_argument("--batch_size", type=int, default=8, help="sequences per micro-batch (2K) without a budget")
    parser.add_argument("--budgets", default="1024,2048", help="padding-free token budgets (comma-separated)")
    parser.add_argument("--padded_budget", type=int, default=1024, help="one padded token budget (0: none)")
    parser.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="on CPU too (always on with cuda): a padded micro-batch of long examples otherwise needs > 24 GB",
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps of each epoch")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds over all variants")
    parser.add_argument("--only", help="run only the variants whose name contains one of these (';'-separated)")
    parser.add_argument("--tag", help="results file name: throughput_<tag>.md (default: the device)")
    parser.add_argument("--work_dir", type=Path, help="where models and runs go (default: a temporary folder)")
    opts = parser.parse_args()
    if opts.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch sees no GPU")
    if opts.device == "cpu" and opts.model != "demo":
        sys.exit("error: the Llama-3.1-8B shape is for --device cuda")

    from sftmix_trl.demo_model import prepare_demo_model
    from sftmix_trl.model import load_tokenizer

    work = opts.work_dir or Path(tempfile.mkdtemp(prefix="throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    folder = data_dir()
    model_args = build_model(opts.model, opts.device, work)
    tokenizer_args = type(model_args)(model_name_or_path=opts.tokenizer or str(prepare_demo_model()))
    tokenizer = load_tokenizer(tokenizer_args)
    budgets = [int(b) for b in opts.budgets.split(",") if b]
    variants = all_variants(budgets, opts.padded_budget)
    if opts.only:
        variants = [v for v in variants if any(key.strip() in v.name for key in opts.only.split(";"))]

    names = [n.strip() for n in opts.datasets.split(",")]
    device = torch.cuda.get_device_name() if opts.device == "cuda" else f"CPU ({os.cpu_count()} cores, shared)"
    suffix = opts.tag or (opts.device if opts.model == "demo" else f"{opts.device}_8b")
    runs: dict[tuple[str, str], list[dict]] = {}
    for name in names:
        dataset, table = load_pool(folder / DATASETS[name], opts.examples)
        for repeat in range(opts.repeats):
            order = variants[repeat % len(variants) :] + variants[: repeat % len(variants)]  # rotated each round
            for variant in order:
                start = time.perf_counter()
                result = run_variant(variant, dataset, table, model_args, tokenizer, opts, work)
                runs.setdefault((name, variant.name), []).append(result)
                rate = sum(result["real"]) / sum(result["seconds"])
                print(
                    f"[{name} round {repeat + 1}/{opts.repeats}] {variant.name:52s} {rate:8.1f} real tokens/s "
                    f"({time.perf_counter() - start:.0f} s with loading)",
                    flush=True,
                )
            # written after every round, so a run cut short keeps what it measured
            write_results(runs, variants, opts, device, suffix)
    print(write_results(runs, variants, opts, device, suffix))
    print(f"written to {RESULTS / f'throughput_{suffix}.md'}")


def write_report(name: str, text: str) -> None:
    """Print a benchmark's report and write it to benchmarks/results/`name`."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text(text)
    print(text)
    print(f"written to {RESULTS / name}")


def write_results(runs, variants, opts, device: str, suffix: str) -> str:
    model = "SmolLM2-135M-Instruct" if opts.model == "demo" else "Llama-3.1-8B shape (random init)"
    checkpointing = "on" if opts.device == "cuda" or opts.gradient_checkpointing else "off"
    lines = [
        f"# Real-data throughput: NTP and SFTMix, {device}",
        "",
        f"{model}, 4-bit nf4 base, LoRA r=16 on all linears; tokenizer and chat template of SmolLM2-135M-Instruct; "
        f"no truncation. One epoch over the same {opts.examples} examples per dataset (seeded) for every variant and "
        f"round, the first {opts.warmup} step(s) untimed, one micro-batch per optimizer step ({opts.batch_size} "
        f"sequences without a budget), gradient checkpointing {checkpointing}, up to {opts.repeats} interleaved rounds "
        "(variant order rotated). Real tokens/s is the "
        "median over rounds of real (non-pad) tokens / seconds of the timed steps; padding is pad slots / computed "
        "tokens; mixed positions are the sum over pairs of min(N_c, N_u).",
        "",
    ]
    for name in dict.fromkeys(d for d, _ in runs):
        summaries = {v.name: summarise(runs[(name, v.name)]) for v in variants if (name, v.name) in runs}
        rounds = min(len(runs[(name, v)]) for v in summaries)
        lines += [f"Rounds completed on {name}: {rounds}", ""]
        lines += table_lines(name, summaries)
        if name == "alpaca":
            lines += target_lines(summaries)
    text = "\n".join(lines)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"throughput_{suffix}.md").write_text(text)
    raw = {f"{d}/{v}": r for (d, v), r in runs.items()}
    options = vars(opts) | {"work_dir": str(opts.work_dir)}
    (RESULTS / f"throughput_{suffix}.json").write_text(json.dumps({"options": options, "runs": raw}, indent=1))
    return text


if __name__ == "__main__":
    main()
