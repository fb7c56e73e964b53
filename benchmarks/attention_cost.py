"""Cost of keeping padding-free examples apart, and of the Mixup term on a padding-free row (CPU).

Part 1, attention: one padding-free row of N tokens (2k / 4k / 8k / 16k) made of Alpaca-like examples (lengths drawn
from the Alpaca file when SFTMIX_DATA_DIR has it, else 40 to 400 tokens), one attention call of a small shape
(8 query heads, 2 KV heads, head dim 64, float32), forward only:
- `sdpa_dense_mask`: what transformers does with sdpa: a dense (N, N) block-diagonal causal mask built from
  `position_ids` (`masking_utils.sdpa_mask`), then `scaled_dot_product_attention` with that mask;
- `flex_block_mask`: what it does with flex_attention: a `BlockMask` from the same document ids, compiled
  `flex_attention` (compile time excluded: one warm-up call per length);
- `per_example_sdpa`: each example alone with a causal sdpa, the work flash-attention's varlen kernel does (sum L^2;
  the kernel itself needs a GPU).
Each figure is measured in a fresh process: time (median of 3) and the peak resident memory the call added.

Part 2, the Mixup term on a padding-free row (hidden size 2048, 16 examples = 8 pairs, Alpaca-like lengths, the
hidden states requiring gradients): forward + backward of the Mixup loss before this change (the hidden states re-padded
to (2K, T_max, D) by `unflatten`) and after (`mixed_flat_positions` + `mixup_loss_at`, only the mixed positions
gathered); the losses and gradients are checked equal.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/attention_cost.py            # writes benchmarks/results/attention_cost_cpu.md
    PYTHONPATH=$PWD .venv/bin/python benchmarks/attention_cost.py --lengths 512 --repeats 1 --output /tmp/x.md  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

HEADS, KV_HEADS, HEAD_DIM = 8, 2, 64
DEVICE = ["cpu"]  # the parent's --device, handed to its workers


def example_lengths(total: int, seed: int = 0) -> list[int]:
    """Example lengths filling one row of `total` tokens: Alpaca's token lengths (estimated from characters) when the
    file is at hand, else uniform in [40, 400]; the last example is cut to fit."""
    rng = np.random.default_rng(seed)
    pool = None
    data = Path(os.environ.get("SFTMIX_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    for path in sorted(data.rglob("*alpaca*.json*")) if data.is_dir() else []:
        text = path.read_text()
        try:
            rows = (
                json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x]
            )
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        # about 4 characters a token, plus about 20 tokens of template
        pool = [20 + sum(len(str(v)) for v in r.values()) // 4 for r in rows if isinstance(r, dict)]
        break
    lengths = []
    while sum(lengths) < total:
        lengths.append(int(rng.choice(pool)) if pool else int(rng.integers(40, 401)))
    lengths[-1] -= sum(lengths) - total
    return [n for n in lengths if n > 0]


class PeakMemory:
    """Peak memory added inside the block (MiB, in `.added`): the CUDA allocator's peak on a GPU; on a CPU the
    resident set sampled every 0.2 ms by a thread (the process-lifetime peak would keep the warm-up's, or the
    compiler's), relative to the resident set on entry."""

    def __init__(self, device: str):
        self.device, self.added = device, 0.0

    @staticmethod
    def rss_mib() -> float:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated() / 2**20
            return self
        self.start, self.peak, self.running = self.rss_mib(), 0.0, True

        def sample():
            while self.running:
                self.peak = max(self.peak, self.rss_mib())
                time.sleep(0.0002)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.added = torch.cuda.max_memory_allocated() / 2**20 - self.start
        else:
            self.running = False
            self.thread.join()
            self.added = max(self.peak, self.rss_mib()) - self.start


def attention_case(method: str, total: int, repeats: int, device: str = "cpu") -> dict:
    """One method at one row length, in this process: median seconds and the peak memory it added (MiB)."""
    torch.manual_seed(0)
    lengths = example_lengths(total)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(device)  # (N,) its example
    q = torch.randn(1, HEADS, total, HEAD_DIM, device=device, dtype=dtype)
    k = torch.randn(1, KV_HEADS, total, HEAD_DIM, device=device, dtype=dtype)
    v = torch.randn(1, KV_HEADS, total, HEAD_DIM, device=device, dtype=dtype)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    if method == "sdpa_dense_mask":

        def run():
            index = torch.arange(total, device=device)
            mask = (doc[:, None] == doc[None, :]) & (index[:, None] >= index[None, :])  # (N, N), as sdpa_mask builds
            return sdpa(q, k, v, attn_mask=mask[None, None], enable_gqa=True)

    elif method == "flex_block_mask":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        compiled = torch.compile(flex_attention)

        def mask_mod(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

        def run():
            block_mask = create_block_mask(
                mask_mod, None, None, total, total, device=device, _compile=True
            )  # as transformers
            return compiled(q, k, v, block_mask=block_mask, enable_gqa=True)

    elif method == "per_example_sdpa":
        bounds = np.cumsum([0, *lengths])

        def run():
            outs = [
                sdpa(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True, enable_gqa=True)
                for a, b in zip(bounds[:-1], bounds[1:])
            ]
            return torch.cat(outs, 2)

    elif method == "flash_varlen":  # the flash-attn package's kernel, fed cu_seq_lens as transformers feeds it
        from flash_attn import flash_attn_varlen_func

        cu = torch.tensor(np.cumsum([0, *lengths]), device=device, dtype=torch.int32)
        q1, k1, v1 = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))  # (N, heads, dim)

        def run():
            return flash_attn_varlen_func(q1, k1, v1, cu, cu, max(lengths), max(lengths), causal=True)

    else:
        raise ValueError(method)
    with torch.no_grad():
        run()  # warm-up: kernels loaded (flex: compiled)
        times = []
        with PeakMemory(device) as memory:
            for _ in range(repeats):
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                out = run()
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
                del out
        added = memory.added
    return {"seconds": float(np.median(times)), "peak_added_mib": added, "examples": len(lengths)}


