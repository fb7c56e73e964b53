#!/usr/bin/env bash
# GPU checks that CPU CI cannot make, in under 10 minutes on one GPU. Each part has its own timeout and writes its
# status and figures as it goes (a check cut short keeps what it measured):
#   benchmarks/results/gpu_check_cuda.md          every part: exit status, seconds, what it showed
#   benchmarks/results/attention_cost_cuda.md     one padding-free row: sdpa dense mask vs flex block mask (vs flash)
#   benchmarks/results/throughput_cuda_8b_*.md    Llama-3.1-8B shape (random init): real tokens/s and peak memory of
#                                                 TRL NTP padding-free vs SFTMix padding-free on Alpaca lengths
# Parts: (1) both stages on 1 GPU; (2) both stages under fsdp_qlora.yaml and deepspeed_zero3.yaml with 1 process;
# (3) padding-free stage 2 with each attention path (sdpa, flex_attention, and flash_attention_2 /
# kernels-community/flash-attn2 where their packages are importable); (3b) attention parity: the same padding-free
# rows through each of them, loss and time against sdpa; (4) attention cost; (5) 8B throughput; and with
# 2+ GPUs, stage 1 on 2 GPUs under DDP / FSDP / ZeRO-3 against 1 GPU.
#
# On a machine set up with `make install`:   bash scripts/gpu_check.sh
# On the offline GPU machine (../shared/GPU.md), prepare here, then carry `.gpu`:
#     PYTHON=.venv/bin/python bash ../shared/tools/gpu_payload.sh .gpu
#     mkdir -p .gpu/data/instruct .gpu/data/medical && cp ../shared/data/instruct/alpaca_5000.json .gpu/data/instruct/ \
#         && cp ../shared/data/medical/medical_meadow_small.json .gpu/data/medical/   # throughput.py checks both
# and run there:
#     tar xzf .gpu/site.tgz -C /tmp && export PYTHONPATH=/tmp/gpusite:$PWD
#     PY=python3 LAUNCH="python3 -m accelerate.commands.launch" bash scripts/gpu_check.sh
# Without MODEL, a random-init model of the demo shape is built from .gpu/smollm2 (config and tokenizer).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
PY=${PY:-$BIN/python}
read -r -a LAUNCH <<< "${LAUNCH:-$BIN/accelerate launch}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export SFTMIX_DATA_DIR=${SFTMIX_DATA_DIR:-$([ -d .gpu/data ] && echo "$PWD/.gpu/data" || echo "$PWD/../shared/data")}
OUT=outputs/gpu_check
RESULTS=benchmarks/results
REPORT=$RESULTS/gpu_check_cuda.md
rm -rf "$OUT"  # a stage-1 table left by an earlier run would be reused, not recomputed
mkdir -p "$OUT" "$RESULTS"
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
[ "$NGPU" -ge 1 ] || { echo "no CUDA device visible"; exit 1; }
{
  echo "# GPU check ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo
  echo "\`bash scripts/gpu_check.sh\` on $($PY -c 'import torch; print(torch.cuda.get_device_name())') x $NGPU;" \
       "torch $($PY -c 'import torch; print(torch.__version__)')," \
       "transformers $($PY -c 'import transformers; print(transformers.__version__)')."
  echo
  echo "| part | exit | seconds | log |"
  echo "| --- | --- | --- | --- |"
} > "$REPORT"
FAILED=0

# part NAME TIMEOUT_S COMMAND...: run with its own timeout, log to $OUT/NAME.log, one row in the report
part() {
  local name=$1 limit=$2; shift 2
  echo "== $name (timeout ${limit}s)"
  local start=$SECONDS
  if declare -F "$1" > /dev/null; then  # a shell function (timeout runs programs only): it times its own python
    TIMEOUT=$limit "$@" > "$OUT/$name.log" 2>&1
  else
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  fi
  local code=$?
  echo "| $name | $code$([ $code = 124 ] && echo ' (timed out)') | $((SECONDS - start)) | $OUT/$name.log |" >> "$REPORT"
  [ $code = 0 ] || { FAILED=1; tail -5 "$OUT/$name.log"; }
  return $code
}

# A random-init model of the demo shape: real weights do not travel to the offline machine
if [ -z "${MODEL:-}" ]; then
  MODEL=$OUT/demo-random
  part build_demo_model 120 $PY - "$MODEL" <<'PYEOF'
import shutil, sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

source = Path(".gpu/smollm2") if Path(".gpu/smollm2/config.json").is_file() else None
if source is None:
    from sftmix_trl.demo_model import prepare_demo_model
    source = Path(prepare_demo_model())
torch.manual_seed(0)
with torch.device("cuda"):
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=torch.bfloat16)
model.save_pretrained(sys.argv[1])
for file in source.iterdir():
    if file.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
        shutil.copy(file, sys.argv[1])
print("built", sys.argv[1])
PYEOF
fi
SMALL=(--model_name_or_path "$MODEL" --max_train_examples 64 --eval_split_size 0 --eval_strategy no
       --max_steps 6 --save_strategy no --logging_steps 1 --overwrite_output_dir true)
