"""The LoRA adapter's weights, read whole and written back, whatever engine holds the model.

Stage 1 saves the reference adapter at its snapshots and loads each snapshot back for scoring; every recipe that
trains saves its final adapter. A sharding engine keeps only a slice of each parameter on a process (FSDP1 flattens
them into `FlatParameter`s, FSDP2 turns them into `DTensor`s, DeepSpeed ZeRO-3 leaves 0-size placeholders), so
`save_pretrained` on the inner model writes empty tensors, transformers' `Trainer.save_model` under FSDP writes
nothing unless the state-dict type is FULL_STATE_DICT (and then gathers the whole base too), and
`set_peft_model_state_dict` cannot load into a placeholder. The functions here gather only the adapter's parameters
(never a base weight), on every process (they are collectives: every process must call them, in the same order), and
are plain copies for a model on one process or under DDP.

How each engine is read, and why:
- FSDP2: `torch.distributed.checkpoint.state_dict` (`get_model_state_dict` with `full_state_dict`, `cpu_offload`
  and `ignore_frozen_params`: only the trainable parameters are gathered, to rank 0's CPU; `set_model_state_dict`
  distributes the full values into each process's shards, no gather).
- FSDP1: each unit's flat parameter lists the parameters it holds, and only the units that hold adapter weights are
  unsharded, one level deep (FSDP internals: `_lazy_init`, `unit._handle`, `flat_param._fqns`). torch's API is not
  used there: under FSDP1, `get_model_state_dict` calls the root's `state_dict()` under FULL_STATE_DICT, which
  unshards every unit, the whole base included, before `ignore_frozen_params` drops the base (measured on
  `tests/test_fsdp_stage1.py`'s 4-bit tiny Llama on 2 processes: all 31 units, 234,752 bytes, for an adapter of
  32,768; on a large base, the whole base on every process), and `set_model_state_dict` loads through every unit the
  same way. Its `cpu_offload` (accelerate's choice) also fails on CPU-resident FSDP1 units.
- DeepSpeed ZeRO-3: `deepspeed.zero.GatheredParameters` on the adapter's parameters (torch's checkpoint API does not
  know DeepSpeed's partitioning).

`model` is the outermost model a trainer trains (`trainer.model_wrapped`): a DDP, FSDP1 or DeepSpeed wrapper, an
FSDP2 module, or the bare `PeftModel`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import torch
from accelerate.utils import extract_model_from_parallel
from torch.distributed.tensor import DTensor
from trl.trainer.utils import maybe_gather_lm_head_ctx

_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def _clean(name: str) -> str:
    """A parameter name as the bare `PeftModel` spells it (FSDP1 and activation checkpointing add wrapper names)."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _peft_model(model: torch.nn.Module):
    inner = extract_model_from_parallel(model)
    if not hasattr(inner, "active_adapter") or not hasattr(inner, "base_model"):
        raise TypeError(f"expected a PEFT model (a LoRA adapter on a base), got {type(inner).__name__}")
    return inner


def _is_adapter_name(inner) -> Callable[[str], bool]:
    """Whether a parameter name (as the bare `PeftModel` spells it) belongs to the active adapter: PEFT's own map
    from model keys to file keys drops the adapter's name, which only adapter weights carry."""
    checkpoint_key, adapter = type(inner.base_model)._remove_adapter_name_from_key, inner.active_adapter
    return lambda name: checkpoint_key(name, adapter) != name


def _is_fsdp1(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.distributed.fsdp.FullyShardedDataParallel) for m in model.modules())


def _is_fsdp2(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.distributed.fsdp.FSDPModule) for m in model.modules())


def _adapter_names(inner) -> list[str]:
    """The active adapter's parameter names, in one order on every process."""
    is_adapter = _is_adapter_name(inner)
    return sorted(n for n in (_clean(n) for n, _ in inner.named_parameters()) if is_adapter(n))


@contextmanager
def _adapter_parameters(model: torch.nn.Module, modify: bool) -> Iterator[dict[str, torch.Tensor]]:
    """{name: parameter} of the active adapter, full-size inside the block, for FSDP1, ZeRO-3 and unsharded models;
    with `modify`, what is written into them reaches every process's shard on exit. A collective."""
    inner = _peft_model(model)
    if _is_fsdp1(model):
        with _fsdp1_adapter_units(model, _is_adapter_name(inner), modify) as params:
            yield params
        return
    names = set(_adapter_names(inner))
    params = {n: p for n, p in ((_clean(n), p) for n, p in inner.named_parameters()) if n in names}
    if any(hasattr(p, "ds_id") for p in params.values()):  # DeepSpeed ZeRO-3: gathered, then partitioned again
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0 if modify else None):
            with torch.no_grad():
                yield params
        return
    with torch.no_grad():
        yield params


