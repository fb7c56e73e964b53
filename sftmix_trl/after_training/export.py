"""`sftmix-trl export`: a trained adapter as one GGUF file for llama.cpp, Ollama and LM Studio, checked against the
model that was trained.

The adapter is merged as `merge` merges it, then llama.cpp's own converter writes the GGUF (f16, bf16, q8_0; the
k-quants through llama.cpp's quantiser); the chat template the run trained with goes into the file's metadata. The
exported file is then read back and compared with the merged model on held-out text (perplexity of each, greedy
agreement on a few prompts); the figures go into the export's card. Everything that can be refused (the folder, the
adapter, the held-out data, the converter, the architecture, the tokenizer, the type, the template) is refused
before anything is written, and the export is assembled in a staging folder that only a complete export replaces.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sftmix_trl.adapter import adapter_base, check_adapter
from sftmix_trl.after_training.export_card import write_export_card
from sftmix_trl.after_training.export_check import compare_export
from sftmix_trl.after_training.export_lora import (
    check_lora_gguf,
    convert_lora,
    lora_file_name,
    lora_settings,
    write_lora_card,
)
from sftmix_trl.after_training.hub import push_folder
from sftmix_trl.after_training.llama_cpp import (
    CONVERTER,
    LlamaCppError,
    converter_problem,
    find_llama_cpp,
    find_quantize,
    llama_cpp_version,
    run_converter,
)
from sftmix_trl.after_training.merge import TARGETS as MERGE_TARGETS
from sftmix_trl.after_training.merge import MergeArguments, merge, serving_chat_template
from sftmix_trl.configs import ModelArguments, ScriptArguments
from sftmix_trl.data.load import load_datasets
from sftmix_trl.errors import SFTMixError
from sftmix_trl.evaluation.perplexity import load_perplexity_data
from sftmix_trl.model import _check_model_path
from sftmix_trl.run_record import method_of

logger = logging.getLogger(__name__)

CONVERTER_TYPES = ("f16", "bf16", "q8_0")  # written by convert_hf_to_gguf.py itself
QUANTISER_TYPES = ("q4_k_m", "q5_k_m", "q6_k")  # written by llama-quantize from an f16/bf16 GGUF
GGUF_TYPES = CONVERTER_TYPES + QUANTISER_TYPES
# Largest held-out perplexity increase of the GGUF over the merged model that passes the check, per type. Measured on
# the demo run (SmolLM2-135M, 16 held-out examples, benchmarks/results/gguf_export_cpu.md): f16 +0.07%, q8_0 +0.10%,
# q6_k +0.42%, q5_k_m +12.9%, q4_k_m +7.5%. A limit is about twice the measured rise, rounded up, and never under
# q8_0's; q5_k_m and q4_k_m share one, since that small model put them out of order.
DEFAULT_MAX_INCREASE = {"f16": 0.01, "bf16": 0.02, "q8_0": 0.02, "q6_k": 0.02, "q5_k_m": 0.25, "q4_k_m": 0.25}
CHECK_FILE = "export_check.json"


class ExportError(SFTMixError):
    """The export cannot be made or did not pass its check; the message says why."""


@dataclass
class ExportArguments:
    """What `sftmix-trl export` merges, converts, checks and writes."""

    adapter_path: str = field(
        default=None, metadata={"help": "Folder of the saved LoRA adapter (a training run's `output_dir`)."}
    )
    output_dir: str = field(
        default=None,
        metadata={"help": "Folder for the GGUF file, its card, check figures and Ollama Modelfile; new or empty."},
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "The base model. Default: the base recorded in the adapter."}
    )
    gguf: str = field(
        default="q8_0",
        metadata={
            "help": "Type of the GGUF weights: f16, bf16, q8_0 (written by llama.cpp's converter) or q4_k_m, "
            "q5_k_m, q6_k (llama.cpp's k-quants, through its quantiser, compiled once with CMake if not found); "
            "case does not matter."
        },
    )
    merge_target: str = field(
        default="original",
        metadata={
            "help": "Weights the adapter is merged into before conversion, as `merge --target`: 'original' (the "
            "base's own weights) or 'dequantized' (the run's 4-bit weights dequantised: the model it trained).",
            "choices": list(MERGE_TARGETS),
        },
    )
    dtype: str = field(
        default="auto", metadata={"help": "dtype of the merged model the GGUF is converted from (see `merge`)."}
    )
    llama_cpp_dir: str | None = field(
        default=None,
        metadata={
            "help": "A llama.cpp checkout to convert with (also $SFTMIX_LLAMA_CPP_DIR). Default: the pinned copy "
            "that the source distribution of llama-cpp-python vendors, fetched once with pip and cached."
        },
    )
    eval_data: str | None = field(
        default=None,
        metadata={
            "help": "Held-out data for the check (any file `sftmix_trl.data.load` reads). Default: the held-out split "
            "the run recorded in its sftmix_run.json (`eval_split_size`)."
        },
    )
    eval_limit: int = field(default=32, metadata={"help": "Held-out examples scored by the check."})
    check_prompts: int = field(
        default=4, metadata={"help": "Prompts (of the first held-out examples) for the greedy agreement."}
    )
    max_new_tokens: int = field(default=32, metadata={"help": "Greedy tokens generated per check prompt."})
    max_perplexity_increase: float | None = field(
        default=None,
        metadata={
            "help": "Largest relative held-out perplexity increase of the GGUF over the merged model that passes "
            "the check. Default per type: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_MAX_INCREASE.items()) + "."
        },
    )
    lora_only: bool = field(
        default=False,
        metadata={
            "help": "Write the adapter alone as a GGUF LoRA (llama.cpp's convert_lora_to_gguf.py, f16) beside the "
            "base converted to `gguf`, for `llama-cli -m BASE --lora LORA`, instead of one merged file. Checked: "
            "the LoRA file read back against the adapter, the base GGUF against the base (see docs/serving.md)."
        },
    )
    keep_merged: bool = field(
        default=False,
        metadata={"help": "Keep the merged safetensors folder (`merged/`) beside the GGUF (e.g. to serve with vLLM)."},
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Write into a non-empty `output_dir`."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the base's own modelling code."})
    push_to_hub: bool = field(
        default=False, metadata={"help": "Upload the export folder (GGUF, card, Modelfile) to `hub_model_id`."}
    )
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository (user/name) to push to."})
    hub_private_repo: bool | None = field(default=None, metadata={"help": "Create the Hub repository private."})

    def __post_init__(self):
        if not self.adapter_path:
            raise ExportError("`adapter_path` is not set: the folder of the LoRA adapter to export")
        if not self.output_dir:
            raise ExportError("`output_dir` is not set: where the GGUF goes")
        self.gguf = self.gguf.lower()
        if self.gguf not in GGUF_TYPES:
            raise ExportError(
                f"`gguf` {self.gguf!r} is no type llama.cpp's converter or quantiser writes here: one of "
                f"{', '.join(GGUF_TYPES)}"
            )
        if self.merge_target not in MERGE_TARGETS:
            raise ExportError(f"`merge_target` must be one of {', '.join(MERGE_TARGETS)}, got {self.merge_target!r}")
        for name in ("eval_limit", "check_prompts", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ExportError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.lora_only and self.keep_merged:
            raise ExportError("`lora_only` merges nothing: drop `keep_merged`")
        if self.lora_only and self.merge_target != "original":
            raise ExportError(
                "`lora_only` ships the base's own weights with the adapter beside them: `merge_target` "
                f"{self.merge_target!r} needs a merged export (drop `lora_only`)"
            )
        if self.push_to_hub and not self.hub_model_id:
            raise ExportError("push_to_hub is set but `hub_model_id` is not: name the repository (user/name)")

    @property
    def max_increase(self) -> float:
        return (
            self.max_perplexity_increase
            if self.max_perplexity_increase is not None
            else DEFAULT_MAX_INCREASE[self.gguf]
        )


def held_out_data(args: ExportArguments):
    """The check's examples: `eval_data`, else the held-out split of the run recorded beside the adapter."""

    if args.eval_data:
        return load_perplexity_data(args.eval_data, limit=args.eval_limit)
    record = Path(os.path.expanduser(args.adapter_path)) / "sftmix_run.json"
    try:
        config = json.loads(record.read_text()).get("config", {})
    except (OSError, json.JSONDecodeError):
        config = {}
    if not config.get("eval_split_size"):
        raise ExportError(
            f"{args.adapter_path} records no held-out split to check the export on: pass `--eval_data FILE`"
        )
    known = ScriptArguments.__dataclass_fields__
    script_args = ScriptArguments(**{k: v for k, v in config.items() if k in known and k != "overwrite_output_dir"})
    _, held = load_datasets(script_args)
    return held.select(range(min(args.eval_limit, len(held))))


