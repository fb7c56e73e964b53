"""A saved LoRA adapter on its base: the check that it fits (before anything loads or is written), and the base
with the adapter loaded for inference (evaluate, generate, merge's measurement)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from accelerate import PartialState

from sftmix_trl.configs import ModelArguments
from sftmix_trl.errors import AdapterError
from sftmix_trl.model import disable_bnb_cpu_repack, load_model, meta_model

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
)


def adapter_base(adapter_path: str) -> str | None:
    """The base model an adapter folder records (None if it records none)."""
    config = Path(os.path.expanduser(adapter_path)) / "adapter_config.json"
    try:
        return json.loads(config.read_text()).get("base_model_name_or_path") or None
    except (OSError, json.JSONDecodeError):
        return None  # `check_adapter` says what is wrong with the folder


def _adapter_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    for name in ADAPTER_WEIGHTS:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        state = torch.load(path, map_location="meta", weights_only=True)
        return {key: tuple(value.shape) for key, value in state.items()}
    raise AdapterError(f"adapter folder {folder} has no {' or '.join(ADAPTER_WEIGHTS)}: no adapter weights to load")


def _module_dims(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in, out) of a linear-like or embedding module, as LoRA's A and B see them."""
    if isinstance(module, torch.nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.in_features, module.out_features
    if hasattr(module, "nx") and hasattr(module, "nf"):  # GPT-2's Conv1D
        return module.nx, module.nf
    return None


def check_adapter(adapter_path: str, model_args: ModelArguments, trust_remote_code: bool = False) -> dict:
    """Check that a saved adapter fits the base model, without loading either's weights; return its config.

    Reads adapter_config.json and the shapes in the adapter's weights file, and compares them with an empty copy of
    the base: every adapted module must exist in the base with the sizes the adapter was trained on. An adapter made
    for another model fails here, in one line, instead of deep inside PEFT (or, worse, half-way through a run).
    """
    folder = Path(os.path.expanduser(adapter_path))
    if not folder.is_dir():
        raise AdapterError(f"adapter folder not found: {adapter_path}")
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        raise AdapterError(f"{folder} has no {ADAPTER_CONFIG}: not a saved PEFT adapter")
    try:
        adapter_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise AdapterError(f"{config_path}: malformed JSON ({error.msg})") from None
    shapes = _adapter_shapes(folder)
    base_config, skeleton = meta_model(model_args, trust_remote_code)
    trained_on = adapter_config.get("base_model_name_or_path") or "an unrecorded base"
    where = f"adapter {adapter_path} (trained on {trained_on}) does not match the base {model_args.model_name_or_path}"
    base_type = getattr(base_config, "model_type", None)

    # The base the adapter recorded, where it is a local folder: a different architecture is the clearest message
    recorded = Path(os.path.expanduser(str(adapter_config.get("base_model_name_or_path") or ""))) / "config.json"
    if recorded.is_file():
        try:
            recorded_config = json.loads(recorded.read_text())
        except json.JSONDecodeError:
            recorded_config = {}
        for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
            theirs, ours = recorded_config.get(key), getattr(base_config, key, None)
            if theirs is not None and ours is not None and theirs != ours:
                raise AdapterError(f"{where}: {key} is {theirs} in the adapter's base but {ours} in this base")

    modules = dict(skeleton.named_modules())
    targets = adapter_config.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        if not any(re.fullmatch(targets, name) for name in modules):
            raise AdapterError(
                f"{where}: its target_modules pattern {targets!r} matches no module of the {base_type} base"
            )
    elif isinstance(targets, list):
        leaves = {name.rsplit(".", 1)[-1] for name in modules} | set(modules)
        missing = sorted(t for t in targets if t not in leaves)
        if missing:
            raise AdapterError(
                f"{where}: target module(s) {missing} do not exist in the {base_type} base "
                f"(it has e.g. {sorted(n for n in leaves if n and '.' not in n and not n.isdigit())[:8]})"
            )

    problems = []
    adapted = 0
    for key, shape in sorted(shapes.items()):
        match = _LORA_KEY.match(key)
        if not match:
            continue
        adapted += 1
        name, kind = match.group("module"), match.group("kind")
        module = modules.get(name)
        if module is None:
            problems.append(f"module {name} does not exist in the base")
            continue
        dims = _module_dims(module)
        if dims is None or len(shape) != 2:
            continue
        # A is (r, in) [embedding: (r, vocabulary)], B is (out, r) [embedding: (dim, r)]
        expected, found = (dims[0], shape[1]) if kind.endswith("A") else (dims[1], shape[0])
        if found != expected:
            side = "input" if kind.endswith("A") else "output"
            problems.append(f"{key} has {side} size {found} but {name} has {expected}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        hidden = getattr(base_config, "hidden_size", "?")
        raise AdapterError(f"{where} (hidden size {hidden}): " + "; ".join(problems[:3]) + more)
    if not adapted:
        raise AdapterError(
            f"{folder}: no LoRA weights found in the adapter file; only LoRA adapters are checked and loaded"
        )
    return adapter_config


def load_with_adapter(
    model_args: ModelArguments, adapter_path: str | None = None, trust_remote_code: bool = False
) -> torch.nn.Module:
    """The base (4-bit or 16/32-bit, through `load_model`), with the adapter on top if given, in eval mode."""
    model = load_model(model_args, trust_remote_code)
    if model_args.load_in_4bit is False and model_args.load_in_8bit is False:
        model.to(PartialState().device)
    if adapter_path:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, os.path.expanduser(adapter_path), is_trainable=False)
        disable_bnb_cpu_repack(model)  # PEFT wraps the 4-bit layers: keep the repack off on every one
    model.eval()
    return model
