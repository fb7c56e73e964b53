"""The LoRA adapter's weights, read whole and written back, whatever engine holds the model.

Stage 1 saves the reference adapter at its snapshots and loads each snapshot back for scoring. A sharding engine
keeps only a slice of each parameter on a process (FSDP1 flattens them into `FlatParameter`s, FSDP2 turns them into
`DTensor`s, DeepSpeed ZeRO-3 leaves 0-size placeholders), so `save_pretrained` on the inner model writes empty
tensors, and `set_peft_model_state_dict` cannot load into a placeholder. The functions here gather the adapter's
parameters first, on every process (they are collectives: every process must call them, in the same order), and are
plain copies for a model on one process or under DDP.

`model` is the outermost model a trainer trains (`trainer.model_wrapped`): a DDP, FSDP1 or DeepSpeed wrapper, an
FSDP2 module, or the bare `PeftModel`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import torch
from accelerate.utils import extract_model_from_parallel
from torch.distributed.tensor import DTensor, distribute_tensor
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


@contextmanager
def _adapter_parameters(model: torch.nn.Module, modify: bool) -> Iterator[dict[str, torch.Tensor]]:
    """{name: parameter} of the active adapter, full-size inside the block (FSDP2's stay `DTensor`s); with `modify`,
    what is written into them reaches every process's shard on exit. A collective."""
    inner = _peft_model(model)
    adapter = inner.active_adapter
    checkpoint_key = type(inner.base_model)._remove_adapter_name_from_key  # PEFT's own model key -> file key map

    def adapter_named_parameters() -> dict[str, torch.Tensor]:
        named = ((_clean(n), p) for n, p in inner.named_parameters())
        return {n: p for n, p in named if checkpoint_key(n, adapter) != n}  # adapter weights carry its name

    if any(isinstance(m, torch.distributed.fsdp.FullyShardedDataParallel) for m in model.modules()):
        with _fsdp1_adapter_units(model, lambda name: checkpoint_key(name, adapter) != name, modify) as params:
            yield params
        return
    params = adapter_named_parameters()
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

    `summon_full_params(model)` unshards every unit, the whole base included; here each unit's flat parameter says
    which original parameters it holds (`_fqns`), and only units holding an adapter weight are summoned, one level
    deep (`recurse=False`). PEFT's FSDP wrap policy (`peft.utils.other.fsdp_auto_wrap_policy`, which transformers and
    accelerate use for a PEFT model) gives every LoRA matrix its own unit, so no base weight is unsharded; under a
    policy that puts LoRA and base weights in one unit, that unit's base weights are unsharded too (the adapter cannot
    be read otherwise). On a GPU, read-only blocks keep the gathered copies on the CPU. A collective, same order everywhere."""
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


def gather_adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU copies of the active adapter's parameters, keyed like `PeftModel.state_dict()`, on every process."""
    state = {}
    with _adapter_parameters(model, modify=False) as params:
        for name in sorted(params):  # one order on every process: FSDP2's `full_tensor` is a collective
            param = params[name]
            full = param.full_tensor() if isinstance(param, DTensor) else param
            state[name] = full.detach().to("cpu", copy=True)
    return state


def load_adapter_state(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Write an adapter checkpoint (keys as in `adapter_model.safetensors`) into the model's parameters, whatever
    shards them. Every adapter parameter must be in `weights` and every tensor of `weights` must be used."""
    with _adapter_parameters(model, modify=True) as params:
        inner = _peft_model(model)
        checkpoint_key = type(inner.base_model)._remove_adapter_name_from_key
        keys = {name: checkpoint_key(name, inner.active_adapter) for name in params}
        missing = sorted(k for k in keys.values() if k not in weights)
        unused = sorted(set(weights) - set(keys.values()))
        if missing or unused:
            raise ValueError(
                f"the adapter checkpoint does not fit the model: missing {missing[:3]}, unused {unused[:3]}"
            )
        for name in sorted(params):
            param, value = params[name], weights[keys[name]]
            if isinstance(param, DTensor):  # every process holds the whole value: each keeps its own shard
                value = distribute_tensor(
                    value.to(param.device, param.dtype), param.device_mesh, param.placements, src_data_rank=None
                )
                param.copy_(value)
            else:
                if tuple(param.shape) != tuple(value.shape):
                    raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)}, model {tuple(param.shape)}")
                param.data.copy_(value.to(param.device, param.dtype))


def save_adapter_snapshot(model: torch.nn.Module, directory: str | os.PathLike, is_main_process: bool) -> int:
    """Save the active adapter in PEFT's format (`adapter_model.safetensors` + `adapter_config.json`) into
    `directory`, gathered from every process and written by the main one. Call it on every process. Returns the number
    of tensors written (never 0).

    The file is written here rather than by `PeftModel.save_pretrained`, which picks the adapter's entries by module
    names, and FSDP1 puts its wrapper's name into those."""
    from safetensors.torch import save_file

    state = gather_adapter_state(model)
    if not state:
        raise ValueError("the model has no adapter parameters to save")
    if is_main_process:
        inner = _peft_model(model)
        checkpoint_key = type(inner.base_model)._remove_adapter_name_from_key
        tensors = {checkpoint_key(name, inner.active_adapter): value.contiguous() for name, value in state.items()}
        os.makedirs(directory, exist_ok=True)
        inner.peft_config[inner.active_adapter].save_pretrained(directory)
        save_file(tensors, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
    return len(state)


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
