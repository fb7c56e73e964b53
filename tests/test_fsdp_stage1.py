"""Stage 1 through a sharding engine: the reference snapshot saved from a sharded model (2 CPU processes, gloo) is the
whole adapter, loads back into the shards, and scoring through the wrapper gives the perplexities (and so the split)
of one process on the bare model, with the same number of forwards on both processes although the batches do not
divide evenly. FSDP1 as `fsdp_qlora.yaml` runs it (4-bit base, storage in the compute dtype), FSDP2, and DeepSpeed
ZeRO-3 (every parameter a 0-size shard) where DeepSpeed is installed (it is not a dependency of the project).

accelerate builds FSDP and DeepSpeed engines only on accelerators, so the worker wraps the model itself, the way
accelerate does on GPUs (as `tests/test_fsdp.py` does for stage 2), and runs the code `compute_confidence` runs on it:
the snapshot callback, `load_adapter_state` and `score_perplexities`.

Run as a worker: torchrun --nproc_per_node 2 tests/test_fsdp_stage1.py MODEL OUT_DIR fsdp|zero3
"""

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

VARIANTS = ("fsdp1_qlora", "fsdp2")
WRAPPERS = {"fsdp1_qlora": "FullyShardedDataParallel", "fsdp2": "FSDPPeftModel", "zero3": "DeepSpeedEngine"}
BATCH_SIZE = 2


def prepared_dataset():
    """13 rows of varied lengths: an odd number of length-grouped batches (asserted), so the shards differ."""
    from datasets import Dataset

    rng = np.random.default_rng(0)
    input_ids, labels = [], []
    for length in (30, 28, 25, 22, 20, 17, 15, 12, 10, 8, 6, 31, 5):
        ids = rng.integers(3, 300, size=length).tolist()
        prompt = int(rng.integers(1, length - 2))
        input_ids.append(ids)
        labels.append([-100] * prompt + ids[prompt:])
    return Dataset.from_dict({"input_ids": input_ids, "labels": labels})


def base_model(model_path: str, variant: str):
    from transformers import AutoModelForCausalLM

    from sftmix_trl.configs import ModelArguments
    from sftmix_trl.model import load_model

    if variant == "fsdp1_qlora":  # FSDP flattens the 4-bit weights: storage in the compute dtype (float32 on CPU)
        args = ModelArguments(model_name_or_path=model_path, load_in_4bit=True, bnb_4bit_quant_storage="float32")
        return load_model(args)
    return AutoModelForCausalLM.from_pretrained(model_path)


def wrap(model, variant: str):
    """The model as the engine holds it: FSDP1 / FSDP2 applied as accelerate does, or a DeepSpeed ZeRO-3 engine."""
    import torch

    if variant.startswith("fsdp1"):
        from peft.utils.other import fsdp_auto_wrap_policy
        from torch.distributed.fsdp import FullyShardedDataParallel

        policy = fsdp_auto_wrap_policy(model)
        return FullyShardedDataParallel(
            model, auto_wrap_policy=policy, use_orig_params=False, device_id=torch.device("cpu")
        )
    if variant == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.get_base_model().model.layers:
            fully_shard(layer)
        return fully_shard(model)
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True}
    config["zero_optimization"] = {"stage": 3, "stage3_param_persistence_threshold": 0}  # shard even the adapter
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    return deepspeed.initialize(model=model, optimizer=optimizer, config=config)[0]


@contextmanager
def count_unsharded(record: list, gathered: list):
    """Appends (module, parameter names in it, bytes) to `record` for every FSDP1 flat parameter unsharded inside the
    block, and the bytes of every FSDP2 `DTensor` made whole to `gathered`: what a gather materialises on this
    process beyond its shards."""
    from torch.distributed.fsdp._flat_param import FlatParamHandle
    from torch.distributed.tensor import DTensor, Replicate

    unshard, redistribute = FlatParamHandle.unshard, DTensor.redistribute

    def counting_unshard(self):
        flat = self.flat_param
        record.append(
            (self._fully_sharded_module, flat._fqns, flat._unpadded_unsharded_size.numel() * flat.element_size())
        )
        return unshard(self)

    def counting_redistribute(self, device_mesh=None, placements=None, **kwargs):
        if placements is not None and all(isinstance(p, Replicate) for p in placements):
            gathered.append(self.numel() * self.element_size())
        return redistribute(self, device_mesh, placements, **kwargs)

    FlatParamHandle.unshard, DTensor.redistribute = counting_unshard, counting_redistribute
    try:
        yield record
    finally:
        FlatParamHandle.unshard, DTensor.redistribute = unshard, redistribute


