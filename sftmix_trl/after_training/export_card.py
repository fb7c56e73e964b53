"""README.md of a GGUF export: what it was made from and with, what its check measured, how to run it."""

from __future__ import annotations

from pathlib import Path

from sftmix_trl.after_training.hub import SFTMIX_CITATION, _is_local_model, redact


def write_export_card(
    out: Path, *, gguf_file: Path, args: dict, method: str, llama_cpp: str, check: dict, stops: list[str], data: str
) -> Path:
    base = args["model_name_or_path"]
    local = _is_local_model(base)
    front = ["---", "library_name: gguf", "pipeline_tag: text-generation"]
    front += [] if local else [f"base_model: {base}", "base_model_relation: quantized"]
    front += ["tags:", "- gguf", "- llama.cpp", "- trl", "- lora", "- merged"]
    front += (["- sftmix"] if method == "SFTMix" else []) + ["---"]
    name, size = gguf_file.name, gguf_file.stat().st_size / 2**20
    verdict = "passed" if check["passed"] else "**FAILED**"
    rows = "\n".join(
        f"| {i + 1} | {g['merged']!r} | {g['gguf']!r} |".replace("\n", " ") for i, g in enumerate(check["greedy"])
    )
    stop_flags = " ".join(f"-r {s!r}" for s in stops)
    body = f"""
# {out.name}

The LoRA adapter `{args["adapter_path"]}` merged into `{base}` ({args["merge_target"]} weights) and converted to GGUF
**{check["gguf_type"]}** by llama.cpp's own converter (llama.cpp {llama_cpp}){", quantised by llama-quantize" if check["gguf_type"].startswith(("q4_k", "q5_k", "q6_k")) else ""}.
Method: {method}. The chat template the run trained with is in the file's metadata (`tokenizer.chat_template`).
{SFTMIX_CITATION if method == "SFTMix" else ""}

| | |
| --- | --- |
| file | `{name}` ({size:.1f} MiB) |
| type | {check["gguf_type"]} |
| base | {base} |
| adapter | {args["adapter_path"]} |
| stop at | {", ".join(f"`{s}`" for s in stops)} |

## Check: the GGUF against the merged model ({verdict})

Both models on {check["examples"]} held-out examples ({data}; {check["response_tokens"]} response tokens), the GGUF
read back through transformers' GGUF loader:

| | merged model | GGUF |
| --- | --- | --- |
| held-out response perplexity | {check["perplexity_merged"]:.4f} | {check["perplexity_gguf"]:.4f} |

Perplexity increase {check["perplexity_increase"]:+.3%} (limit {check["max_perplexity_increase"]:+.1%}); the GGUF's tokenizer
renders the prompts {"the same" if check["template_renders_same"] else "DIFFERENTLY"} and encodes them
{"the same" if check["tokenizer_encodes_same"] else "DIFFERENTLY"}; greedy replies identical on {check["greedy_identical"]} of
{check["greedy_prompts"]} prompts (mean agreement {check["greedy_agreement"]:.2f}, share of the reply before the first
differing token):

| prompt | merged model | GGUF |
| --- | --- | --- |
{rows}

## Use

llama.cpp: `llama-cli -m {name} -cnv {stop_flags}` (the embedded template formats the chat), or
`llama-server -m {name}`. Ollama: `ollama create {out.name} -f Modelfile` (the Modelfile beside this card names
the file and the stop tokens), then `ollama run {out.name}`. Python:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained(".", gguf_file="{name}")
tokenizer = AutoTokenizer.from_pretrained(".", gguf_file="{name}")
```
"""
    path = out / "README.md"
    path.write_text("\n".join(front) + "\n" + redact(body))
    return path
