"""`sharded.lm_head`: the Mixup reads the LM head whole, as the loss sees it (ZeRO-3 simulated)."""

import contextlib
import logging

import torch

import sftmix_trl.sharded as sharded
from sftmix_trl.configs import ScriptArguments
from sftmix_trl.data.load import load_datasets


def test_mixup_head_shape_is_logged_as_the_loss_sees_it(tiny_model, tmp_path, monkeypatch, caplog):
    """ZeRO-3 simulated: between the model's forward and the gather, the head's weight is a 0-size shard."""
    from test_sftmix_trainer import build, make_args

    dataset = load_datasets(ScriptArguments(dataset_name="data/demo/health_qa.json", max_train_examples=8))[0]
    trainer = build(tiny_model, dataset, make_args(tmp_path, max_steps=1))
    head = trainer.model.get_base_model().get_output_embeddings()
    full = head.weight.data

    def release(*_):  # after the model's forward, as ZeRO-3 re-partitions the head
        head.weight.data = torch.empty(0)

    @contextlib.contextmanager
    def gathered(weight, bias):  # the gather; the weight stays whole for the backward that follows
        head.weight.data = full
        yield

    trainer.model.register_forward_hook(release)
    monkeypatch.setattr(sharded, "maybe_gather_lm_head_ctx", gathered)
    with caplog.at_level(logging.INFO, logger="sftmix_trl"):
        trainer.train()
    shapes = [r.getMessage().rsplit("weight ", 1)[1] for r in caplog.records if "Mixup head weight" in r.getMessage()]
    assert shapes == [str(tuple(full.shape))]
