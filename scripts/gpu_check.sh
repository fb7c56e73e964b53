#!/usr/bin/env bash
# GPU checks that CPU CI cannot make: bf16 + 4-bit on CUDA, the step-cost benchmark on the GPU, the recipes under DDP,
# FSDP-QLoRA and DeepSpeed ZeRO-3 (both stages, on 1 GPU and on several), and stage 1 on 2 GPUs under each engine
# against 1 GPU. Run from the repository root on a machine with N >= 1 GPUs, after `make install` (and
# `pip install deepspeed` for the ZeRO-3 parts):
#     bash scripts/gpu_check.sh            # all that the visible GPUs allow
# On an offline GPU machine (../shared/GPU.md: bring .gpu/site.tgz and a model folder, e.g. a random-init model of
# the demo shape built there from .gpu/smollm2/config.json), point the script at what is there:
#     tar xzf .gpu/site.tgz -C /tmp && export PYTHONPATH=/tmp/gpusite:$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
#     PY=python3 LAUNCH="python3 -m accelerate.commands.launch" MODEL=/tmp/smollm2-random bash scripts/gpu_check.sh
# Results land in outputs/gpu_check/ and benchmarks/results/*_cuda.md.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
PY=${PY:-$PY}
read -r -a LAUNCH <<< "${LAUNCH:-"${LAUNCH[@]}"}"
export PYTHONUNBUFFERED=1
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
[ "$NGPU" -ge 1 ] || { echo "no CUDA device visible"; exit 1; }
MODEL=${MODEL:-$($BIN/sftmix-trl-demo-model)}
OUT=outputs/gpu_check
rm -rf "$OUT"  # a stage-1 table left by an earlier run would be reused, not recomputed
SMALL=(--model_name_or_path "$MODEL" --max_train_examples 64 --eval_split_size 0 --eval_strategy no
       --max_steps 6 --save_strategy no --logging_steps 1 --overwrite_output_dir true)
HAVE_DEEPSPEED=$($PY -c "import deepspeed" 2>/dev/null && echo 1 || echo 0)

# A stage-1 table next to one computed on 1 GPU: every snapshot holds tensors, the perplexities agree to STAGE1_RTOL
# (bf16 over a different number of processes rounds differently), and the split is the same except for examples
# whose confidence lies within that tolerance of the cut (random-init weights give near-equal perplexities).
check_table() {  # check_table FOUND_DIR [REFERENCE_DIR]: the snapshots only, or the table against the reference too
  $PY - "$1" "${2:-}" "${STAGE1_RTOL:-2e-2}" <<'PYEOF'
import sys
from pathlib import Path

import numpy as np
from safetensors import safe_open

from sftmix_trl.confidence import ConfidenceTable

found_dir, rtol = Path(sys.argv[1]), float(sys.argv[3])
snapshots = sorted((found_dir / "snapshots").glob("step-*/adapter_model.safetensors"))
assert snapshots, f"no snapshot in {found_dir}"
for snapshot in snapshots:
    with safe_open(str(snapshot), "pt") as handle:
        assert len(list(handle.keys())) > 0, f"empty snapshot {snapshot}"
found = ConfidenceTable.load(found_dir)
print(f"{found_dir}: {len(snapshots)} non-empty snapshots, {len(found.example_ids)} examples scored")
if not sys.argv[2]:
    sys.exit(0)
reference = ConfidenceTable.load(sys.argv[2])
assert found.example_ids == reference.example_ids, "tables over different examples"
worst = float(np.max(np.abs(found.perplexities / reference.perplexities - 1)))
confident = set(reference.split()[0])
flips = [i for i, s in zip(found.example_ids, found.subsets) if (s == "confident") != (i in confident)]
cut = np.median(reference.confidence)
near = {i for i, c in zip(reference.example_ids, reference.confidence) if abs(c - cut) <= rtol * abs(cut)}
print(f"{found_dir}: max relative perplexity difference {worst:.2e}, {len(flips)} examples changed sides "
      f"({len(set(flips) - near)} of them farther than rtol from the cut)")
assert worst <= rtol, f"perplexities differ by {worst:.2e} > {rtol}"
assert not set(flips) - near, "the split differs beyond examples at the cut"
PYEOF
}

echo "== 1 GPU: bf16 compute, 4-bit base, full SFTMix pipeline"
"${LAUNCH[@]}" --config_file accelerate_configs/single_gpu.yaml recipes/sftmix.py \
    --config configs/demo/sftmix_qlora.yaml "${SMALL[@]}" --output_dir $OUT/single
$PY -c "import json; h=json.load(open('$OUT/single/trainer_state.json'))['log_history']; \
    assert all(x['loss'] == x['loss'] for x in h if 'loss' in x); print('losses', [round(x['loss'], 3) for x in h if 'loss' in x])"

echo "== step cost and mixup memory on the GPU (benchmarks/results/step_cost_cuda.md)"
$PY benchmarks/step_cost.py
$PY benchmarks/confidence_cost.py