def _shipped_template(args: ExportArguments, base_path: str) -> str:
    """The chat template the merged folder will carry (as `merge` chooses it); refused when there is none."""
    from transformers import AutoTokenizer

    adapter = Path(os.path.expanduser(args.adapter_path))
    base = AutoTokenizer.from_pretrained(base_path, trust_remote_code=args.trust_remote_code)
    own = (adapter / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(adapter, trust_remote_code=args.trust_remote_code) if own else base
    template = serving_chat_template(tokenizer, tokenizer.chat_template, base.chat_template)
    if not isinstance(template, str) or not template.strip():
        raise ExportError(
            "the run's tokenizer has no chat template (or several named ones) to embed in the GGUF: llama.cpp and "
            "Ollama would guess a format; save the tokenizer with the template it trained with"
        )
    return template


def _preflight(root: Path, base_path: str) -> None:
    """The converter's vocabulary-only pass on the base: refuses an unknown architecture or tokenizer in seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        result = run_converter(root, CONVERTER, [base_path, "--vocab-only", "--outfile", f"{tmp}/vocab.gguf"])
        if result.returncode != 0:
            raise LlamaCppError(converter_problem(result.stdout + result.stderr))


def _check_output_dir(args: ExportArguments) -> Path:
    out, adapter = Path(os.path.expanduser(args.output_dir)), Path(os.path.expanduser(args.adapter_path))
    if out.exists() and adapter.exists() and out.resolve() == adapter.resolve():
        raise ExportError("`output_dir` is the adapter folder: write the export to a folder of its own")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite_output_dir:
        raise ExportError(f"output_dir {out} is not empty: choose a new folder or pass `--overwrite_output_dir true`")
    return out


def gguf_metadata(path: Path, key: str):
    from gguf import GGUFReader

    field_ = GGUFReader(path).fields.get(key)
    return field_.contents() if field_ is not None else None


def _convert(root: Path, merged: Path, gguf_file: Path, gguf_type: str, quantize: Path | None) -> None:
    import subprocess

    outtype = gguf_type
    target = gguf_file
    if quantize is not None:  # the quantiser reads a 16-bit GGUF; bf16 keeps a bf16 base's range
        dtype = json.loads((merged / "config.json").read_text()).get("dtype")
        outtype = "bf16" if dtype == "bfloat16" else "f16"
        target = gguf_file.with_name(gguf_file.stem + f".{outtype}.tmp.gguf")
    logger.info("converting %s to GGUF %s with llama.cpp's converter", merged, outtype)
    result = run_converter(root, CONVERTER, [str(merged), "--outfile", str(target), "--outtype", outtype])
    if result.returncode != 0:
        raise LlamaCppError(converter_problem(result.stdout + result.stderr))
    if quantize is not None:
        logger.info("quantising to %s with %s", gguf_type, quantize)
        done = subprocess.run([str(quantize), str(target), str(gguf_file), gguf_type.upper()], capture_output=True,
                              text=True)  # fmt: skip
        target.unlink(missing_ok=True)
        if done.returncode != 0:
            raise LlamaCppError("llama-quantize failed: " + (done.stderr.strip().splitlines() or ["no output"])[-1])


def stop_strings(tokenizer) -> list[str]:
    """The special tokens the template writes right after a reply (end of turn), and the end-of-text token: what a
    runtime must stop at."""
    probe = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A_REPLY_END"}]
    text = tokenizer.apply_chat_template(probe, tokenize=False)
    after = text[text.index("A_REPLY_END") + len("A_REPLY_END") :]
    specials = [t for t in tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()) if t and t in after]
    stops = sorted(set(specials), key=after.index)
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    return stops


def write_modelfile(out: Path, gguf_name: str, stops: list[str]) -> Path:
    lines = [f"FROM ./{gguf_name}"] + [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    path = out / "Modelfile"
    path.write_text("\n".join(lines) + "\n")
    return path


def export(args: ExportArguments) -> Path:
    """Merge, convert, check and write the export; return the output folder. A check that fails leaves the export
    written (its card says so) and raises `ExportError`."""

    args.model_name_or_path = args.model_name_or_path or adapter_base(args.adapter_path)
    if not args.model_name_or_path:
        raise ExportError(f"{args.adapter_path} records no base model: set `model_name_or_path`")
    out = _check_output_dir(args)
    base_path = _check_model_path(args.model_name_or_path)
    check_adapter(args.adapter_path, ModelArguments(model_name_or_path=args.model_name_or_path))
    template = _shipped_template(args, base_path)
    dataset = held_out_data(args)
    root = find_llama_cpp(args.llama_cpp_dir)
    version = llama_cpp_version(root)
    logger.info("llama.cpp %s", version)
    _preflight(root, base_path)
    quantize = find_quantize(root) if args.gguf in QUANTISER_TYPES else None

    if args.lora_only:
        return _export_lora(args, out, root, version, base_path, template, dataset, quantize)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        merged = merge(
            MergeArguments(
                adapter_path=args.adapter_path, output_dir=str(staging / "merged"),
                model_name_or_path=args.model_name_or_path, dtype=args.dtype, target=args.merge_target,
                trust_remote_code=args.trust_remote_code, measure=False,  # the check below measures the GGUF
            )
        )  # fmt: skip
        gguf_file = staging / f"{out.name}-{args.gguf}.gguf"
        _convert(root, merged, gguf_file, args.gguf, quantize)
        embedded = gguf_metadata(gguf_file, "tokenizer.chat_template")
        if embedded != template:
            raise ExportError("llama.cpp's converter did not embed the run's chat template unchanged in the GGUF")

        from transformers import AutoTokenizer

        check = compare_export(merged, gguf_file, dataset, args.max_new_tokens, args.check_prompts)
        check.update(gguf_type=args.gguf, max_perplexity_increase=args.max_increase)
        check["passed"] = bool(
            check["perplexity_increase"] <= args.max_increase
            and check["template_renders_same"]
            and check["tokenizer_encodes_same"]
        )
        (staging / CHECK_FILE).write_text(json.dumps(check, indent=2, ensure_ascii=False))
        stops = stop_strings(AutoTokenizer.from_pretrained(merged))
        write_modelfile(staging, gguf_file.name, stops)
        write_export_card(
            staging, gguf_file=gguf_file, args=asdict(args), method=method_of(args.adapter_path),
            llama_cpp=version, check=check, stops=stops, data=args.eval_data or "the run's held-out split",
        )  # fmt: skip
        if not args.keep_merged:
            shutil.rmtree(merged)
        _into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(_summary(check, out / gguf_file.name), flush=True)
    return _finish(args, out, check)


def _into_place(staging: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for entry in staging.iterdir():  # each replaces its namesake of an overwritten folder
        target = out / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        entry.replace(target)


def _finish(args: ExportArguments, out: Path, check: dict) -> Path:
    if not check["passed"]:
        raise ExportError(f"the export did not pass its check (see {out / 'README.md'}); the files are kept")
    if args.push_to_hub:
        url = push_folder(
            str(out), args.hub_model_id, private=args.hub_private_repo, extra_patterns=["*.gguf", "Modelfile"]
        )
        logger.info("pushed to %s", url)
    return out


def _export_lora(args, out: Path, root: Path, version: str, base_path: str, template: str, dataset, quantize) -> Path:
    """`--lora_only`: the base as GGUF `args.gguf` and the adapter as a GGUF LoRA, each checked; no merge."""

    adapter = Path(os.path.expanduser(args.adapter_path))
    lora_settings(adapter)  # refuses what llama.cpp's LoRA runtime does not apply, before anything is written
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        base_file = staging / f"{out.name}-base-{args.gguf}.gguf"
        _convert(root, Path(base_path), base_file, args.gguf, quantize)
        if gguf_metadata(base_file, "tokenizer.chat_template") != template:
            raise ExportError(
                "the run's chat template is not the base's, and a GGUF LoRA carries none: llama.cpp would format "
                "chats with the base's; export the merged model (without `--lora_only`)"
            )
        lora_file = staging / lora_file_name(out)
        convert_lora(root, adapter, base_path, lora_file)
        lora = check_lora_gguf(lora_file, adapter)
        base = compare_export(Path(base_path), base_file, dataset, args.max_new_tokens, args.check_prompts)
        check = {"gguf_type": args.gguf, "max_perplexity_increase": args.max_increase, "lora": lora, "base": base}
        check["passed"] = bool(
            lora["passed"]
            and base["perplexity_increase"] <= args.max_increase
            and base["template_renders_same"]
            and base["tokenizer_encodes_same"]
        )
        (staging / CHECK_FILE).write_text(json.dumps(check, indent=2, ensure_ascii=False))
        write_lora_card(staging, base_file=base_file, lora_file=lora_file, args=asdict(args), llama_cpp=version,
                        check=check)  # fmt: skip
        _into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(
        f"{out / lora_file.name} (LoRA, {lora['pairs']} pairs, alpha {lora['alpha']:g}) on {out / base_file.name} "
        f"(base {args.gguf}: perplexity {base['perplexity_increase']:+.2%} over the base model): "
        f"{'passed' if check['passed'] else 'FAILED'}",
        flush=True,
    )
    return _finish(args, out, check)


def _summary(check: dict, gguf_file: Path) -> str:
    return (
        f"{gguf_file} ({gguf_file.stat().st_size / 2**20:.1f} MiB, {check['gguf_type']}): held-out perplexity "
        f"{check['perplexity_gguf']:.4f} vs merged {check['perplexity_merged']:.4f} ({check['perplexity_increase']:+.2%}, "
        f"limit {check['max_perplexity_increase']:+.0%}); greedy {check['greedy_identical']}/{check['greedy_prompts']} "
        f"identical, agreement {check['greedy_agreement']:.2f}; template {'same' if check['template_renders_same'] else 'DIFFERENT'}"
        f": {'passed' if check['passed'] else 'FAILED'}"
    )
