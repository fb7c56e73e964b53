"""`SFTMixTrainer`: TRL's `SFTTrainer` with paired confident/unconfident batches and the Mixup regulariser.

It builds on `NTPTrainer` (TRL's `SFTTrainer` that resumes in the dtypes the run started with and keeps `max_length`
under `padding_free`, shared with the NTP recipe), and overrides these hooks, leaving the rest to TRL:

- `_set_signature_columns_if_needed`: keeps the row index column that pairs and lambdas are keyed on;
- `_get_train_sampler`: the `PairedSampler` (rows 2k and 2k+1 of every micro-batch are pair k), length-aware with
  `train_sampling_strategy: group_by_length`;
- `get_train_dataloader`: with `tokens_per_micro_batch`, micro-batches of whole pairs up to a token budget;
- `_run_epoch`: sets the paired sampler's epoch, which a resumed multi-process run does not reach otherwise;
- `_get_num_items_in_batch`: also counts the mixed positions of the accumulation window (and across processes), so
  the Mixup term is normalised over the global batch exactly like TRL normalises the NTP loss;
- `compute_loss`: TRL's own NTP loss from one forward of the wrapped model, plus `mixup_weight * mixup_loss` on the
  final hidden states captured from that same forward by a hook on the backbone, and the metrics: NTP and Mixup
  parts, mean lambda, NTP loss of each half, and `mixup_token_share` (2 x mixed positions / response tokens).

Evaluation is TRL's plain NTP loss. With `padding_free`, a micro-batch is one row of examples laid end to end; the
Mixup term gathers its positions from that row by index (`padding_free.mixed_flat_positions`, the hidden states are
never re-padded), and its count and the per-half metrics put the labels and per-token losses back on right-padded
rows: all are those of the padded path.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from functools import partial

import numpy as np
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader
from transformers.trainer_utils import seed_worker

from sftmix_trl.confidence import ConfidenceError, ConfidenceTable
from sftmix_trl.data.load import EXAMPLE_ID, has_multi_turn
from sftmix_trl.launch_checks import LaunchError, mixup_head_problem
from sftmix_trl.sft_trainer import NTPTrainer
from sftmix_trl.sftmix.config import SFTMixConfig, unsupported_parallelism
from sftmix_trl.sftmix.mixup import IGNORE_INDEX, count_mixed_positions, mixup_loss, mixup_loss_at
from sftmix_trl.sftmix.padding_free import mixed_flat_positions, sequence_lengths, unflatten
from sftmix_trl.sftmix.sampler import PairedSampler, TokenBudgetBatchSampler
from sftmix_trl.sharded import lm_head

logger = logging.getLogger(__name__)
ROW = "sftmix_row"  # dataset row index carried through the collator, for lambda seeding and error messages


class _KeepRowIndex:
    """Wraps a collator so that the batch keeps each example's dataset row index."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        rows = [example.pop(ROW) for example in examples] if ROW in examples[0] else None
        batch = self.collator(examples)
        if rows is not None:
            batch[ROW] = torch.tensor(rows)
        return batch