def mixup_case(method: str, hidden_size: int, num_examples: int, vocab: int, device: str = "cpu") -> dict:
    """The Mixup term's forward + backward on one padding-free row, before (re-padded) or after (gathered)."""
    from sftmix_trl.sftmix.mixup import IGNORE_INDEX, mixup_loss, mixup_loss_at
    from sftmix_trl.sftmix.padding_free import mixed_flat_positions, unflatten

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    lengths = [min(1024, n) for n in example_lengths(10**6)[:num_examples]]
    lengths[0] = 1024  # one long example sets T_max, as in a real micro-batch of Alpaca lengths
    labels = []
    for n in lengths:
        prompt = int(rng.integers(1, max(2, n // 2)))
        labels += [IGNORE_INDEX] * prompt + rng.integers(0, vocab, n - prompt).tolist()
    labels = torch.tensor(labels, device=device)[None]
    lengths = torch.tensor(lengths, device=device)
    weight = torch.randn(vocab, hidden_size, device=device) * 0.02
    lam = torch.full((num_examples // 2,), 0.3)
    hidden = torch.randn(1, int(lengths.sum()), hidden_size, device=device, requires_grad=True)
    memory = PeakMemory(device).__enter__()
    start = time.perf_counter()
    if method == "repadded":
        rows, row_labels = unflatten(hidden, lengths), unflatten(labels, lengths, IGNORE_INDEX)
        loss = mixup_loss(rows[0::2], rows[1::2], row_labels[0::2], row_labels[1::2], weight, lam, reduction="sum")
    else:
        index_c, index_u, n = mixed_flat_positions(labels, lengths)
        y_c, y_u = labels[0, index_c + 1], labels[0, index_u + 1]
        loss = mixup_loss_at(hidden[0, index_c], hidden[0, index_u], y_c, y_u, n, weight, lam, reduction="sum")
    loss.backward()
    seconds = time.perf_counter() - start
    memory.__exit__(None, None, None)
    added = memory.added
    return {
        "seconds": seconds,
        "peak_added_mib": added,
        "loss": loss.item(),
        "grad_checksum": float(hidden.grad.double().abs().sum()),
        "tokens": int(lengths.sum()),
        "t_max": int(lengths.max()),
        "repadded_copy_mib": num_examples * int(lengths.max()) * hidden_size * 4 / 2**20,
    }


def in_subprocess(kind: str, *args) -> dict:
    command = [sys.executable, __file__, "--device", DEVICE[0], "--worker", kind, *map(str, args)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), *sys.path])}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,4096,8192,16384")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden_size", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--num_examples", type=int, default=16)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--output", help="default: benchmarks/results/attention_cost_<device>.md")
    parser.add_argument("--worker", nargs="+")
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "attention":
            result = attention_case(rest[0], int(rest[1]), int(rest[2]), args.device)
        else:
            result = mixup_case(rest[0], int(rest[1]), int(rest[2]), int(rest[3]), args.device)
        print(json.dumps(result))
        return

    DEVICE[0] = args.device
    output = Path(args.output or f"benchmarks/results/attention_cost_{args.device}.md")
    methods = ["sdpa_dense_mask", "flex_block_mask", "per_example_sdpa"]
    if args.device == "cuda":
        import importlib.util

        methods += ["flash_varlen"] if importlib.util.find_spec("flash_attn") else []
    lines = [
        f"# Attention cost of one padding-free row, and the Mixup term's memory on it ({args.device})",
        "",
        f"Command: `PYTHONPATH=$PWD .venv/bin/python benchmarks/attention_cost.py --lengths {args.lengths} "
        f"--repeats {args.repeats} --device {args.device}`",
        f"torch {torch.__version__}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} threads"
        + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else "")
        + f". Attention: {HEADS} query heads, {KV_HEADS} KV heads, head dim {HEAD_DIM}, "
        f"{'bfloat16' if args.device == 'cuda' else 'float32'}, forward only; time the median of {args.repeats} "
        "after one warm-up call (flex: its compilation); memory the peak the timed calls added (CPU: resident set "
        "sampled every 0.2 ms, GPU: allocator), a fresh process per figure. `flash_varlen` runs where the flash-attn package is installed.",
        "",
        "| row tokens | examples | method | seconds | peak added (MiB) | dense mask (MiB) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for total in map(int, args.lengths.split(",")):
        for method in methods:
            found = in_subprocess("attention", method, total, args.repeats)
            print(total, method, found, flush=True)
            if "error" in found:
                lines.append(f"| {total} | | {method} | failed: {found['error'][:80]} | | |")
                continue
            mask = total * total / 2**20 if method == "sdpa_dense_mask" else 0
            lines.append(
                f"| {total} | {found['examples']} | {method} | {found['seconds']:.3f} | "
                f"{found['peak_added_mib']:.0f} | {mask:.1f} |"
            )
    lines += [
        "",
        f"## The Mixup term on one padding-free row: {args.num_examples} examples ({args.num_examples // 2} pairs), "
        f"hidden {args.hidden_size}, vocabulary {args.vocab}, float32, forward + backward (peak: as above)",
        "",
        "| path | seconds | peak added (MiB) | re-padded copy (2K x T_max x D, MiB) | loss | sum abs grad |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    results = {}
    for method in ("repadded", "gathered"):
        found = in_subprocess("mixup", method, args.hidden_size, args.num_examples, args.vocab)
        print(method, found, flush=True)
        results[method] = found
        if "error" in found:
            lines.append(f"| {method} | failed: {found['error'][:80]} | | | | |")
            continue
        lines.append(
            f"| {method} | {found['seconds']:.2f} | {found['peak_added_mib']:.0f} | "
            f"{found['repadded_copy_mib']:.0f} | {found['loss']:.6f} | {found['grad_checksum']:.6f} |"
        )
    if all("error" not in r for r in results.values()):
        lines += [
            "",
            f"Row of {results['gathered']['tokens']} tokens, longest example {results['gathered']['t_max']}. Same "
            "loss and gradients on both paths; `repadded` is the code before issue 23 (`unflatten` of the hidden "
            "states), `gathered` the code after (`mixed_flat_positions` + `mixup_loss_at`).",
        ]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
