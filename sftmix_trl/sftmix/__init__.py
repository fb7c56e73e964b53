"""Stage 2: `SFTMixConfig` (`config`) and `SFTMixTrainer` (`trainer`) wiring the confident/unconfident pairs
(`sampler`), the Mixup loss (`mixup`) and padding-free rows (`padding_free`) into TRL; `exclusion`, the opt-in
exclusion of the data report's most suspicious examples. Kept free of imports, so that the loss alone loads fast."""
