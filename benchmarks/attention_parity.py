"""Is an attention implementation correct and faster on padding-free rows? The check an opt-in must pass before a
shipped config may use it instead of sdpa.

One process per attention (`--attention`), all on the same rows: `--steps` padding-free rows made by TRL's own
collator (`DataCollatorForLanguageModeling(padding_free=True)`: `position_ids` restarting at 0, the first label of each
example -100, `cu_seq_lens_*` for varlen kernels), each row of a different length (drawn in [`--min_tokens`,
`--max_tokens`], filled with Alpaca-like example lengths as in `attention_cost.py`), so that a compiled kernel meets
the new shapes it meets in training. The model is loaded as the recipes load it (`model.load_model`: 4-bit base unless
`--no_4bit`, the attention asked for, refused if transformers loaded another), with a LoRA adapter (dropout 0) and
activation checkpointing; each step is forward + backward, no optimizer step, so every step compares the same weights.
Per step: the loss, the adapter's gradient norm and the time (first step apart: it pays any compilation). It writes
a JSON of its figures (`--json`).

`--summarise A.json B.json ...` prints a markdown table against the sdpa run: the largest relative loss and gradient
norm differences over the steps, first-step and median step time, peak memory, torch.compile's graph count and
recompilations, and the verdict: equal (within `--rtol`) and faster (median step) than sdpa, or not. It exits with 1
when an attention is not equal.

    python benchmarks/attention_parity.py --attention sdpa --model M --device cuda --json out/sdpa.json
    python benchmarks/attention_parity.py --attention flex_attention --model M --device cuda --json out/flex.json
    python benchmarks/attention_parity.py --summarise out/sdpa.json out/flex.json >> report.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_cost import example_lengths  # noqa: E402


def padding_free_rows(steps: int, min_tokens: int, max_tokens: int, vocab_size: int, pad_token_id: int, seed: int):
    """`steps` padding-free batches as TRL's collator builds them, each one row of a different length."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=True)
    rng = np.random.default_rng(seed)
    rows = []
    for step in range(steps):
        total = int(rng.integers(min_tokens, max_tokens + 1))
        lengths = [n for n in example_lengths(total, seed=seed + step) if n >= 2]  # a 1-token example trains nothing
        ids = rng.integers(0, vocab_size, size=sum(lengths))
        bounds = np.cumsum([0, *lengths])
        rows.append(collator([{"input_ids": ids[a:b].tolist()} for a, b in zip(bounds[:-1], bounds[1:])]))
    return rows


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def compile_counters() -> dict:
    """torch.compile's graph count and recompilations so far in this process (0 without compilation)."""
    try:
        from torch._dynamo.utils import counters

        return {
            "unique_graphs": int(counters["stats"]["unique_graphs"]),
            "recompiles": int(sum(counters["recompiles"].values())),
        }
    except (ImportError, KeyError, AttributeError):
        return {"unique_graphs": None, "recompiles": None}