echo "== real-data throughput, Llama-3.1-8B shape, padded vs padding-free vs token budgets (throughput_cuda_8b.md)"
# needs the two data files under SFTMIX_DATA_DIR and the demo tokenizer at TOKENIZER (e.g. .gpu/smollm2)
$PY benchmarks/throughput.py --device cuda --model llama-3.1-8b-shape --tokenizer "${TOKENIZER:-$MODEL}" \
    --datasets alpaca --examples 512 --budgets 4096,8192,16384 --padded_budget 0 --repeats 1 --work_dir $OUT/throughput

echo "== 1 GPU: the full recipe (both stages, no --confidence_table) under FSDP (4-bit base) and ZeRO-3 (16-bit)"
"${LAUNCH[@]}" --config_file accelerate_configs/fsdp_qlora.yaml --num_processes 1 recipes/sftmix.py \
    --config configs/demo/sftmix_qlora.yaml "${SMALL[@]}" --output_dir $OUT/fsdp_1gpu --bnb_4bit_quant_storage bfloat16
check_table $OUT/fsdp_1gpu/confidence
if [ "$HAVE_DEEPSPEED" = 1 ]; then
  "${LAUNCH[@]}" --config_file accelerate_configs/deepspeed_zero3.yaml --num_processes 1 recipes/sftmix.py \
      --config configs/demo/sftmix_qlora.yaml "${SMALL[@]}" --output_dir $OUT/zero3_1gpu --load_in_4bit false
  check_table $OUT/zero3_1gpu/confidence
else
  echo "deepspeed not importable: ZeRO-3 launches skipped"
fi

if [ "$NGPU" -ge 2 ]; then
  echo "== stage 1 on 2 GPUs under DDP, FSDP (4-bit base) and ZeRO-3 (16-bit) = stage 1 on 1 GPU, same global batch"
  S1=(--config configs/demo/sftmix_qlora.yaml "${SMALL[@]}" --lora_dropout 0)  # dropout masks follow the sharding
  "${LAUNCH[@]}" --config_file accelerate_configs/single_gpu.yaml recipes/confidence.py "${S1[@]}" \
      --output_dir $OUT/s1_one --reference_batch_size 8
  "${LAUNCH[@]}" --config_file accelerate_configs/multi_gpu.yaml --num_processes 2 recipes/confidence.py "${S1[@]}" \
      --output_dir $OUT/s1_ddp --reference_batch_size 4
  check_table $OUT/s1_ddp/confidence $OUT/s1_one/confidence
  "${LAUNCH[@]}" --config_file accelerate_configs/fsdp_qlora.yaml --num_processes 2 recipes/confidence.py "${S1[@]}" \
      --output_dir $OUT/s1_fsdp --reference_batch_size 4 --bnb_4bit_quant_storage bfloat16
  check_table $OUT/s1_fsdp/confidence $OUT/s1_one/confidence
  if [ "$HAVE_DEEPSPEED" = 1 ]; then
    "${LAUNCH[@]}" --config_file accelerate_configs/single_gpu.yaml recipes/confidence.py "${S1[@]}" \
        --output_dir $OUT/s1_one16 --reference_batch_size 8 --load_in_4bit false
    "${LAUNCH[@]}" --config_file accelerate_configs/deepspeed_zero3.yaml --num_processes 2 recipes/confidence.py \
        "${S1[@]}" --output_dir $OUT/s1_zero3 --reference_batch_size 4 --load_in_4bit false
    check_table $OUT/s1_zero3/confidence $OUT/s1_one16/confidence
  fi

  echo "== $NGPU GPUs: DDP, same global batch as 1 GPU"
  "${LAUNCH[@]}" --config_file accelerate_configs/multi_gpu.yaml --num_processes "$NGPU" recipes/sftmix.py \
      --config configs/demo/sftmix_qlora.yaml "${SMALL[@]}" --output_dir $OUT/ddp \
      --per_device_train_batch_size 2 --confidence_table $OUT/single/confidence
  echo "== FSDP with a 4-bit base (quant storage = compute dtype)"
  "${LAUNCH[@]}" --config_file accelerate_configs/fsdp_qlora.yaml --num_processes "$NGPU" recipes/sftmix.py \
      --config configs/demo/sftmix_qlora.yaml "${SMALL[@]}" --output_dir $OUT/fsdp \
      --bnb_4bit_quant_storage bfloat16 --per_device_train_batch_size 2 --confidence_table $OUT/single/confidence
  if [ "$HAVE_DEEPSPEED" = 1 ]; then
    echo "== DeepSpeed ZeRO-3 (16-bit base)"
    "${LAUNCH[@]}" --config_file accelerate_configs/deepspeed_zero3.yaml --num_processes "$NGPU" \
        recipes/sftmix.py --config configs/demo/sftmix_qlora.yaml "${SMALL[@]}" --output_dir $OUT/zero3 \
        --load_in_4bit false --per_device_train_batch_size 2 --confidence_table $OUT/single/confidence
  fi
fi
echo "GPU checks passed"
