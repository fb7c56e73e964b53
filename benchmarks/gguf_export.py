"""The GGUF export in llama.cpp's own runtime: f16, q8_0 and q4_k_m files of one run, and its LoRA-only export, against
the merged model in transformers.

    python benchmarks/gguf_export.py --adapter outputs/demo/sft_qlora \\
        --build "llama-quantize + libllama (shared), 2 cores=SECONDS"     # writes benchmarks/results/gguf_export_cpu.*

Needs llama-cpp-python 0.3.36, the release whose sdist vendors the llama.cpp the export converts with. Its Python
package can run on the libraries of the quantiser's build (`LLAMA_CPP_LIB_PATH=<llama.cpp>/build/bin`), so llama.cpp
is compiled once for both; see docs/serving.md. For each type the export runs as a user runs it (`sftmix_trl.after_training.export`,
its check through transformers' GGUF loader), then the same file is scored by llama.cpp:

- held-out response perplexity from llama.cpp's logits (`logits_all=True`) on the same examples, rendered with the
  same template and tokenizer as the merged model's (the ids are the same, only the forward pass differs);
- greedy agreement with the merged model on the first prompts (share of the reply before the first differing token);
- generation speed: `--new_tokens` greedy tokens from each prompt, prompt included, in llama.cpp and for the merged
  model in transformers (float32), both on the same number of threads.

The LoRA-only export (base f16 + GGUF LoRA) is scored the same way with llama.cpp's `lora_path`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sftmix_trl.after_training.export import ExportArguments, export, held_out_data  # noqa: E402
from sftmix_trl.after_training.export_check import agreement, greedy_tokens  # noqa: E402
from sftmix_trl.evaluation.perplexity import render  # noqa: E402

TYPES = ("f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m")


def llama_perplexity(llm, tokenizer, dataset) -> dict:
    """Response perplexity from llama.cpp's logits: the logits at position t score token t + 1."""
    nll, tokens = 0.0, 0
    for example in dataset:
        ids, spans = render(tokenizer, example)
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
        log_probs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        for start, end in spans:
            nll -= float(log_probs[np.arange(start - 1, end - 1), ids[start:end]].sum())
            tokens += end - start
    return {"perplexity": math.exp(nll / tokens), "tokens": tokens}


def llama_greedy(llm, prompts: list[list[int]], max_new_tokens: int, stops: set[int] | None) -> tuple[list, float]:
    """Greedy replies (stopping at `stops`, or exactly `max_new_tokens` when None) and new tokens per second (the
    prompt's evaluation included: `reset` drops the cached prefix)."""
    replies, generated, seconds = [], 0, 0.0
    for ids in prompts:
        reply, started = [], time.perf_counter()
        for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            if stops is not None and token in stops:
                break
            reply.append(token)
            if len(reply) == max_new_tokens:
                break
        seconds += time.perf_counter() - started
        generated += len(reply)
        replies.append(reply)
    return replies, generated / seconds


@torch.no_grad()
def transformers_speed(model, prompts: list[list[int]], new_tokens: int, pad_token_id: int) -> float:
    seconds = 0.0
    for ids in prompts:
        input_ids = torch.tensor([ids])
        started = time.perf_counter()
        model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                       min_new_tokens=new_tokens, max_new_tokens=new_tokens, pad_token_id=pad_token_id)  # fmt: skip
        seconds += time.perf_counter() - started
    return new_tokens * len(prompts) / seconds


