"""The adapter alone as a GGUF LoRA (llama.cpp's `convert_lora_to_gguf.py`), for `llama-cli -m BASE.gguf --lora
LORA.gguf`: the file is read back with the `gguf` package and checked against the adapter it came from (type, alpha,
one A and one B of the trained shapes per adapted weight). Running base + LoRA in llama.cpp's runtime against the
merged model needs a compiled llama.cpp: that check is in `benchmarks/gguf_export.py`."""

from __future__ import annotations

import json
from pathlib import Path

from sftmix_trl.after_training.llama_cpp import LlamaCppError, converter_problem, run_converter
from sftmix_trl.errors import SFTMixError
from sftmix_trl.runs import redact

LORA_CONVERTER = "convert_lora_to_gguf.py"
LORA_OUTTYPE = "f16"  # the adapter is small: 16-bit keeps its deltas exact enough for any base type


class LoraExportError(SFTMixError):
    """The adapter cannot be written as a GGUF LoRA, or the file written does not match it."""


def lora_settings(adapter: Path) -> dict:
    """The adapter's LoRA settings that llama.cpp's runtime reproduces; refuses those it does not (it scales every
    pair by alpha / r, reading neither rsLoRA's scale nor DoRA's magnitudes)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    for key, what in (("use_rslora", "rsLoRA's alpha / sqrt(r) scale"), ("use_dora", "DoRA's magnitude vectors")):
        if config.get(key):
            raise LoraExportError(
                f"the adapter uses {key}: llama.cpp's LoRA runtime does not apply {what}; export it merged "
                "(without `--lora_only`)"
            )
    if config.get("modules_to_save"):
        raise LoraExportError(
            f"the adapter trains whole modules ({', '.join(config['modules_to_save'])}), which a GGUF LoRA cannot "
            "carry: export it merged (without `--lora_only`)"
        )
    return {"r": int(config["r"]), "lora_alpha": float(config["lora_alpha"])}


def convert_lora(root: Path, adapter: Path, base_path: str, out_file: Path) -> None:
    """llama.cpp's LoRA converter on `adapter`, reading the base's config (not its weights) from `base_path`."""
    args = [str(adapter), "--base", base_path, "--outfile", str(out_file), "--outtype", LORA_OUTTYPE]
    result = run_converter(root, LORA_CONVERTER, args)
    if result.returncode != 0:
        raise LlamaCppError(converter_problem(result.stdout + result.stderr))


def _adapter_shapes(adapter: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    with safe_open(adapter / "adapter_model.safetensors", "pt") as weights:
        return {name: list(weights.get_slice(name).get_shape()) for name in weights.keys() if ".lora_" in name}


def check_lora_gguf(lora_file: Path, adapter: Path) -> dict:
    """What the GGUF LoRA says it is, against the adapter: llama.cpp loads a file whose `general.type` is `adapter`
    and `adapter.type` `lora`, scales by `adapter.lora.alpha`, and pairs `<tensor>.lora_a` with `<tensor>.lora_b`."""
    from gguf import GGUFReader

    settings = lora_settings(adapter)
    reader = GGUFReader(lora_file)

    def value(key: str):
        field = reader.fields.get(key)
        return field.contents() if field is not None else None

    pairs: dict[str, dict[str, list[int]]] = {}
    for tensor in reader.tensors:
        stem, _, part = tensor.name.rpartition(".")
        if part in ("lora_a", "lora_b"):  # GGUF lists a tensor's dims innermost first
            pairs.setdefault(stem, {})[part] = [int(n) for n in reversed(tensor.shape)]
    trained = _adapter_shapes(adapter)
    a_shapes = sorted(tuple(s) for n, s in trained.items() if ".lora_A" in n)
    b_shapes = sorted(tuple(s) for n, s in trained.items() if ".lora_B" in n)
    check = {
        "general_type": value("general.type"),
        "adapter_type": value("adapter.type"),
        "alpha": value("adapter.lora.alpha"),
        "alpha_expected": settings["lora_alpha"],
        "rank": settings["r"],
        "pairs": len(pairs),
        "pairs_expected": len(a_shapes),
        "complete_pairs": all(set(p) == {"lora_a", "lora_b"} for p in pairs.values()),
        # q/k projections are permuted for llama.cpp's rope layout: rows move, shapes stay
        "shapes_match": sorted(tuple(p.get("lora_a", ())) for p in pairs.values()) == a_shapes
        and sorted(tuple(p.get("lora_b", ())) for p in pairs.values()) == b_shapes,
    }
    check["passed"] = bool(
        check["general_type"] == "adapter"
        and check["adapter_type"] == "lora"
        and check["alpha"] is not None
        and abs(check["alpha"] - check["alpha_expected"]) < 1e-6
        and check["pairs"] == check["pairs_expected"] > 0
        and check["complete_pairs"]
        and check["shapes_match"]
    )
    return check


def lora_file_name(out: Path) -> str:
    return f"{out.name}-lora-{LORA_OUTTYPE}.gguf"


def write_lora_card(out: Path, *, base_file: Path, lora_file: Path, args: dict, llama_cpp: str, check: dict) -> Path:
    """README.md of a LoRA-only export: the two files, what their checks measured, the llama.cpp line."""

    lora, base = check["lora"], check["base"]
    verdict = "passed" if check["passed"] else "**FAILED**"
    body = f"""---
library_name: gguf
tags:
- gguf
- llama.cpp
- lora
---

# {out.name}

The LoRA adapter `{args["adapter_path"]}` as a GGUF LoRA (`{lora_file.name}`, {LORA_OUTTYPE}, alpha {lora["alpha"]:g},
rank {lora["rank"]}, {lora["pairs"]} adapted weights), and its base `{args["model_name_or_path"]}` as GGUF
{check["gguf_type"]} (`{base_file.name}`), both written by llama.cpp's own converters (llama.cpp {llama_cpp}).

## Check ({verdict})

- The LoRA file read back: type `{lora["general_type"]}`/`{lora["adapter_type"]}`, alpha {lora["alpha"]:g} (adapter
  {lora["alpha_expected"]:g}), {lora["pairs"]} of {lora["pairs_expected"]} A/B pairs, shapes
  {"as trained" if lora["shapes_match"] else "DIFFERENT"}.
- The base GGUF against the base model on {base["examples"]} held-out examples, through transformers' GGUF loader:
  response perplexity {base["perplexity_gguf"]:.4f} against {base["perplexity_merged"]:.4f}
  ({base["perplexity_increase"]:+.3%}, limit {check["max_perplexity_increase"]:+.1%}); greedy replies identical on
  {base["greedy_identical"]} of {base["greedy_prompts"]} prompts.

## Use

`llama-cli -m {base_file.name} --lora {lora_file.name} -cnv` (or `llama-server` with the same flags); Ollama:
`FROM ./{base_file.name}` and `ADAPTER ./{lora_file.name}` in a Modelfile.
"""
    path = out / "README.md"
    path.write_text(redact(body))
    return path
