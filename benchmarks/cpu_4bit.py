"""CPU time of one LoRA training step with a 4-bit base vs a float32 base, on the CPU.

    python benchmarks/cpu_4bit.py [MODEL] [--steps 4] [--batch 4] [--length 128]

One thread and CPU time (`time.process_time`), so that other work on a shared machine inflates the figures less;
the first step (allocation, bitsandbytes' first dequantization) is reported but left out of the mean.
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import torch
from peft import get_peft_model

from sftmix_trl.configs import ModelArguments
from sftmix_trl.model import load_model, lora_config


def step_seconds(path: str, load_in_4bit: bool, steps: int, batch: int, length: int) -> list[float]:
    args = ModelArguments(model_name_or_path=path, load_in_4bit=load_in_4bit)
    model = get_peft_model(load_model(args), lora_config(args))
    model.train()
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (batch, length))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    seconds = []
    for _ in range(steps):
        start = time.process_time()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds.append(time.process_time() - start)
    del model, optimizer
    gc.collect()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default=os.path.expanduser("~/.cache/sftmix-trl/SmolLM2-135M-Instruct"))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for load_in_4bit in (True, False):
        seconds = step_seconds(args.model, load_in_4bit, args.steps, args.batch, args.length)
        mean = sum(seconds[1:]) / max(len(seconds) - 1, 1)
        label = "4-bit base  " if load_in_4bit else "float32 base"
        print(f"{label}: {mean:.2f} CPU s per step ({args.batch} x {args.length} tokens); all steps {seconds}")


if __name__ == "__main__":
    main()
