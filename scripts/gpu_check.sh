#!/usr/bin/env bash
# GPU checks that CPU CI cannot make: bf16 + 4-bit on CUDA, the step-cost benchmark on the GPU, and the recipes
# under DDP, FSDP-QLoRA and DeepSpeed ZeRO-3. Run from the repository root on a machine with N >= 1 GPUs, after
# `make install` (and `pip install deepspeed` for the ZeRO-3 part):
#     bash scripts/gpu_check.sh            # all that the visible GPUs allow
# Results land in outputs/gpu_check/ and benchmarks/results/*_cuda.md.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
NGPU=$($BIN/python -c "import torch; print(torch.cuda.device_count())")
[ "$NGPU" -ge 1 ] || { echo "no CUDA device visible"; exit 1; }
MODEL=$($BIN/sftmix-trl-demo-model)
OUT=outputs/gpu_check
SMALL=(--model_name_or_path "$MODEL" --max_train_examples 64 --eval_split_size 0 --eval_strategy no
       --max_steps 6 --save_strategy no --logging_steps 1 --overwrite_output_dir true)

echo "== 1 GPU: bf16 compute, 4-bit base, full SFTMix pipeline"
$BIN/accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/sftmix.py \
    --config configs/demo/sftmix_qlora.yaml "${SMALL[@]}" --output_dir $OUT/single
$BIN/python -c "import json; h=json.load(open('$OUT/single/trainer_state.json'))['log_history']; \
    assert all(x['loss'] == x['loss'] for x in h if 'loss' in x); print('losses', [round(x['loss'], 3) for x in h if 'loss' in x])"

echo "== step cost and mixup memory on the GPU (benchmarks/results/step_cost_cuda.md)"
$BIN/python benchmarks/step_cost.py
$BIN/python benchmarks/confidence_cost.py

if [ "$NGPU" -ge 2 ]; then
  echo "== $NGPU GPUs: DDP, same global batch as 1 GPU"
  $BIN/accelerate launch --config_file accelerate_configs/multi_gpu.yaml --num_processes "$NGPU" recipes/sftmix.py \
      --config configs/demo/sftmix_qlora.yaml "${SMALL[@]}" --output_dir $OUT/ddp \
      --per_device_train_batch_size 2 --confidence_table $OUT/single/confidence
  echo "== FSDP with a 4-bit base (quant storage = compute dtype)"
  $BIN/accelerate launch --config_file accelerate_configs/fsdp_qlora.yaml --num_processes "$NGPU" recipes/sftmix.py \
      --config configs/demo/sftmix_qlora.yaml "${SMALL[@]}" --output_dir $OUT/fsdp \
      --bnb_4bit_quant_storage bfloat16 --per_device_train_batch_size 2 --confidence_table $OUT/single/confidence
  if $BIN/python -c "import deepspeed" 2>/dev/null; then
    echo "== DeepSpeed ZeRO-3 (16-bit base)"
    $BIN/accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml --num_processes "$NGPU" \
        recipes/sftmix.py --config configs/demo/sftmix_qlora.yaml "${SMALL[@]}" --output_dir $OUT/zero3 \
        --load_in_4bit false --per_device_train_batch_size 2 --confidence_table $OUT/single/confidence
  fi
fi
echo "GPU checks passed"
