"""Padding-free micro-batches of real data: TRL NTP against SFTMix, forward + backward on the *same* rows.

    python benchmarks/padding_free_step.py            # Alpaca lengths, the demo model in 4-bit, CPU

`throughput.py` times whole epochs, one variant after another, and a shared 2-core machine changes speed by 10-20%
from one minute to the next. This isolates what the Mixup term adds to a padding-free step. Every micro-batch of one
epoch of SFTMix's paired sampler over the 64-example Alpaca pool of `throughput.py` (8 sequences laid end to end per
row) goes through `compute_loss` and `backward` of: TRL's `SFTTrainer` (the NTP loss), `SFTMixTrainer` with
`mixup_weight: 1`, and with `mixup_weight: 0` (the Mixup term computed without gradient). The three run back to back
on each row (the order alternating), so the machine's drift cancels in each row's ratio. Two figures:

- seconds: per trainer the sum over rows of the median over repeats; and the median over rows and repeats of
  SFTMix's seconds / NTP's seconds on the same row in the same repeat;
- matmul FLOPs counted by torch's profiler over the same rows (aten::mm and friends: the linear layers, the LM head
  and the Mixup's; attention kernels are not counted and are the same for both): the work the Mixup adds, free of
  the machine's noise.

Written to benchmarks/results/padding_free_step_cpu.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402  (the pool, the model and the data folder of the throughput benchmark)

NTP = "TRL NTP"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=0, help="time only the first N micro-batches (0: the epoch)")
    opts = parser.parse_args()

    from trl import SFTTrainer

    from sftmix_trl.configs import SFTConfig
    from sftmix_trl.model import load_model, load_tokenizer, lora_config
    from sftmix_trl.sftmix.config import SFTMixConfig
    from sftmix_trl.sftmix.trainer import ROW, SFTMixTrainer

    work = Path(tempfile.mkdtemp(prefix="padding-free-step-"))
    model_args = throughput.build_model("demo", "cpu", work)
    tokenizer = load_tokenizer(model_args)
    dataset, table = throughput.load_pool(throughput.data_dir() / throughput.DATASETS["alpaca"], opts.examples)
    common = dict(
        output_dir=str(work / "run"),
        report_to="none",
        per_device_train_batch_size=8,
        max_length=None,
        padding_free=True,
        activation_checkpointing=False,
        seed=0,
        dataloader_pin_memory=False,
    )

    def build(mixup_weight: float | None):
        torch.manual_seed(0)
        kwargs = dict(
            model=load_model(model_args),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora_config(model_args),
        )
        if mixup_weight is None:
            return SFTTrainer(args=SFTConfig(**common), **kwargs)
        args = SFTMixConfig(**common, confidence_dir=str(work / "unused"), mixup_weight=mixup_weight)
        return SFTMixTrainer(args=args, confidence=table, **kwargs)

    trainers = {NTP: build(None), "SFTMix, mixup_weight 1": build(1.0), "SFTMix, mixup_weight 0": build(0.0)}
    rows = list(trainers["SFTMix, mixup_weight 1"].get_train_dataloader())  # each (1, N): 8 examples end to end
    rows = rows[: opts.rows or len(rows)]

    def step(name: str, row: dict) -> float:
        trainer = trainers[name]
        trainer.model.train()
        inputs = {k: v.clone() if torch.is_tensor(v) else v for k, v in row.items() if k != ROW or name != NTP}
        start = time.perf_counter()
        num_items = trainer._get_num_items_in_batch([inputs], "cpu")
        trainer.compute_loss(trainer.model, inputs, num_items_in_batch=num_items).backward()
        seconds = time.perf_counter() - start
        trainer.model.zero_grad(set_to_none=True)
        return seconds

    names = list(trainers)
    for name in names:  # warm-up
        step(name, rows[0])
    seconds = {name: [[] for _ in rows] for name in names}  # [row][repeat]
    for repeat in range(opts.repeats):
        for i, row in enumerate(rows):
            for name in names if (repeat + i) % 2 == 0 else names[::-1]:
                seconds[name][i].append(step(name, row))
            print(f"repeat {repeat + 1}/{opts.repeats} row {i + 1}/{len(rows)}", flush=True)

    flops = dict.fromkeys(names, 0)
    for name in names:
        for row in rows:  # one row per profile: the profiler's records of a whole epoch outgrow 24 GB
            with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
                step(name, row)
            flops[name] += sum(event.flops for event in prof.key_averages())
            del prof

    real = sum(int(row["input_ids"].numel()) for row in rows)
    total = {name: sum(statistics.median(per_row) for per_row in seconds[name]) for name in names}
    lines = [
        "# Padding-free micro-batches: TRL NTP vs SFTMix (same rows), CPU",
        "",
        f"SmolLM2-135M-Instruct in 4-bit, LoRA r=16; the {len(rows)} paired micro-batches of one epoch over a "
        f"{opts.examples}-example Alpaca pool (8 sequences, {real / len(rows):.0f} tokens per row on average, no "
        f"padding); compute_loss + backward, {opts.repeats} repeats, the trainers back to back on each row in "
        "alternating order.",
        "",
        "| trainer | seconds (sum over rows) | real tokens/s | vs TRL NTP tokens/s | same-row seconds vs TRL NTP "
        "(median, range) | matmul GFLOP | vs TRL NTP |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in names:
        ratios = [s / n for per_row, ntp_row in zip(seconds[name], seconds[NTP]) for s, n in zip(per_row, ntp_row)]
        lines.append(
            f"| {name} | {total[name]:.1f} | {real / total[name]:.0f} | {total[NTP] / total[name]:.3f}x | "
            f"{statistics.median(ratios):.3f}x ({min(ratios):.2f}-{max(ratios):.2f}) | {flops[name] / 1e9:.0f} | "
            f"{flops[name] / flops[NTP]:.3f}x |"
        )
    text = "\n".join(lines) + "\n"
    throughput.write_report("padding_free_step_cpu.md", text)


if __name__ == "__main__":
    main()
