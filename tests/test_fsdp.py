"""The Mixup loss through FSDP: `SFTMixTrainer.compute_loss` on an FSDP-wrapped model (2 CPU processes, gloo) gives
the loss and the update of the bare model, for FSDP1 (the shipped `fsdp_qlora.yaml`, with a 4-bit base too) and FSDP2.

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

    import numpy as np
    import torch
    from accelerate import PartialState
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftmix_trl.confidence import ConfidenceTable
    from sftmix_trl.configs import ModelArguments
    from sftmix_trl.model import load_model
    from sftmix_trl.sftmix_config import SFTMixConfig
    from sftmix_trl.sftmix_trainer import SFTMixTrainer

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
    Path(out_dir, f"rank{state.process_index}.json").write_text(json.dumps(result))


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_mixup_loss_through_fsdp_equals_the_bare_model(tiny_model, tmp_path, variant):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [__file__, str(tiny_model), variant, str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]
    for rank in (0, 1):
        found = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert found["wrapper"] == ("FullyShardedDataParallel" if variant.startswith("fsdp1") else "FSDPPeftModel")
        assert found["missing"] == [] and found["trainable"] > 0
        assert found["loss"] == pytest.approx(found["bare_loss"], rel=1e-5)
        assert found["max_update"] > 1e-3  # the step moved the adapter, so the comparison below means something
        assert found["max_difference"] < 1e-5


if __name__ == "__main__":
    worker(*sys.argv[1:4])
