"""`NTPTrainer`: TRL's `SFTTrainer` that resumes from a checkpoint with the numerics it started with, and keeps
`max_length` with `padding_free` (`TruncatingSFTTrainer`).

Both recipes train through it (`recipes/sft.py` directly, `SFTMixTrainer` as its subclass), so a resumed run is
the same computation as an uninterrupted one in both.
"""

from __future__ import annotations

from .padding_free import TruncatingSFTTrainer


class NTPTrainer(TruncatingSFTTrainer):
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        dtypes = {name: p.dtype for name, p in self.model.named_parameters() if p.requires_grad}
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        # PEFT's `load_adapter` rebuilds the adapter in float32, while TRL trains a 4-bit base's adapter in bf16: put
        # back the dtype the run started with, or the resumed run continues with other numerics than the original
        for name, param in self.model.named_parameters():
            if name in dtypes and param.dtype != dtypes[name]:
                param.data = param.data.to(dtypes[name])
