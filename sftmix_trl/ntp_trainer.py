"""`NTPTrainer`: TRL's `SFTTrainer` that resumes from a checkpoint with the numerics it started with, saves its final
adapter under any engine, and keeps `max_length` with `padding_free` (`TruncatingSFTTrainer`).

Both recipes train through it (`recipes/sft.py` directly, `SFTMixTrainer` as its subclass), so a resumed run is
the same computation as an uninterrupted one in both.
"""

from __future__ import annotations

from .padding_free import TruncatingSFTTrainer
from .sharded import save_adapter


class NTPTrainer(TruncatingSFTTrainer):
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under FSDP and DeepSpeed, the adapter alone, gathered to the main process's CPU and written in PEFT's
        format: transformers' own save writes nothing under FSDP's SHARDED_STATE_DICT (the shipped
        `fsdp_qlora.yaml`), gathers the whole base under FULL_STATE_DICT, and under ZeRO-3 writes no adapter unless
        16-bit gathering on save is on. Checkpoints (`_internal_call`) keep transformers' format, which resuming
        reads; other engines keep transformers' save (the same files)."""
        if _internal_call or not (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            super().save_model(output_dir, _internal_call)
            return
        save_adapter(self.model_wrapped, output_dir or self.args.output_dir, self.is_world_process_zero())
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        dtypes = {name: p.dtype for name, p in self.model.named_parameters() if p.requires_grad}
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        # PEFT's `load_adapter` rebuilds the adapter in float32, while TRL trains a 4-bit base's adapter in bf16: put
        # back the dtype the run started with, or the resumed run continues with other numerics than the original
        for name, param in self.model.named_parameters():
            if name in dtypes and param.dtype != dtypes[name]:
                param.data = param.data.to(dtypes[name])