@contextmanager
def _fsdp1_adapter_units(
    model: torch.nn.Module, is_adapter: Callable[[str], bool], modify: bool
) -> Iterator[dict[str, torch.Tensor]]:
    """{name: full parameter} of the adapter under FSDP1, unsharding only the FSDP units that own adapter weights.

    `summon_full_params(model)` (and torch's `get_model_state_dict`) unshards every unit, the whole base included;
    here each unit's flat parameter says which original parameters it holds (`_fqns`), and only units holding an
    adapter weight are summoned, one level deep (`recurse=False`). PEFT's FSDP wrap policy
    (`peft.utils.other.fsdp_auto_wrap_policy`, which transformers and accelerate use for a PEFT model) gives every
    LoRA matrix its own unit, so no base weight is unsharded; under a policy that puts LoRA and base weights in one
    unit, that unit's base weights are unsharded too (the adapter cannot be read otherwise). On a GPU, read-only
    blocks keep the gathered copies on the CPU. A collective, same order everywhere."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp._runtime_utils import _lazy_init

    units = [(_clean(n), m) for n, m in model.named_modules() if isinstance(m, FullyShardedDataParallel)]
    root_name, root = units[0]
    _lazy_init(root, root)  # before a nested unit is summoned, or it would take itself for the root
    owned = []  # (unit, {full name: name inside the unit})
    for prefix, unit in units:
        handle = unit._handle
        if handle is None:
            continue
        base = prefix.removeprefix(root_name).lstrip(".")
        names = {".".join(filter(None, (base, _clean(fqn)))): fqn for fqn in handle.flat_param._fqns}
        names = {full: fqn for full, fqn in names.items() if is_adapter(full)}
        if names:
            owned.append((unit, names))
    with ExitStack() as stack:
        for unit, _ in owned:
            # offload_to_cpu frees the gathered storage after copying it: on a CPU-sharded unit that is the copy
            offload = not modify and unit.compute_device.type != "cpu"
            stack.enter_context(
                FullyShardedDataParallel.summon_full_params(
                    unit, recurse=False, writeback=modify, offload_to_cpu=offload
                )
            )
        stack.enter_context(torch.no_grad())
        yield {
            full: unit._fsdp_wrapped_module.get_parameter(fqn) for unit, names in owned for full, fqn in names.items()
        }


def _fsdp2_adapter_state(model: torch.nn.Module, inner, main_only: bool) -> dict[str, torch.Tensor]:
    """The adapter's full values under FSDP2 through torch's checkpoint API: only trainable parameters are gathered
    (the frozen base never is), on rank 0's CPU with `main_only`, else on every process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    names = _adapter_names(inner)
    wanted = set(names)
    frozen = [n for n, p in inner.named_parameters() if _clean(n) in wanted and not p.requires_grad]
    if frozen:  # `ignore_frozen_params` would leave them out
        raise ValueError(f"the adapter has frozen parameters ({frozen[:3]}): cannot gather it without the base")
    options = StateDictOptions(full_state_dict=True, cpu_offload=main_only, ignore_frozen_params=True)
    state = get_model_state_dict(model, options=options)
    if main_only and torch.distributed.get_rank() != 0:
        return {}
    return {name: state[name] for name in names}


def gather_adapter_state(model: torch.nn.Module, main_only: bool = False) -> dict[str, torch.Tensor]:
    """Full CPU copies of the active adapter's parameters, keyed like `PeftModel.state_dict()`, on every process
    (with `main_only`, on the main process only where the engine allows it: others may get an empty dict). Only the
    adapter is gathered. A collective."""
    inner = _peft_model(model)
    if _is_fsdp2(model):
        state = _fsdp2_adapter_state(model, inner, main_only)
        return {name: value.detach().to("cpu", copy=True) for name, value in state.items()}
    state = {}
    with _adapter_parameters(model, modify=False) as params:
        for name in sorted(params):
            state[name] = params[name].detach().to("cpu", copy=True)
    return state


