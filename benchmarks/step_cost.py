"""Training-step cost of SFTMixTrainer against plain TRL SFTTrainer (the NTP baseline), on the same batches.

    python benchmarks/step_cost.py                 # all cases, CPU
    python benchmarks/step_cost.py --case mixup    # one case: demo | bigvocab | mixup

Cases:
  demo      SmolLM2-135M-Instruct, 4-bit base + LoRA, the demo data. Target: time and peak memory <= 1.10x NTP.
  bigvocab  a random Llama with Llama-3's vocabulary (128,256) and small layers, where the LM head dominates.
            Targets: peak memory <= 1.10x NTP; the time ratio within 10% of its arithmetic bound
            1 + (mixed positions / scored positions) x (LM-head share of the step's FLOPs), printed beside it.
  mixup     `mixup_loss` alone against the naive full-logits version, vocabulary 128,256, 2,048 mixed positions.
            Target: naive peak / chunked peak >= 4.

Each trainer variant runs in its own subprocess (a fresh process, so peak memory is its own); both variants train
the same micro-batches, drawn by the same PairedSampler. Results are printed and written to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import peak_memory  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# -- building blocks --------------------------------------------------------------------------------------------------


def demo_setup(num_examples: int, max_length: int):
    from sftmix_trl.configs import ModelArguments, ScriptArguments
    from sftmix_trl.data.load import load_datasets
    from sftmix_trl.demo_model import prepare_demo_model

    model_args = ModelArguments(model_name_or_path=str(prepare_demo_model()), load_in_4bit=True)
    mixture = {
        "datasets": [{"path": str(ROOT / "data/demo" / f)} for f in ("instruct_alpaca.jsonl", "health_qa.json")]
    }
    dataset = load_datasets(ScriptArguments(dataset_mixture=mixture, max_train_examples=num_examples))[0]
    return model_args, dataset, max_length


def bigvocab_setup(num_examples: int, max_length: int, tmp: Path):
    """A random Llama-3-vocabulary model saved locally, and pre-tokenized data (TRL skips its preparation)."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftmix_trl.configs import ModelArguments

    path = tmp / "bigvocab"
    if not (path / "config.json").is_file():
        config = LlamaConfig(
            vocab_size=128_256,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        )
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(path)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(num_examples):
        length = int(rng.integers(max_length // 2, max_length + 1))
        prompt = int(rng.integers(length // 5, length // 2))
        ids = rng.integers(0, 128_256, size=length).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "example_id": f"ex{i}"})
    model_args = ModelArguments(model_name_or_path=str(path), load_in_4bit=False, dtype="float32")
    return model_args, Dataset.from_list(rows), max_length


def step_flops(config, tokens: int, scored: int) -> tuple[float, float]:
    """Forward FLOPs of the backbone over `tokens` and of the LM head over `scored` positions (backward, with frozen
    weights and LoRA, costs about the same multiple of each, so the share is the forward share)."""
    d, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    per_token_linear = layers * (2 * d * d + 2 * d * kv + 3 * d * inter)
    return 2.0 * per_token_linear * tokens, 2.0 * config.vocab_size * d * scored


# -- one trainer variant (runs in a subprocess) -------------------------------------------------------------------------


def run_variant(case: str, variant: str, steps: int, warmup: int, out: Path) -> None:
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTTrainer

    from sftmix_trl.confidence import ConfidenceTable
    from sftmix_trl.demo_model import prepare_demo_model
    from sftmix_trl.model import load_model, load_tokenizer, lora_config
    from sftmix_trl.sftmix.config import SFTMixConfig
    from sftmix_trl.sftmix.mixup import count_mixed_positions
    from sftmix_trl.sftmix.sampler import PairedSampler
    from sftmix_trl.sftmix.trainer import SFTMixTrainer

    tmp = RESULTS / ".cache"
    if case == "demo":
        model_args, dataset, max_length = demo_setup(64, 256)
        tokenizer = load_tokenizer(model_args)
    else:
        model_args, dataset, max_length = bigvocab_setup(64, 256, tmp)
        # any tokenizer serves for padding: the ids are already made
        tokenizer = AutoTokenizer.from_pretrained(prepare_demo_model())
        tokenizer.pad_token = "<|endoftext|>"
    rng = np.random.default_rng(0)
    table = ConfidenceTable(list(dataset["example_id"]), rng.uniform(2, 50, (len(dataset), 3)), np.ones(len(dataset)))
    args = SFTMixConfig(
        output_dir=str(tmp / f"{case}-{variant}"),
        report_to="none",
        per_device_train_batch_size=8,
        max_length=max_length,
        max_steps=warmup + steps,
        logging_steps=1,
        save_strategy="no",
        activation_checkpointing=False,
        learning_rate=1e-4,
        seed=0,
        confidence_dir=str(tmp / "unused"),
        dataloader_pin_memory=False,
    )
    torch.manual_seed(0)
    common = dict(
        model=load_model(model_args),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(model_args),
    )
    split = table.split()

    class Timer(TrainerCallback):
        times, started = [], 0.0

        def on_step_begin(self, *a, **k):
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            self.started = time.perf_counter()

        def on_step_end(self, *a, **k):
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.started)

    timer = Timer()
    if variant == "sftmix":
        trainer = SFTMixTrainer(confidence=table, callbacks=[timer], **common)
    else:
        ids = list(dataset["example_id"])
        rows = {i: r for r, i in enumerate(ids)}

        class SameBatches(SFTTrainer):  # plain TRL, fed the pairs SFTMix trains on
            def _get_train_sampler(self, train_dataset=None):
                return PairedSampler([rows[i] for i in split[0]], [rows[i] for i in split[1]], 4, seed=0)

        trainer = SameBatches(callbacks=[timer], **common)
    with peak_memory(DEVICE) as memory:
        trainer.train()

    # Positions per micro-batch, from the batches both variants trained on (TRL's fused head scores every position
    # on a CPU and only the response positions on CUDA)
    batches = []
    loader = trainer.get_train_dataloader()
    for batch, _ in zip(loader, range(warmup + steps)):
        batches.append(batch)
    labels = [b["labels"] for b in batches[warmup:]]
    mixed = sum(int(count_mixed_positions(lab)) for lab in labels)
    scored = sum(int((lab[:, 1:] != -100).sum()) if DEVICE == "cuda" else lab[:, 1:].numel() for lab in labels)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[warmup:])
    backbone, head = step_flops(trainer.model.config, tokens, scored)
    out.write_text(
        json.dumps(
            {
                "step_seconds": timer.times[warmup:],
                "peak_bytes": memory["peak"],
                "mixed": mixed,
                "scored": scored,
                "head_share": head / (head + backbone),
            }
        )
    )