def worker(model_path: str, out_dir: str, variants: str) -> None:
    from types import SimpleNamespace

    import torch
    from accelerate import PartialState
    from peft import LoraConfig, get_peft_model

    from sftmix_trl.confidence.reference import _SnapshotCallback
    from sftmix_trl.confidence.snapshots import load_snapshot
    from sftmix_trl.perplexity import length_grouped_batches, score_perplexities
    from sftmix_trl.sharded import gather_adapter_state, load_adapter_state

    state = PartialState(cpu=True)
    if variants == "zero3":  # what accelerate sets up under ZeRO-3: TRL's head gathering reads it
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})  # noqa: F841
    dataset = prepared_dataset()
    num_batches = len(length_grouped_batches([len(i) for i in dataset["input_ids"]], BATCH_SIZE))
    for variant in VARIANTS if variants == "fsdp" else ("zero3",):
        torch.manual_seed(0)
        model = get_peft_model(
            base_model(model_path, variant),
            LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0),
        )
        for name, param in model.named_parameters():
            if "lora_" in name:  # a trained-looking adapter: non-zero B, so that it changes the perplexities
                torch.nn.init.normal_(param, std=0.05)
        bare = {k: v.detach().clone() for k, v in gather_adapter_state(model).items()}
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        wrapped = wrap(model, variant)
        forwards = []
        wrapped.register_forward_pre_hook(lambda module, args, calls=forwards: calls.append(1))

        # The snapshot, saved by the callback the reference trainer runs, through the wrapper
        directory = Path(out_dir, variant, "snapshots")
        callback = _SnapshotCallback(directory, 1)
        callback.steps, callback.trainer = [1], SimpleNamespace(model_wrapped=wrapped)
        world = SimpleNamespace(global_step=1, is_world_process_zero=state.is_main_process)
        unsharded, gathered = [], []
        with count_unsharded(unsharded, gathered):
            callback.on_step_end(None, world, None)
        state.wait_for_everyone()
        weights = load_snapshot(directory / "step-1")
        snapshot_vs_bare = max(
            (weights[k.replace(".default", "")].float() - v.float()).abs().max().item() for k, v in bare.items()
        )

        # Scoring: the adapter zeroed first (the base's perplexities), then the snapshot loaded back into the shards
        load_adapter_state(wrapped, {k: torch.zeros_like(v) for k, v in weights.items()})
        zeroed, _, _ = score_perplexities(wrapped, dataset, BATCH_SIZE, pad_token_id=0)
        with count_unsharded(unsharded, gathered):
            load_adapter_state(wrapped, weights)
            reloaded = gather_adapter_state(wrapped)
        forwards.clear()
        perplexities, counts, _ = score_perplexities(wrapped, dataset, BATCH_SIZE, pad_token_id=0)
        prefixes = {
            id(m): n.replace("_fsdp_wrapped_module.", "").removesuffix("._fsdp_wrapped_module")
            for n, m in wrapped.named_modules()
        }
        result = {
            "wrapper": type(wrapped).__name__,
            "num_tensors": len(weights),
            "num_adapter_parameters": len(bare),
            "snapshot_vs_bare": snapshot_vs_bare,
            "reload_vs_bare": max((reloaded[k].float() - v.float()).abs().max().item() for k, v in bare.items()),
            "perplexities": perplexities.tolist(),
            "zeroed": zeroed.tolist(),
            "counts": counts.tolist(),
            "forwards": len(forwards),
            # What saving, loading and reading the snapshot back unsharded (FSDP1) or made whole (FSDP2)
            "unsharded_names": sorted({f"{prefixes[id(m)]}.{name}" for m, names, _ in unsharded for name in names}),
            "unsharded_bytes": sum(size for _, _, size in unsharded),
            "gathered_bytes": sum(gathered),
            "adapter_bytes": sum(v.numel() * v.element_size() for v in bare.values()),
            "model_bytes": model_bytes,
            "num_batches": num_batches,
        }
        Path(out_dir, variant, f"rank{state.process_index}.json").write_text(json.dumps(result))
        del wrapped, model
        state.wait_for_everyone()


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_stage1_through_a_sharding_engine_equals_one_process(tiny_model, tmp_path, engine):
    import torch
    from peft import PeftModel

    from sftmix_trl.confidence import split_confidence
    from sftmix_trl.perplexity import score_perplexities

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    if engine == "zero3":  # not a dependency of the project; the GPU check runs it under accelerate too
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    command += [__file__, str(tiny_model), str(tmp_path), engine]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]

    dataset = prepared_dataset()
    ids = [f"row{i}" for i in range(len(dataset))]
    for variant in VARIANTS if engine == "fsdp" else ("zero3",):
        ranks = [json.loads((tmp_path / variant / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert ranks[0]["wrapper"] == WRAPPERS[variant]
        assert ranks[0]["num_batches"] % 2 == 1  # uneven shards: one process scores a dummy batch
        assert ranks[0]["forwards"] == ranks[1]["forwards"] == (ranks[0]["num_batches"] + 1) // 2
        # The snapshot is the whole adapter, equal to the bare model's, and loads back into the shards
        assert ranks[0]["num_tensors"] == ranks[0]["num_adapter_parameters"] > 0
        assert ranks[0]["snapshot_vs_bare"] == 0 and ranks[0]["reload_vs_bare"] == 0
        if variant.startswith("fsdp1"):  # only the adapter was unsharded: no base weight, three passes of the adapter
            for found in ranks:
                assert found["unsharded_names"] and all("lora_" in n for n in found["unsharded_names"])
                assert found["unsharded_bytes"] == 3 * found["adapter_bytes"] < found["model_bytes"]
        if variant == "fsdp2":  # only the adapter made whole, by saving and reading back (loading gathers nothing)
            for found in ranks:
                assert found["gathered_bytes"] == 2 * found["adapter_bytes"] < found["model_bytes"]

        # One process on the bare model with the same snapshot: the same table
        with torch.no_grad():
            base = base_model(str(tiny_model), variant)
            base_ppl, _, _ = score_perplexities(base, dataset, BATCH_SIZE, pad_token_id=0)
            peft = PeftModel.from_pretrained(base, tmp_path / variant / "snapshots" / "step-1")
            one, counts, _ = score_perplexities(peft, dataset, BATCH_SIZE, pad_token_id=0)
        for found in ranks:
            assert found["counts"] == counts.tolist()
            np.testing.assert_allclose(found["perplexities"], one, rtol=1e-5)
            np.testing.assert_allclose(found["zeroed"], base_ppl, rtol=1e-5)
            assert np.abs(np.asarray(found["perplexities"]) / base_ppl - 1).max() > 1e-3  # the adapter mattered
            assert split_confidence(ids, -np.asarray(found["perplexities"])) == split_confidence(ids, -one)


def test_scoring_goes_through_a_sharding_wrapper_prepared_once_and_not_through_ddp():
    from types import SimpleNamespace

    import torch

    from sftmix_trl.confidence.reference import _scoring_model

    bare, sharded = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    prepared = []
    accelerator = SimpleNamespace(_models=[], prepare=lambda model: prepared.append(model) or sharded)
    trainer = SimpleNamespace(
        model=bare, model_wrapped=bare, is_fsdp_enabled=True, is_deepspeed_enabled=False, accelerator=accelerator
    )
    assert _scoring_model(trainer) is sharded and prepared == [bare]  # no training ran: wrapped as evaluate does
    assert trainer.model is trainer.model_wrapped is sharded
    accelerator._models.append(sharded)  # after training, FSDP's trainer.model is the wrapper: not wrapped again
    assert _scoring_model(trainer) is sharded and prepared == [bare]
    ddp = SimpleNamespace(model=bare, model_wrapped=torch.nn.DataParallel(bare), is_fsdp_enabled=False)
    ddp.is_deepspeed_enabled, ddp.accelerator = False, SimpleNamespace(_models=[ddp.model_wrapped])
    assert _scoring_model(ddp) is bare  # DDP and DataParallel only synchronise gradients


def test_an_empty_snapshot_is_refused(tmp_path):
    import torch
    from safetensors.torch import save_file

    from sftmix_trl.confidence import ConfidenceError
    from sftmix_trl.confidence.snapshots import load_snapshot

    for name, tensors in (("empty", {}), ("unsharded", {"a.lora_A.weight": torch.zeros(0)})):
        folder = tmp_path / "confidence" / "snapshots" / name
        folder.mkdir(parents=True)
        save_file(tensors, folder / "adapter_model.safetensors")
        with pytest.raises(ConfidenceError, match="empty or holds 0-size tensors; delete .*confidence and recompute"):
            load_snapshot(folder)


if __name__ == "__main__":
    worker(*sys.argv[1:4])