def score_in_llama_cpp(model_path: Path, tokenizer, dataset, prompts, reference, args, lora_path=None) -> dict:
    from llama_cpp import Llama

    threads = torch.get_num_threads()
    llm = Llama(model_path=str(model_path), lora_path=str(lora_path) if lora_path else None, n_ctx=args.n_ctx,
                logits_all=True, n_threads=threads, n_threads_batch=threads, verbose=False)  # fmt: skip
    figures = llama_perplexity(llm, tokenizer, dataset)
    stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")} - {None}
    replies, _ = llama_greedy(llm, prompts, args.max_new_tokens, stops)
    shares = [agreement(a, b) for a, b in zip(reference, replies)]
    speed = max(llama_greedy(llm, prompts, args.new_tokens, None)[1] for _ in range(args.repeats))
    del llm
    return {
        **figures,
        "greedy_identical": sum(a == b for a, b in zip(reference, replies)),
        "greedy_agreement": sum(shares) / len(shares),
        "tokens_per_s": speed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True, help="a run's output_dir (its held-out split is the check's)")
    parser.add_argument("--work_dir", default="/tmp/gguf_export_bench", help="where the exports are written")
    parser.add_argument("--eval_limit", type=int, default=16)
    parser.add_argument("--check_prompts", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=32, help="greedy tokens compared per prompt")
    parser.add_argument("--new_tokens", type=int, default=64, help="tokens generated per prompt for tokens/s")
    parser.add_argument("--repeats", type=int, default=3, help="speed: the best of this many passes (shared CPU)")
    parser.add_argument("--n_ctx", type=int, default=2048)
    parser.add_argument("--reuse", action="store_true", help="score the exports already in work_dir, if complete")
    parser.add_argument("--build", action="append", default=[], help="'what=seconds' of a build, for the table")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gguf_export_cpu"))
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = Path(args.work_dir)
    common = dict(adapter_path=args.adapter, eval_limit=args.eval_limit, check_prompts=args.check_prompts,
                  max_new_tokens=args.max_new_tokens, overwrite_output_dir=True,
                  max_perplexity_increase=10.0)  # fmt: skip  # record every figure; the limits are chosen from them
    exports = {}
    for gguf_type in TYPES:
        out = work / gguf_type
        if not (args.reuse and (out / "export_check.json").is_file()):
            started = time.perf_counter()
            export(ExportArguments(output_dir=str(out), gguf=gguf_type, keep_merged=gguf_type == "f16", **common))
            (work / f"{gguf_type}.seconds").write_text(str(time.perf_counter() - started))
        exports[gguf_type] = {"seconds": float((work / f"{gguf_type}.seconds").read_text()), "dir": out}
    lora_out = work / "lora"
    if not (args.reuse and (lora_out / "export_check.json").is_file()):
        started = time.perf_counter()
        export(ExportArguments(output_dir=str(lora_out), gguf="f16", lora_only=True, **common))
        (work / "lora.seconds").write_text(str(time.perf_counter() - started))
    lora_seconds = float((work / "lora.seconds").read_text())

    merged_dir = exports["f16"]["dir"] / "merged"
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    dataset = held_out_data(ExportArguments(output_dir=str(work / "unused"), **common))
    conversations = [example["prompt"] for example in dataset.select(range(args.check_prompts))]
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True) for c in conversations]
    prompts = [p["input_ids"] if hasattr(p, "keys") else list(p) for p in prompts]
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    reference = greedy_tokens(merged, tokenizer, conversations, args.max_new_tokens)
    merged_speed = max(
        transformers_speed(merged, prompts, args.new_tokens, tokenizer.pad_token_id) for _ in range(args.repeats)
    )
    del merged

    rows = []
    for gguf_type, made in exports.items():
        check = json.loads((made["dir"] / "export_check.json").read_text())
        gguf_file = next(made["dir"].glob("*.gguf"))
        llama = score_in_llama_cpp(gguf_file, tokenizer, dataset, prompts, reference, args)
        rows.append({"type": gguf_type, "file": gguf_file.name, "mib": gguf_file.stat().st_size / 2**20,
                     "export_seconds": made["seconds"], "transformers": check, "llama_cpp": llama})  # fmt: skip
    lora_check = json.loads((lora_out / "export_check.json").read_text())
    base_file, lora_file = sorted(lora_out.glob("*-base-*.gguf"))[0], sorted(lora_out.glob("*-lora-*.gguf"))[0]
    lora_llama = score_in_llama_cpp(base_file, tokenizer, dataset, prompts, reference, args, lora_path=lora_file)
    base_llama = score_in_llama_cpp(base_file, tokenizer, dataset, prompts, reference, args)
    merged_ppl = rows[0]["transformers"]["perplexity_merged"]
    result = {
        "command": " ".join(["python", "benchmarks/gguf_export.py", *sys.argv[1:]]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}",
        "builds": dict(b.split("=", 1) for b in args.build),
        "examples": rows[0]["transformers"]["examples"],
        "response_tokens": rows[0]["transformers"]["response_tokens"],
        "merged": {"perplexity": merged_ppl, "tokens_per_s": merged_speed},
        "types": rows,
        "lora_only": {
            "export_seconds": lora_seconds, "base_mib": base_file.stat().st_size / 2**20,
            "lora_mib": lora_file.stat().st_size / 2**20, "check": lora_check, "llama_cpp_base_plus_lora": lora_llama,
            "llama_cpp_base_alone": base_llama,
        },
    }  # fmt: skip
    Path(args.out + ".json").write_text(json.dumps(result, indent=2, default=str, ensure_ascii=False))
    Path(args.out + ".md").write_text(table(result, args))
    print(table(result, args))


