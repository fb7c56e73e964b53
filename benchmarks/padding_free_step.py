"""One padding-free micro-batch of real data: TRL NTP against SFTMix, forward + backward on the *same* row.

    python benchmarks/padding_free_step.py            # Alpaca lengths, the demo model in 4-bit, CPU

`throughput.py` times whole epochs, where a 2-core machine drifts by +-10% between rounds; this isolates what the
Mixup term adds to a padding-free step. The first micro-batch SFTMix's paired sampler draws from the 64-example
Alpaca pool of `throughput.py` (8 sequences laid end to end) goes through `compute_loss` and `backward` of: TRL's
`SFTTrainer` (the NTP loss), `SFTMixTrainer` with `mixup_weight: 1`, and with `mixup_weight: 0` (the Mixup term
computed without gradient). Interleaved repeats; median seconds. Written to
benchmarks/results/padding_free_step_cpu.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402  (the pool, the model and the data folder of the throughput benchmark)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    opts = parser.parse_args()

    from trl import SFTTrainer

    from sftmix_trl.configs import SFTConfig
    from sftmix_trl.model import load_model, load_tokenizer, lora_config
    from sftmix_trl.sftmix_config import SFTMixConfig
    from sftmix_trl.sftmix_trainer import ROW, SFTMixTrainer

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
        gradient_checkpointing=False,
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

    trainers = {"TRL NTP": build(None), "SFTMix, mixup_weight 1": build(1.0), "SFTMix, mixup_weight 0": build(0.0)}
    row = next(iter(trainers["SFTMix, mixup_weight 1"].get_train_dataloader()))  # (1, N): 8 examples end to end
    seconds: dict[str, list[float]] = {name: [] for name in trainers}
    for _ in range(opts.repeats):
        for name, trainer in trainers.items():
            trainer.model.train()
            inputs = {
                k: v.clone() if torch.is_tensor(v) else v for k, v in row.items() if k != ROW or "SFTMix" in name
            }
            start = time.perf_counter()
            num_items = trainer._get_num_items_in_batch([inputs], "cpu")
            trainer.compute_loss(trainer.model, inputs, num_items_in_batch=num_items).backward()
            seconds[name].append(time.perf_counter() - start)
            trainer.model.zero_grad(set_to_none=True)

    ntp = statistics.median(seconds["TRL NTP"])
    lines = [
        "# One padding-free micro-batch: TRL NTP vs SFTMix (same row), CPU",
        "",
        f"SmolLM2-135M-Instruct in 4-bit, LoRA r=16; the first paired micro-batch of a {opts.examples}-example Alpaca "
        f"pool, 8 sequences in one row of {row['input_ids'].shape[1]} tokens; compute_loss + backward, "
        f"{opts.repeats} interleaved repeats.",
        "",
        "| trainer | seconds (median) | all | vs TRL NTP |",
        "| --- | --- | --- | --- |",
    ]
    for name, values in seconds.items():
        median = statistics.median(values)
        runs = ", ".join(f"{v:.2f}" for v in values)
        lines.append(f"| {name} | {median:.2f} | {runs} | {median / ntp:.3f}x |")
    text = "\n".join(lines) + "\n"
    out = throughput.RESULTS / "padding_free_step_cpu.md"
    out.write_text(text)
    print(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