# -- the mixup loss alone -----------------------------------------------------------------------------------------------


def full_logits_mixup_loss(h_c, h_u, y_c, y_u, weight, lam):
    """The naive version: the same loss with the float32 logits of every mixed position materialised at once."""
    from sftmix_trl.sftmix.mixup import mixed_position_masks

    keep_c, keep_u, n = mixed_position_masks(y_c, y_u)
    lam_pos = lam.repeat_interleave(n)[:, None]
    z = lam_pos * h_c[:, :-1][keep_c] + (1 - lam_pos) * h_u[:, :-1][keep_u]  # (M, D)
    log_probs = (z @ weight.T).float().log_softmax(-1)  # (M, V)
    nll_c = -log_probs.gather(1, y_c[:, 1:][keep_c][:, None]).squeeze(1)
    nll_u = -log_probs.gather(1, y_u[:, 1:][keep_u][:, None]).squeeze(1)
    return (lam_pos.squeeze(1) * nll_c + (1 - lam_pos.squeeze(1)) * nll_u).mean()


def mixup_memory(vocab: int = 128_256, hidden: int = 1024, pairs: int = 8, positions: int = 256) -> dict:
    from sftmix_trl.sftmix.mixup import mixup_loss

    generator = torch.Generator().manual_seed(0)
    t = positions + 1
    h_c = torch.randn(pairs, t, hidden, generator=generator, device="cpu").to(DEVICE).requires_grad_()
    h_u = torch.randn(pairs, t, hidden, generator=generator, device="cpu").to(DEVICE).requires_grad_()
    labels = torch.randint(0, vocab, (2, pairs, t), generator=generator).to(DEVICE)
    labels[:, :, 0] = -100
    weight = (torch.randn(vocab, hidden, generator=generator) / hidden**0.5).to(DEVICE)
    lam = torch.rand(pairs, generator=generator).to(DEVICE)
    results = {}
    for name, fn in (("chunked", mixup_loss), ("naive", full_logits_mixup_loss)):
        for _ in range(2):  # the second run is measured: allocator and kernels warm
            h_c.grad = h_u.grad = None
            start = time.perf_counter()
            with peak_memory(DEVICE) as memory:
                loss = fn(h_c, h_u, labels[0], labels[1], weight, lam)
                loss.backward()
            seconds = time.perf_counter() - start
        results[name] = {"peak_bytes": memory["peak"], "seconds": seconds, "loss": loss.item()}
    results["mixed_positions"] = pairs * positions
    return results