def table(r: dict, args) -> str:
    def rel(ppl: float) -> str:
        return f"{ppl:.4f} ({ppl / r['merged']['perplexity'] - 1:+.2%})"

    n = args.check_prompts
    lines = [
        "# GGUF export: llama.cpp's runtime against the merged model (CPU)",
        "",
        f"`{r['command']}`",
        "",
        f"Machine: {r['machine']}, shared with other work. Held-out split of the run: {r['examples']} examples, "
        f"{r['response_tokens']} response tokens. Greedy: the first {n} prompts, {args.max_new_tokens} tokens, "
        f"against the merged model in transformers. tokens/s: {args.new_tokens} greedy tokens from each of the {n} "
        "prompts, prompt included, same thread count, the best of "
        f"{args.repeats} passes.",
        "",
        "| model | file MiB | ppl, transformers GGUF loader | ppl, llama.cpp | greedy same (transformers / llama.cpp) "
        "| agreement, llama.cpp | tokens/s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| merged (transformers, float32) | | {r['merged']['perplexity']:.4f} | | | | "
        f"{r['merged']['tokens_per_s']:.1f} |",
    ]
    for row in r["types"]:
        t, ll = row["transformers"], row["llama_cpp"]
        lines.append(
            f"| {row['type']} | {row['mib']:.1f} | {rel(t['perplexity_gguf'])} | {rel(ll['perplexity'])} | "
            f"{t['greedy_identical']}/{n} / {ll['greedy_identical']}/{n} | {ll['greedy_agreement']:.2f} | "
            f"{ll['tokens_per_s']:.1f} |"
        )
    lo = r["lora_only"]
    for label, ll in (("base f16 + GGUF LoRA", lo["llama_cpp_base_plus_lora"]),
                      ("base f16 alone (no LoRA)", lo["llama_cpp_base_alone"])):  # fmt: skip
        lines.append(
            f"| {label} | {lo['base_mib']:.1f} + {lo['lora_mib']:.1f} | | {rel(ll['perplexity'])} | "
            f"- / {ll['greedy_identical']}/{n} | {ll['greedy_agreement']:.2f} | {ll['tokens_per_s']:.1f} |"
        )
    lines += ["", "Export wall time (merge, convert, quantise, check through transformers): "
              + ", ".join(f"{row['type']} {row['export_seconds']:.0f} s" for row in r["types"])
              + f", LoRA-only {lo['export_seconds']:.0f} s."]  # fmt: skip
    if r["builds"]:
        lines += [
            "",
            "Builds (once, on this machine): " + "; ".join(f"{k}: {v}" for k, v in r["builds"].items()) + ".",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