class SFTMixTrainer(NTPTrainer):
    """Trainer for SFTMix stage 2: NTP plus a Mixup regulariser over confident/unconfident pairs (Xiao et al., 2024).

    Every micro-batch holds K confident and K unconfident examples, paired; the loss is `L_ntp + mixup_weight *
    L_mix`, where `L_mix` interpolates the final hidden states of each pair with lambda ~ Beta(alpha, alpha) and
    scores the mixture against both pairs' tokens (`sftmix_trl.sftmix.mixup.mixup_loss`).

    Args:
        model: as for `SFTTrainer` (a model, or a model id TRL loads); a 4-bit base with `peft_config` for QLoRA.
        args (`SFTMixConfig`): TRL's `SFTConfig` plus the SFTMix fields (`mixup_weight`, `mixup_alpha`, ...).
        train_dataset: the training data with the `example_id` column `sftmix_trl.data.load.load_datasets` adds.
        confidence (`ConfidenceTable`): the stage-1 table that splits `train_dataset` into the two halves
            (`sftmix_trl.confidence.compute_confidence`, or `ConfidenceTable.load(folder)`).
        **kwargs: as for `SFTTrainer` (`eval_dataset`, `processing_class`, `peft_config`, `callbacks`, ...).

    Example:

    ```python
    from datasets import Dataset
    from peft import LoraConfig
    from sftmix_trl import ConfidenceTable, SFTMixConfig, SFTMixTrainer

    dataset = Dataset.from_list([{"example_id": str(i), "prompt": ..., "completion": ...} for i in range(64)])
    trainer = SFTMixTrainer(
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
        args=SFTMixConfig(output_dir="out", per_device_train_batch_size=8, mixup_weight=0.2),
        train_dataset=dataset,
        confidence=ConfidenceTable.load("out/confidence"),
        peft_config=LoraConfig(r=16, target_modules="all-linear"),
    )
    trainer.train()
    ```
    """

    _tag_names = ["trl", "sft", "sftmix"]
    _name = "SFTMix"

    def __init__(self, model, args: SFTMixConfig, train_dataset, confidence: ConfidenceTable, **kwargs):
        if not isinstance(args, SFTMixConfig):
            raise TypeError(f"SFTMixTrainer needs an SFTMixConfig, got {type(args).__name__}")
        if EXAMPLE_ID not in train_dataset.column_names:
            raise ValueError(
                f"train_dataset needs an `{EXAMPLE_ID}` column (sftmix_trl.data.load.load_datasets adds it)"
            )
        if has_multi_turn(train_dataset) and not args.assistant_only_loss:
            # Without it TRL trains the user turns inside a multi-turn completion, and stage 1 scored without them
            raise ValueError("multi-turn conversations in train_dataset need `assistant_only_loss=True`")
        super().__init__(model=model, args=args, train_dataset=train_dataset, **kwargs)
        self._check_lm_head()
        self._check_parallelism()

        row_ids = list(self.train_dataset[EXAMPLE_ID])
        confident_ids, unconfident_ids = confidence.split()
        subset = {i: 0 for i in confident_ids} | {i: 1 for i in unconfident_ids}
        missing = [i for i in row_ids if i not in subset]
        if missing:
            raise ConfidenceError(
                f"{len(missing)} of {len(row_ids)} training examples have no score in the confidence table (e.g. "
                f"{missing[:3]}): the table belongs to another dataset or max_length; recompute it"
            )
        self.confident_rows = [r for r, i in enumerate(row_ids) if subset[i] == 0]
        self.unconfident_rows = [r for r, i in enumerate(row_ids) if subset[i] == 1]
        for name, rows in (("confident", self.confident_rows), ("unconfident", self.unconfident_rows)):
            if len(rows) < args.pairs_per_device:
                raise ConfidenceError(
                    f"the {name} subset has {len(rows)} examples, fewer than the {args.pairs_per_device} pairs of "
                    "a micro-batch; lower per_device_train_batch_size"
                )
        self._row_ids = row_ids
        self.train_dataset = self.train_dataset.add_column(ROW, list(range(len(row_ids))))
        self.data_collator = _KeepRowIndex(self.data_collator)
        self._num_mixed_in_batch = None
        self._engine_logged = False
        self._paired_sampler = None  # the training sampler, once built; `_run_epoch` sets its epoch
        logger.info(
            "SFTMix split: %d confident, %d unconfident training examples",
            len(self.confident_rows),
            len(self.unconfident_rows),
        )

    # -- data -----------------------------------------------------------------------------------------------------------

    # Hook: the row index survives `remove_unused_columns` (pairs and lambdas are keyed on it)
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if ROW not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, ROW]

    def _row_lengths(self) -> tuple[list[int], list[int]]:
        """Per training row: its token count and its trained (label != -100) token count, read once from Arrow."""
        if getattr(self, "_lengths", None) is None:
            lengths, responses = [], []
            for table in self.train_dataset.select_columns(["input_ids", "labels"]).with_format("arrow").iter(8192):
                lengths += pc.list_value_length(table["input_ids"]).to_pylist()
                labels = table["labels"].combine_chunks()
                trained = np.asarray(pc.list_flatten(labels)) != -100
                parents = np.asarray(pc.list_parent_indices(labels))
                responses += np.bincount(parents, weights=trained, minlength=len(labels)).astype(int).tolist()
            self._lengths = (lengths, responses)
        return self._lengths

    # Hook: confident/unconfident pairs instead of a random order
    def _get_train_sampler(self, train_dataset=None, pairs_per_global_batch=None, mega_batch_factor=50):
        length_aware = self.args.train_sampling_strategy == "group_by_length"
        lengths, responses = self._row_lengths() if length_aware else (None, None)
        self._paired_sampler = PairedSampler(
            self.confident_rows,
            self.unconfident_rows,
            pairs_per_global_batch=pairs_per_global_batch or self.args.pairs_per_device * self.args.world_size,
            seed=self.args.data_seed
            if self.args.data_seed is not None
            else self.args.seed,  # as transformers' samplers
            lengths=lengths,
            response_lengths=responses,
            mega_batch_factor=mega_batch_factor,
        )
        return self._paired_sampler

    def _get_train_batch_sampler(self) -> TokenBudgetBatchSampler:
        """Micro-batches of whole pairs up to `tokens_per_micro_batch`, planned for the run's epochs."""
        lengths, _ = self._row_lengths()
        budget, processes = self.args.tokens_per_micro_batch, self.args.world_size
        # Nothing here depends on the number of processes but the rounding of the micro-batch count: one pair per
        # "global batch" (no rounding of pairs), mega-batches of about 50 micro-batches of pairs of mean length
        pairs_per_micro_batch = max(1, budget // max(1, round(2 * float(np.mean(lengths)))))
        pairs = self._get_train_sampler(pairs_per_global_batch=1, mega_batch_factor=50 * pairs_per_micro_batch)
        batch_sampler = TokenBudgetBatchSampler(
            pairs, lengths, budget, padded=not self.args.padding_free, num_processes=processes
        )
        epochs = math.ceil(self.args.num_train_epochs)
        if self.args.max_steps > 0:  # epochs needed at the shortest epoch length; a longer planned epoch needs fewer
            steps_per_epoch = math.ceil(len(batch_sampler) // processes / self.args.gradient_accumulation_steps)
            epochs = math.ceil(self.args.max_steps / steps_per_epoch)
        batch_sampler.plan(epochs)
        return batch_sampler

    # Hook: with a token budget, batches of whole pairs of varying count
    def get_train_dataloader(self) -> DataLoader:
        if self.args.tokens_per_micro_batch is None:
            return super().get_train_dataloader()
        if self.accelerator.split_batches:
            raise LaunchError(
                "`tokens_per_micro_batch` hands whole micro-batches to processes: turn off split_batches"
            )
        dataset = self._remove_unused_columns(self.train_dataset, description="Training")
        loader = DataLoader(
            dataset,
            batch_sampler=self._get_train_batch_sampler(),
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers,
            worker_init_fn=partial(
                seed_worker, num_workers=self.args.dataloader_num_workers, rank=self.args.process_index
            ),
        )
        # accelerate wraps the batch sampler in `BatchSamplerShard`: rank r gets micro-batches r, r + P, ...
        return self.accelerator.prepare(loader)

    # Hook: the paired sampler learns the epoch on every path, resumed multi-process runs included
    def _run_epoch(self, model, epoch, *args, **kwargs):
        # A resumed multi-process run wraps the sampler in SkipBatchSampler(BatchSamplerShard(...)), which accelerate's
        # and the Trainer's `set_epoch` do not reach: the sampler would replay epoch 0's pairs. Set it here.
        if getattr(self, "_paired_sampler", None) is not None:
            self._paired_sampler.set_epoch(epoch)
        return super()._run_epoch(model, epoch, *args, **kwargs)

    def _example_lengths(self, batch, num_examples: int) -> torch.Tensor | None:
        """(2K,) lengths of the examples of a padding-free micro-batch; None when it has one row per example."""
        return sequence_lengths(batch["position_ids"], num_examples) if self.padding_free else None

    def _paired_labels(self, batch) -> torch.Tensor:
        """(2K, T) labels, one row per example, whichever way the collator laid the micro-batch out."""
        lengths = self._example_lengths(batch, len(batch[ROW]))
        return batch["labels"] if lengths is None else unflatten(batch["labels"], lengths, IGNORE_INDEX)

    # Hook: the Mixup term's normaliser is counted over the accumulation window as TRL counts the NTP one
    def _get_num_items_in_batch(self, batch_samples, device):
        num_items = super()._get_num_items_in_batch(batch_samples, device)
        mixed = sum(count_mixed_positions(self._paired_labels(batch)) for batch in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            mixed = self.accelerator.gather(mixed).sum()
        self._num_mixed_in_batch = mixed
        return num_items

    # -- model ----------------------------------------------------------------------------------------------------------

    def _causal_lm(self, model):
        unwrapped = self.accelerator.unwrap_model(model)
        return unwrapped, unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped

    def _check_lm_head(self) -> None:
        # The recipes refuse these at launch (`launch_checks`); a trainer built in Python is checked here
        problem = mixup_head_problem(self._causal_lm(self.model)[1])
        if problem:
            raise LaunchError(problem)

    def _check_parallelism(self) -> None:
        problem = unsupported_parallelism(self.get_tp_size(), self.get_cp_size(), self.get_sp_size(), self.args.n_gpu)
        if problem:
            raise LaunchError(problem)

    @contextmanager
    def _capture_forward(self, model):
        """Catch the backbone's final hidden states (the LM head's input) and the fused-head outputs of one forward
        of the wrapped model; nothing is recomputed and the wrapper (DDP/FSDP/DeepSpeed) is not bypassed."""
        captured = {}
        top, causal_lm = self._causal_lm(model)

        def keep_hidden(module, args, output):
            # With label smoothing or a compute_loss_func, TRL's loss forward is followed by a no-grad forward for its
            # metrics: the Mixup term must use the first one, or it has no gradient
            if captured.get("grad") and not torch.is_grad_enabled():
                return
            captured["grad"] = torch.is_grad_enabled()
            captured["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

        def keep_outputs(module, args, kwargs, output):
            captured["outputs"] = output

        handles = [
            causal_lm.base_model.register_forward_hook(keep_hidden),
            top.register_forward_hook(keep_outputs, with_kwargs=True),
        ]
        try:
            yield captured
        finally:
            for handle in handles:
                handle.remove()

    def _draw_lambdas(self, rows: torch.Tensor) -> torch.Tensor:
        """lambda ~ Beta(alpha, alpha), seeded by (seed, optimizer step, the pair's rows): the same on any number of
        processes for the same global batch, and replayed exactly on resume."""
        pairs = rows.view(-1, 2).tolist()
        alpha, seed, step = self.args.mixup_alpha, self.args.seed, self.state.global_step
        if self.args.mixup_lambda_per == "batch":
            value = np.random.default_rng([seed, step, *pairs[0]]).beta(alpha, alpha)
            return torch.full((len(pairs),), value)
        return torch.tensor([np.random.default_rng([seed, step, c, u]).beta(alpha, alpha) for c, u in pairs])

    # -- loss -----------------------------------------------------------------------------------------------------------

    # Hook: NTP (TRL's) + mixup_weight x Mixup, from one forward
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rows = inputs.pop(ROW, None)
        if rows is None or not self.model.training:  # evaluation: plain NTP, exactly as SFTTrainer reports it
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with self._capture_forward(model) as captured:
            ntp_loss = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        hidden, labels = captured["hidden"], inputs["labels"]  # (2K, T, D), (2K, T); padding-free (1, N, D), (1, N)
        lengths = self._example_lengths(inputs, len(rows))
        lam = self._draw_lambdas(rows)
        grad = self.args.mixup_weight > 0 and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad), lm_head(model) as (weight, bias):  # whole under FSDP2 and ZeRO-3 too
            if not self._engine_logged:  # what wraps the model and the head the loss uses (gathered), once per run
                self._engine_logged = True
                logger.info(
                    "SFTMix training through %s on %d process(es); Mixup head weight %s",
                    type(model).__name__,
                    self.accelerator.num_processes,
                    tuple(weight.shape),
                )
            common = dict(lm_head_bias=bias, chunk_size=self.args.mixup_chunk_size, reduction="sum")
            if lengths is None:
                mix_sum = mixup_loss(hidden[0::2], hidden[1::2], labels[0::2], labels[1::2], weight, lam, **common)
                local_mixed = count_mixed_positions(labels)
            else:  # the padded path's positions, gathered from the row: no (2K, T_max, D) copy
                index_c, index_u, n = mixed_flat_positions(labels, lengths)
                targets_c, targets_u = labels[0, index_c + 1], labels[0, index_u + 1]
                mix_sum = mixup_loss_at(
                    hidden[0, index_c], hidden[0, index_u], targets_c, targets_u, n, weight, lam, **common
                )
                local_mixed = n.sum()
        # Normalised like TRL's NTP loss: over the mixed positions of the whole accumulation window (and of every
        # process, scaled back up since DDP averages gradients) when the trainer counted them, else this micro-batch's
        mixed = self._num_mixed_in_batch if num_items_in_batch is not None else local_mixed
        mix = mix_sum / torch.as_tensor(mixed, device=mix_sum.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            mix = mix * self.accelerator.num_processes
        loss = ntp_loss + self.args.mixup_weight * mix if self.args.mixup_weight > 0 else ntp_loss
        self._stop_if_not_finite(loss, rows)
        self._record_metrics(captured["outputs"], mix_sum.detach(), local_mixed, lam, lengths)
        return loss

    def _stop_if_not_finite(self, loss: torch.Tensor, rows: torch.Tensor) -> None:
        # Every process learns whether any process diverged, so all stop together (no rank waits in an all-reduce)
        finite = torch.isfinite(loss.detach()).to(torch.int32).reshape(1)
        if self.accelerator.gather(finite).min() == 1:
            return
        ids = [self._row_ids[r] for r in rows.tolist()]
        raise FloatingPointError(
            f"non-finite loss at optimizer step {self.state.global_step + 1}; stopped before the update, no checkpoint "
            f"written. Example ids of this process's batch: {ids}. Try a lower learning_rate or max_grad_norm."
        )

    def _record_metrics(self, outputs, mix_sum, mixed, lam, lengths=None) -> None:
        gather = self.accelerator.gather_for_metrics
        nll = -outputs.log_probs.detach()  # (2K, T-1), zero outside the response; padding-free (1, N-1)
        mask = outputs.label_mask
        if lengths is not None:  # position t predicts token t + 1: one slot appended lines each example up again
            nll = unflatten(torch.cat([nll, nll.new_zeros(1, 1)], 1), lengths)  # (2K, T)
            mask = unflatten(torch.cat([mask, mask.new_zeros(1, 1)], 1), lengths, False)
        sums = torch.stack(
            [
                nll.sum(),
                mask.sum(),
                nll[0::2].sum(),
                mask[0::2].sum(),
                nll[1::2].sum(),
                mask[1::2].sum(),
                mix_sum.to(nll.dtype),
                torch.as_tensor(mixed, device=nll.device).to(nll.dtype),
                lam.sum().to(nll.device, nll.dtype),
                torch.tensor(float(len(lam)), device=nll.device, dtype=nll.dtype),
            ]
        ).float()
        total = gather(sums[None]).sum(0).tolist()
        metrics = self._metrics["train"]
        metrics["ntp_loss"].append(total[0] / max(total[1], 1))
        metrics["ntp_loss_confident"].append(total[2] / max(total[3], 1))
        metrics["ntp_loss_unconfident"].append(total[4] / max(total[5], 1))
        metrics["mixup_loss"].append(total[6] / max(total[7], 1))
        metrics["mixup_token_share"].append(2 * total[7] / max(total[1], 1))  # each mixed position takes 2 tokens
        metrics["mixup_lambda"].append(total[8] / max(total[9], 1))