# -- driver -------------------------------------------------------------------------------------------------------------


def compare(case: str, steps: int, warmup: int) -> dict:
    runs = {}
    for variant in ("ntp", "sftmix"):
        out = RESULTS / f".{case}-{variant}.json"
        cmd = [
            sys.executable,
            __file__,
            "--case",
            case,
            "--variant",
            variant,
            "--steps",
            str(steps),
            "--warmup",
            str(warmup),
            "--out",
            str(out),
        ]
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        runs[variant] = json.loads(out.read_text())
        out.unlink()
    ntp, mix = runs["ntp"], runs["sftmix"]
    time_ratio = statistics.median(mix["step_seconds"]) / statistics.median(ntp["step_seconds"])
    bound = 1 + mix["mixed"] / mix["scored"] * mix["head_share"]
    return {
        "case": case,
        "ntp_step_s": statistics.median(ntp["step_seconds"]),
        "sftmix_step_s": statistics.median(mix["step_seconds"]),
        "time_ratio": time_ratio,
        "ntp_peak_mib": ntp["peak_bytes"] / 2**20,
        "sftmix_peak_mib": mix["peak_bytes"] / 2**20,
        "memory_ratio": mix["peak_bytes"] / ntp["peak_bytes"],
        "time_bound": bound,
        "time_vs_bound": time_ratio / bound,
        "mixed_over_scored": mix["mixed"] / mix["scored"],
        "head_share": mix["head_share"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="all", choices=["all", "demo", "bigvocab", "mixup"])
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    parser.add_argument("--variant", choices=["ntp", "sftmix"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return run_variant(args.case, args.variant, args.steps, args.warmup, args.out)

    RESULTS.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else f"CPU ({os.cpu_count()} cores)"
    lines = [
        f"# Step cost: SFTMixTrainer vs TRL SFTTrainer (same batches), {device}",
        "",
        f"{args.steps} timed steps after {args.warmup} warm-up, per-device batch 8 (4 pairs), max length 256.",
        "",
    ]
    cases = ["demo", "bigvocab", "mixup"] if args.case == "all" else [args.case]
    for case in cases:
        if case == "mixup":
            r = mixup_memory()
            ratio = r["naive"]["peak_bytes"] / r["chunked"]["peak_bytes"]
            lines += [
                "## mixup_loss alone (vocabulary 128,256, hidden 1024, 2,048 mixed positions, forward+backward)",
                "",
                "| version | peak MiB | seconds | loss |",
                "| --- | --- | --- | --- |",
            ]
            lines += [
                f"| {n} | {r[n]['peak_bytes'] / 2**20:.0f} | {r[n]['seconds']:.2f} | {r[n]['loss']:.4f} |"
                for n in ("naive", "chunked")
            ]
            lines += ["", f"naive / chunked peak memory: **{ratio:.1f}x** (target >= 4x)", ""]
        else:
            r = compare(case, args.steps, args.warmup)
            lines += [
                f"## {case}",
                "",
                "| | NTP (TRL SFTTrainer) | SFTMix | ratio | target |",
                "| --- | --- | --- | --- | --- |",
                f"| step time (s, median) | {r['ntp_step_s']:.2f} | {r['sftmix_step_s']:.2f} | "
                f"{r['time_ratio']:.3f} | {'<= 1.10' if case == 'demo' else 'within 10% of bound'} |",
                f"| peak memory (MiB above start) | {r['ntp_peak_mib']:.0f} | {r['sftmix_peak_mib']:.0f} | "
                f"{r['memory_ratio']:.3f} | <= 1.10 |",
                "",
                f"mixed / scored positions {r['mixed_over_scored']:.3f}; LM-head share of step FLOPs "
                f"{r['head_share']:.3f}; arithmetic bound {r['time_bound']:.3f}; measured / bound "
                f"**{r['time_vs_bound']:.3f}**",
                "",
            ]
        print("\n".join(lines[-12:]), flush=True)
    name = "step_cost" if args.case == "all" else f"step_cost_{args.case}"
    (RESULTS / f"{name}_{DEVICE}.md").write_text("\n".join(lines))
    print(f"written to {RESULTS / f'{name}_{DEVICE}.md'}")


if __name__ == "__main__":
    main()
