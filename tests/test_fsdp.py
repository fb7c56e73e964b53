"""The Mixup loss through FSDP: `SFTMixTrainer.compute_loss` on an FSDP-wrapped model (2 CPU processes, gloo) gives
the loss and the update of the bare model, for FSDP1 (the shipped `fsdp_qlora.yaml`, with a 4-bit base too) and FSDP2;
and the trainer's final save (`save_model`, as `after_training.save.train_save_publish` calls it) under the shipped
SHARDED_STATE_DICT writes the adapter that one process writes after the same step; so does a checkpoint written during
training (transformers' `_save_checkpoint`, beside its FSDP files), and resuming from that checkpoint restores it.

accelerate builds FSDP only on accelerators (on a CPU it falls back to DDP), so the worker wraps the model with
torch's FSDP itself, the way accelerate and transformers do on GPUs (PEFT's auto-wrap policy, `use_orig_params=False`
for FSDP1; `fully_shard` per decoder layer and at the root for FSDP2), and hands the wrapped model to the trainer's
`compute_loss`, the code that captures the hidden states and reads the LM head outside its forward.

Run as a worker: torchrun --nproc_per_node 2 tests/test_fsdp.py MODEL VARIANT OUT_DIR
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

VARIANTS = ("fsdp1", "fsdp1_qlora", "fsdp2")


def worker(model_path: str, variant: str, out_dir: str) -> None:
    import copy
    from types import SimpleNamespace

    import numpy as np
    import torch
    from accelerate import PartialState
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftmix_trl.confidence import ConfidenceTable
    from sftmix_trl.configs import ModelArguments
    from sftmix_trl.model import load_model
    from sftmix_trl.sftmix.config import SFTMixConfig
    from sftmix_trl.sftmix.trainer import SFTMixTrainer

    state = PartialState(cpu=True)  # the gloo group the trainer's accelerator and FSDP share
    torch.manual_seed(0)
    rows = [
        {
            "prompt": [{"role": "user", "content": f"question {i} " * (1 + i % 3)}],
            "completion": [{"role": "assistant", "content": f"answer {i} is " * (2 + i % 4)}],
            "example_id": f"id{i}",
        }
        for i in range(8)
    ]
    table = ConfidenceTable([r["example_id"] for r in rows], np.arange(1.0, 9.0).reshape(8, 1), np.ones(8))
    if variant == "fsdp1_qlora":  # FSDP flattens the 4-bit weights: storage in the compute dtype (float32 on CPU)
        base = load_model(
            ModelArguments(model_name_or_path=model_path, load_in_4bit=True, bnb_4bit_quant_storage="float32")
        )
    else:
        base = AutoModelForCausalLM.from_pretrained(model_path)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # non-zero B, so that lora_A gets a gradient too
            torch.nn.init.normal_(param, std=0.02)
    args = SFTMixConfig(
        output_dir=os.path.join(out_dir, "trainer"),
        report_to="none",
        per_device_train_batch_size=4,
        mixup_weight=0.5,
        max_length=128,
        use_cpu=True,
    )
    trainer = SFTMixTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        confidence=table,
        processing_class=AutoTokenizer.from_pretrained(model_path),
    )
    trainer.model.train()
    data = trainer._remove_unused_columns(trainer.train_dataset)
    batch = trainer.data_collator([data[i] for i in (0, 4, 1, 5)])  # the same 2 pairs on both ranks
    bare = copy.deepcopy(trainer.model)

    def loss_and_backward(wrapped):
        loss = trainer.compute_loss(wrapped, dict(batch))
        loss.backward()
        return loss.item()

    # One SGD step of size 1 (new = old - grad) on the bare model: the reference update
    bare_loss = loss_and_backward(bare)
    with torch.no_grad():
        expected = {n: (p - p.grad).clone() for n, p in bare.named_parameters() if p.requires_grad}

    if variant.startswith("fsdp1"):
        from peft.utils.other import fsdp_auto_wrap_policy
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = FullyShardedDataParallel(
            trainer.model,
            auto_wrap_policy=fsdp_auto_wrap_policy(trainer.model),
            use_orig_params=False,
            device_id=torch.device("cpu"),
        )
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in trainer.model.get_base_model().model.layers:
            fully_shard(layer)
        wrapped = fully_shard(trainer.model)
    loss = loss_and_backward(wrapped)
    with torch.no_grad():  # the same step on the shards (gradients are averaged over ranks), then read whole
        if variant.startswith("fsdp1"):
            for flat in wrapped.parameters():
                if flat.grad is not None:
                    flat -= flat.grad
            with FullyShardedDataParallel.summon_full_params(wrapped):
                updated = {n.replace("_fsdp_wrapped_module.", ""): p.clone() for n, p in wrapped.named_parameters()}
        else:
            updated = {}
            for name, param in wrapped.named_parameters():
                if param.requires_grad:
                    param -= param.grad
                    updated[name] = param.full_tensor().clone()
    missing = sorted(set(expected) - set(updated))
    initial = dict(bare.named_parameters())
    result = {
        "wrapper": type(wrapped).__name__,
        "loss": loss,
        "bare_loss": bare_loss,
        "missing": missing,
        "max_difference": max((updated[n] - expected[n]).abs().max().item() for n in expected if n in updated),
        "max_update": max((expected[n] - initial[n]).abs().max().item() for n in expected),
        "trainable": len(expected),
    }
    # The final save as the recipes make it, under an FSDP plugin with the shipped SHARDED_STATE_DICT (accelerate on a
    # CPU builds no FSDP plugin: the trainer is told what it would be told on GPUs), against one process's save
    from torch.distributed.fsdp import StateDictType

    trainer.is_fsdp_enabled = True
    trainer.accelerator.state.fsdp_plugin = SimpleNamespace(state_dict_type=StateDictType.SHARDED_STATE_DICT)
    trainer.model_wrapped = wrapped
    if variant.startswith("fsdp1"):  # as transformers leaves them after training under FSDP1
        trainer.model = wrapped
    trainer.save_model(os.path.join(out_dir, "final"))
    if state.is_main_process:
        with torch.no_grad():
            for name, param in bare.named_parameters():
                if name in expected:
                    param.copy_(expected[name])
        bare.save_pretrained(os.path.join(out_dir, "one_process"))
    state.wait_for_everyone()

    # A checkpoint as a `save_strategy: steps` run writes it (transformers' `_save_checkpoint`, under accelerate's own
    # plugin with the shipped SHARDED_STATE_DICT), then resumed from as `train(resume_from_checkpoint=...)` does under
    # FSDP, into an adapter moved away from the saved values
    from accelerate.utils import FullyShardedDataParallelPlugin

    from sftmix_trl.sharded import gather_adapter_state

    trainer.accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=1 if variant.startswith("fsdp1") else 2, state_dict_type="SHARDED_STATE_DICT"
    )
    trainer.optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.0)
    trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda step: 1.0)
    trainer.state.global_step = 1
    trainer._save_checkpoint(wrapped, trial=None)
    with torch.no_grad():
        for param in wrapped.parameters():
            if param.requires_grad:
                param.zero_()
    checkpoint = os.path.join(args.output_dir, "checkpoint-1")
    trainer._load_from_checkpoint(checkpoint, wrapped)
    trainer._load_optimizer_and_scheduler(checkpoint)
    resumed = gather_adapter_state(wrapped)
    if state.is_main_process:
        from safetensors.torch import save_file

        key = type(bare.base_model)._remove_adapter_name_from_key
        save_file({key(n, "default"): v for n, v in resumed.items()}, os.path.join(out_dir, "resumed.safetensors"))
    # A checkpoint without the adapter file (written before the trainer wrote one): refused under FSDP1, whose
    # sharded files hold no adapter, rather than resumed from the initial adapter
    import shutil

    from sftmix_trl.errors import SFTMixError

    old = os.path.join(args.output_dir, "checkpoint-old")
    if state.is_main_process:
        shutil.copytree(checkpoint, old, ignore=shutil.ignore_patterns("adapter_model.safetensors"))
    state.wait_for_everyone()
    try:
        trainer._load_from_checkpoint(old, wrapped)
        result["old_checkpoint"] = "resumed"
    except SFTMixError as error:
        result["old_checkpoint"] = str(error)
    state.wait_for_everyone()

    Path(out_dir, f"rank{state.process_index}.json").write_text(json.dumps(result))


@pytest.fixture(scope="module", params=VARIANTS)
def fsdp_run(request, tiny_model, tmp_path_factory):
    """(variant, output folder) of one worker run on 2 processes, shared by the tests of that variant."""
    variant = request.param
    out = tmp_path_factory.mktemp(variant)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [__file__, str(tiny_model), variant, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]
    return variant, out


@pytest.mark.slow
def test_mixup_loss_through_fsdp_equals_the_bare_model(fsdp_run):
    variant, out = fsdp_run
    for rank in (0, 1):
        found = json.loads((out / f"rank{rank}.json").read_text())
        assert found["wrapper"] == ("FullyShardedDataParallel" if variant.startswith("fsdp1") else "FSDPPeftModel")
        assert found["missing"] == [] and found["trainable"] > 0
        assert found["loss"] == pytest.approx(found["bare_loss"], rel=1e-5)
        assert found["max_update"] > 1e-3  # the step moved the adapter, so the comparison below means something
        assert found["max_difference"] < 1e-5


@pytest.mark.slow
def test_final_save_under_fsdp_writes_the_one_process_adapter(fsdp_run):
    import torch
    from safetensors.torch import load_file

    _, out = fsdp_run
    final, one = out / "final", out / "one_process"
    assert (final / "adapter_model.safetensors").is_file(), f"no adapter saved: {sorted(os.listdir(final))}"
    found, expected = load_file(final / "adapter_model.safetensors"), load_file(one / "adapter_model.safetensors")
    assert sorted(found) == sorted(expected) and len(found) > 0
    for key, value in expected.items():
        assert found[key].dtype == value.dtype and found[key].shape == value.shape
        torch.testing.assert_close(found[key], value, rtol=0, atol=1e-5)
    assert json.loads((final / "adapter_config.json").read_text()) == json.loads(
        (one / "adapter_config.json").read_text()
    )


@pytest.mark.slow
def test_checkpoints_under_fsdp_hold_the_adapter_and_resume_from_it(fsdp_run, tiny_model):
    """A checkpoint written during training holds the adapter in PEFT's format (what `evaluate`, `merge`, `generate`
    and a checkpoint push read) beside transformers' FSDP files, and resuming from it restores that adapter."""
    from safetensors.torch import load_file

    from sftmix_trl.adapter import check_adapter
    from sftmix_trl.configs import ModelArguments

    variant, out = fsdp_run
    checkpoint, one = out / "trainer" / "checkpoint-1", out / "one_process"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir() and (checkpoint / "optimizer_0").is_dir()
    assert (checkpoint / "adapter_model.safetensors").is_file(), f"no adapter: {sorted(os.listdir(checkpoint))}"
    assert (checkpoint / "tokenizer_config.json").is_file()
    assert json.loads((checkpoint / "adapter_config.json").read_text()) == json.loads(
        (one / "adapter_config.json").read_text()
    )
    check_adapter(str(checkpoint), ModelArguments(model_name_or_path=str(tiny_model)))
    expected = load_file(one / "adapter_model.safetensors")
    for saved in (checkpoint / "adapter_model.safetensors", out / "resumed.safetensors"):
        found = load_file(saved)
        assert sorted(found) == sorted(expected) and len(found) > 0, saved
        for key, value in expected.items():
            assert found[key].dtype == value.dtype and found[key].shape == value.shape, f"{saved.name}: {key}"
            assert (found[key] - value).abs().max().item() < 1e-5, f"{saved.name}: {key}"
    for rank in (0, 1):  # a checkpoint without the adapter file: FSDP1's sharded files cannot restore the adapter
        old = json.loads((out / f"rank{rank}.json").read_text())["old_checkpoint"]
        if variant.startswith("fsdp1"):
            assert "holds no adapter_model.safetensors: under FSDP1" in old
        else:
            assert old == "resumed"


if __name__ == "__main__":
    worker(*sys.argv[1:4])