def load_adapter_state(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Write an adapter checkpoint (keys as in `adapter_model.safetensors`) into the model's parameters, whatever
    shards them. Every adapter parameter must be in `weights` and every tensor of `weights` must be used."""
    inner = _peft_model(model)
    checkpoint_key = type(inner.base_model)._remove_adapter_name_from_key

    def checkpoint_keys(names: list[str]) -> dict[str, str]:
        keys = {name: checkpoint_key(name, inner.active_adapter) for name in names}
        missing = sorted(k for k in keys.values() if k not in weights)
        unused = sorted(set(weights) - set(keys.values()))
        if missing or unused:
            raise ValueError(
                f"the adapter checkpoint does not fit the model: missing {missing[:3]}, unused {unused[:3]}"
            )
        return keys

    if _is_fsdp2(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        params = {_clean(n): p for n, p in inner.named_parameters()}
        keys = checkpoint_keys(_adapter_names(inner))
        for name, key in keys.items():
            _check_shape(name, params[name], weights[key])
        # every process holds the whole value and keeps its own shard of it: nothing is gathered (torch loads the
        # base's local shards back onto themselves on the way)
        state = {name: weights[key] for name, key in keys.items()}
        for module in model.modules():  # the root keeps its parameters whole after a forward: loading needs shards
            if isinstance(module, torch.distributed.fsdp.FSDPModule):
                module.reshard()
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    with _adapter_parameters(model, modify=True) as params:  # FSDP1 names its flat parameters only inside the block
        keys = checkpoint_keys(sorted(params))
        for name, key in keys.items():
            param, value = params[name], weights[key]
            _check_shape(name, param, value)
            param.data.copy_(value.to(param.device, param.dtype))


def _check_shape(name: str, param: torch.Tensor, value: torch.Tensor) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)}, model {tuple(param.shape)}")


def save_adapter(model: torch.nn.Module, directory: str | os.PathLike, is_main_process: bool) -> int:
    """Save the active adapter in PEFT's format (`adapter_model.safetensors` + `adapter_config.json`, as
    `PeftModel.save_pretrained` writes them on one process) into `directory`: the adapter alone is gathered to the
    main process's CPU and written there. Call it on every process. Returns the number of tensors written (never 0).

    The files are written here rather than by `PeftModel.save_pretrained(state_dict=...)`, which picks the adapter's
    entries by module names, and FSDP1 puts its wrapper's name into those (it would write an empty file)."""
    from safetensors.torch import save_file

    state = gather_adapter_state(model, main_only=True)
    if not is_main_process:
        return len(state)
    if not state:
        raise ValueError("the model has no adapter parameters to save")
    inner = _peft_model(model)
    adapter = inner.active_adapter
    checkpoint_key = type(inner.base_model)._remove_adapter_name_from_key  # PEFT's own model key -> file key map
    tensors = {checkpoint_key(name, adapter): value.contiguous() for name, value in state.items()}
    config = copy.deepcopy(inner.peft_config[adapter])
    config.inference_mode = True  # as `save_pretrained` records it: loading gives a frozen adapter unless asked
    base_class = type(inner.get_base_model())
    auto_mapping = None  # as `save_pretrained` writes it: with no task type, the base's class to load it into
    if config.task_type is None:
        auto_mapping = {"base_model_class": base_class.__name__, "parent_library": base_class.__module__}
    os.makedirs(directory, exist_ok=True)
    config.save_pretrained(directory, auto_mapping_dict=auto_mapping)
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
    return len(tensors)


def scoring_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module to run an inference forward through: sharding wrappers stay (they gather the parameters), DDP and
    DataParallel go (they only synchronise gradients, and DDP would broadcast buffers at every forward)."""
    if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        return model.module
    return model


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers `*ForCausalLM` inside any wrapper (DDP, FSDP, DeepSpeed) and any `PeftModel`."""
    inner = extract_model_from_parallel(model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


@contextmanager
def lm_head(model: torch.nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """The LM head's (weight (V, D), bias (V,) or None), whole inside the block whatever engine shards them, for a
    projection computed outside the head's own forward (the Mixup loss, the scoring of response positions).

    FSDP2 keeps the head a sharded `DTensor` outside its forward: it is read whole (`full_tensor`, differentiable, as
    TRL's fused head does). DeepSpeed ZeRO-3 leaves a 0-size placeholder: TRL's `maybe_gather_lm_head_ctx` gathers it
    for the block. FSDP1 and plain models: the parameters as they are."""
    head = causal_lm(model).get_output_embeddings()
    weight, bias = head.weight, head.bias
    if isinstance(weight, DTensor):
        weight, bias = weight.full_tensor(), None if bias is None else bias.full_tensor()
    with maybe_gather_lm_head_ctx(weight, bias):
        yield weight, bias