def run(args) -> dict:
    from peft import get_peft_model

    from sftmix_trl.configs import ModelArguments
    from sftmix_trl.model import load_model, load_tokenizer, lora_config

    model_args = ModelArguments(
        model_name_or_path=args.model,
        load_in_4bit=args.load_in_4bit,
        attn_implementation=args.attention,
        lora_dropout=0.0,  # dropout masks must not differ between the runs
    )
    model = load_model(model_args)
    if not args.load_in_4bit:  # a 4-bit base is already on this process's GPU
        model.to(args.device)
    loaded = model.config._attn_implementation
    if loaded in ("sdpa", "eager") and loaded != args.attention:  # flex on a CPU falls back to sdpa: sdpa vs itself
        raise SystemExit(f"asked for {args.attention}, transformers loaded {loaded}")
    torch.manual_seed(0)  # the same adapter in every process
    model = get_peft_model(model, lora_config(model_args))
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    tokenizer = load_tokenizer(model_args)
    rows = padding_free_rows(
        args.steps, args.min_tokens, args.max_tokens, model.config.vocab_size, tokenizer.pad_token_id, args.seed
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    steps = []
    for batch in rows:
        batch = {k: v.to(args.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        synchronize(args.device)
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        synchronize(args.device)
        seconds = time.perf_counter() - start
        grad_norm = torch.sqrt(sum(p.grad.float().pow(2).sum() for p in trainable if p.grad is not None))
        steps.append(
            {
                "tokens": int(batch["input_ids"].shape[1]),
                "loss": loss.item(),
                "grad_norm": grad_norm.item(),
                "seconds": seconds,
            }
        )
        model.zero_grad(set_to_none=True)
        print(f"{args.attention}: {steps[-1]}", flush=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
    return {
        "attention": args.attention,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "dtype": str(next(p for p in model.parameters() if p.is_floating_point()).dtype),
        "load_in_4bit": args.load_in_4bit,
        "steps": steps,
        "peak_gib": peak,
        **compile_counters(),
    }


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def summarise(paths: list[str], rtol: float) -> str:
    runs = {}
    for path in paths:
        if Path(path).is_file():
            found = json.loads(Path(path).read_text())
            runs[found["attention"]] = found
    lines = [
        "",
        "| attention (padding-free rows) | steps | max loss diff vs sdpa (rel.) | max grad-norm diff (rel.) | first step s "
        "| median step s | x sdpa | peak GiB | graphs / recompiles | equal and faster than sdpa |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    missing = [Path(p).stem for p in paths if not Path(p).is_file()]
    base = runs.get("sdpa")
    for name, found in runs.items():
        steps = found["steps"]
        median = statistics.median(s["seconds"] for s in steps[1:]) if len(steps) > 1 else steps[0]["seconds"]
        row = [name, str(len(steps))]
        verdict = "baseline"
        if base is None or name == "sdpa":
            row += ["", ""]
            speed = ""
        else:
            pairs = list(zip(steps, base["steps"]))
            if any(s["tokens"] != b["tokens"] for s, b in pairs) or len(steps) != len(base["steps"]):
                raise SystemExit(f"{name} and sdpa ran different rows")
            loss = max(relative(s["loss"], b["loss"]) for s, b in pairs)
            grad = max(relative(s["grad_norm"], b["grad_norm"]) for s, b in pairs)
            base_median = statistics.median(s["seconds"] for s in base["steps"][1:])
            equal, faster = loss <= rtol and grad <= rtol, median < base_median
            row += [f"{loss:.2e}", f"{grad:.2e}"]
            speed = f"{median / base_median:.2f}"
            verdict = {
                (True, True): "yes",
                (True, False): "no: equal, not faster",
                (False, True): "no: NOT EQUAL",
                (False, False): "no: NOT EQUAL, not faster",
            }[(equal, faster)]
        peak = "" if found["peak_gib"] is None else f"{found['peak_gib']:.2f}"
        graphs = f"{found['unique_graphs']} / {found['recompiles']}"
        row += [f"{steps[0]['seconds']:.3f}", f"{median:.3f}", speed, peak, graphs, verdict]
        lines.append("| " + " | ".join(row) + " |")
    for name in missing:
        lines.append(f"| {name} | no result (failed or timed out: see its log) | | | | | | | | no |")
    lines.append(
        f"\nSame rows for every attention, forward + backward, no optimizer step; equal = within rtol {rtol}."
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attention", help="attn_implementation to run (one per process)")
    parser.add_argument("--model", help="model folder (a random-init model of a real shape serves)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no_4bit", dest="load_in_4bit", action="store_false", help="a 16/32-bit base")
    parser.add_argument("--no_checkpointing", dest="activation_checkpointing", action="store_false")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--min_tokens", type=int, default=1024)
    parser.add_argument("--max_tokens", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="where this attention's figures go")
    parser.add_argument("--summarise", nargs="+", metavar="JSON", help="compare these runs with the sdpa one")
    parser.add_argument("--rtol", type=float, default=1e-2, help="largest relative difference counted as equal")
    args = parser.parse_args()
    if args.summarise:
        table = summarise(args.summarise, args.rtol)
        print(table, end="")
        if "NOT EQUAL" in table:  # a kernel that computes another loss on the same rows fails the check
            sys.exit(1)
        return
    if not (args.attention and args.model and args.json):
        parser.error("--attention, --model and --json are needed (or --summarise)")
    result = run(args)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