HAVE_DEEPSPEED=$($PY -c "import deepspeed" 2>/dev/null && echo 1 || echo 0)

# A stage-1 table next to one computed on 1 GPU: every snapshot holds tensors, the perplexities agree to STAGE1_RTOL
# (bf16 over a different number of processes rounds differently), and the split is the same except for examples
# whose confidence lies within that tolerance of the cut (random-init weights give near-equal perplexities).
check_table() {  # check_table FOUND_DIR [REFERENCE_DIR]: the snapshots only, or the table against the reference too
  timeout "${TIMEOUT:-60}" $PY - "$1" "${2:-}" "${STAGE1_RTOL:-2e-2}" <<'PYEOF'
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

# (1) both stages, 1 GPU, bf16 + 4-bit
part single_gpu_both_stages 150 "${LAUNCH[@]}" --config_file accelerate_configs/single_gpu.yaml recipes/sftmix.py \
    --config configs/demo/sftmix_qlora.yaml "${SMALL[@]}" --output_dir $OUT/single
part single_gpu_table 30 check_table $OUT/single/confidence

# (2) both stages under FSDP-QLoRA and ZeRO-3, 1 process each; the final adapter is checked against (1)'s: the same
# tensor names and shapes, none empty (an engine that saved nothing, or empty shards, fails here)
check_adapter() {  # check_adapter FOUND_RUN_DIR REFERENCE_RUN_DIR
  timeout "${TIMEOUT:-60}" $PY - "$1" "$2" <<'PYEOF'
import sys
from pathlib import Path

from safetensors import safe_open

def shapes(run):
    path = Path(run) / "adapter_model.safetensors"
    assert path.is_file(), f"no adapter saved in {run}"
    with safe_open(str(path), "pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}

found, reference = shapes(sys.argv[1]), shapes(sys.argv[2])
assert found and all(0 not in shape for shape in found.values()), f"empty adapter tensors in {sys.argv[1]}"
assert found == reference, f"adapter differs from {sys.argv[2]}: {sorted(set(found) ^ set(reference))[:3]}"
print(f"{sys.argv[1]}: adapter of {len(found)} tensors, as on 1 GPU")
PYEOF
}
part fsdp_qlora_both_stages 180 "${LAUNCH[@]}" --config_file accelerate_configs/fsdp_qlora.yaml --num_processes 1 \
    recipes/sftmix.py --config configs/demo/sftmix_qlora.yaml "${SMALL[@]}" --output_dir $OUT/fsdp_1gpu \
    --bnb_4bit_quant_storage bfloat16 --save_strategy steps --save_steps 3
part fsdp_qlora_table 30 check_table $OUT/fsdp_1gpu/confidence
part fsdp_qlora_adapter 30 check_adapter $OUT/fsdp_1gpu $OUT/single
part fsdp_qlora_checkpoint_adapter 30 check_adapter $OUT/fsdp_1gpu/checkpoint-3 $OUT/single  # every checkpoint has it
if [ "$HAVE_DEEPSPEED" = 1 ]; then
  part zero3_both_stages 180 "${LAUNCH[@]}" --config_file accelerate_configs/deepspeed_zero3.yaml --num_processes 1 \
      recipes/sftmix.py --config configs/demo/sftmix_qlora.yaml "${SMALL[@]}" --output_dir $OUT/zero3_1gpu \
      --load_in_4bit false
  part zero3_table 30 check_table $OUT/zero3_1gpu/confidence
  part zero3_adapter 30 check_adapter $OUT/zero3_1gpu $OUT/single
else
  echo "| zero3_both_stages | skipped: deepspeed not importable | | |" >> "$REPORT"
fi

# (3) padding-free stage 2 with each attention path, on the table of (1)
ATTENTIONS=(sdpa flex_attention)
$PY -c "import flash_attn" 2>/dev/null && ATTENTIONS+=(flash_attention_2)
$PY -c "import kernels" 2>/dev/null && ATTENTIONS+=(kernels-community/flash-attn2)  # needs the kernel in the HF cache
for attention in "${ATTENTIONS[@]}"; do
  part "padding_free_${attention//\//_}" 150 "${LAUNCH[@]}" --config_file accelerate_configs/single_gpu.yaml \
      recipes/sftmix.py --config configs/demo/sftmix_qlora.yaml "${SMALL[@]}" --padding_free true \
      --attn_implementation "$attention" --output_dir "$OUT/pf_${attention//\//_}" --confidence_table $OUT/single/confidence
done
$PY - "$OUT" "${ATTENTIONS[@]}" >> "$REPORT" <<'PYEOF' || FAILED=1
import json, sys
from pathlib import Path

out, names = Path(sys.argv[1]), sys.argv[2:]
print("\n| padding-free attention | training losses (6 steps) |\n| --- | --- |")
for name in names:
    state = out / f"pf_{name.replace('/', '_')}" / "trainer_state.json"
    losses = [round(x["loss"], 4) for x in json.loads(state.read_text())["log_history"] if "loss" in x] if state.is_file() else "no run"
    print(f"| {name} | {losses} |")
print()
PYEOF

# (3b) attention parity: the same padding-free rows (TRL's collator, a new row length every step) through each
# attention of (3), 4-bit base + LoRA, forward + backward: loss and gradient norm against sdpa, and time. A shipped
# config moves off sdpa only for an attention this table shows equal and faster (docs/gpu.md)
mkdir -p "$OUT/parity"
for attention in "${ATTENTIONS[@]}"; do
  part "attention_parity_${attention//\//_}" 150 $PY benchmarks/attention_parity.py --attention "$attention" \
      --model "$MODEL" --device cuda --steps 12 --min_tokens 1024 --max_tokens 8192 \
      --json "$OUT/parity/${attention//\//_}.json"
done
PARITY=()
for attention in "${ATTENTIONS[@]}"; do PARITY+=("$OUT/parity/${attention//\//_}.json"); done
timeout 60 $PY benchmarks/attention_parity.py --summarise "${PARITY[@]}" >> "$REPORT" || FAILED=1

# (4) one padding-free row: dense mask vs block mask (vs flash varlen) on the GPU
part attention_cost 150 $PY benchmarks/attention_cost.py --device cuda --lengths 2048,4096,8192,16384,32768

# (5) Llama-3.1-8B shape, 4-bit, padding-free on Alpaca lengths: TRL NTP vs SFTMix, each in its own process (peak)
for variant in "TRL NTP, padding_free" "SFTMix, padding_free, random pairs"; do
  tag=cuda_8b_$(echo "${variant%% *}" | tr 'A-Z' 'a-z')
  part "throughput_${tag}" 200 $PY - "$variant" "$tag" "$OUT/throughput" "${TOKENIZER:-$MODEL}" <<'PYEOF'
import runpy, sys

import torch

variant, tag, work, tokenizer = sys.argv[1:5]
sys.argv = ["throughput.py", "--device", "cuda", "--model", "llama-3.1-8b-shape", "--tokenizer", tokenizer,
            "--datasets", "alpaca", "--examples", "256", "--batch_size", "16", "--budgets", "", "--padded_budget", "0",
            "--repeats", "1", "--only", variant, "--tag", tag, "--work_dir", work]
torch.cuda.reset_peak_memory_stats()
try:
    runpy.run_path("benchmarks/throughput.py", run_name="__main__")
finally:
    peak = torch.cuda.max_memory_allocated() / 2**30
    with open(f"benchmarks/results/throughput_{tag}.md", "a") as handle:
        handle.write(f"\nPeak GPU memory allocated in this process ({variant}): {peak:.2f} GiB\n")
    print(f"peak allocated {peak:.2f} GiB")
PYEOF
done

if [ "$NGPU" -ge 2 ]; then
  # stage 1 on 2 GPUs under DDP, FSDP (4-bit base) and ZeRO-3 (16-bit) = stage 1 on 1 GPU, same global batch
  S1=(--config configs/demo/sftmix_qlora.yaml "${SMALL[@]}" --lora_dropout 0)  # dropout masks follow the sharding
  part s1_one 150 "${LAUNCH[@]}" --config_file accelerate_configs/single_gpu.yaml recipes/confidence.py "${S1[@]}" \
      --output_dir $OUT/s1_one --reference_batch_size 8
  part s1_ddp 150 "${LAUNCH[@]}" --config_file accelerate_configs/multi_gpu.yaml --num_processes 2 recipes/confidence.py \
      "${S1[@]}" --output_dir $OUT/s1_ddp --reference_batch_size 4
  part s1_ddp_table 30 check_table $OUT/s1_ddp/confidence $OUT/s1_one/confidence
  part s1_fsdp 150 "${LAUNCH[@]}" --config_file accelerate_configs/fsdp_qlora.yaml --num_processes 2 \
      recipes/confidence.py "${S1[@]}" --output_dir $OUT/s1_fsdp --reference_batch_size 4 --bnb_4bit_quant_storage bfloat16
  part s1_fsdp_table 30 check_table $OUT/s1_fsdp/confidence $OUT/s1_one/confidence
  if [ "$HAVE_DEEPSPEED" = 1 ]; then
    part s1_one16 150 "${LAUNCH[@]}" --config_file accelerate_configs/single_gpu.yaml recipes/confidence.py "${S1[@]}" \
        --output_dir $OUT/s1_one16 --reference_batch_size 8 --load_in_4bit false
    part s1_zero3 150 "${LAUNCH[@]}" --config_file accelerate_configs/deepspeed_zero3.yaml --num_processes 2 \
        recipes/confidence.py "${S1[@]}" --output_dir $OUT/s1_zero3 --reference_batch_size 4 --load_in_4bit false
    part s1_zero3_table 30 check_table $OUT/s1_zero3/confidence $OUT/s1_one16/confidence
  fi
fi
echo "report: $REPORT"
[ "$FAILED" = 0 ] && echo "GPU checks passed" || { echo "some GPU checks failed (see $REPORT)"; exit 1; }
