#!/usr/bin/env bash
# The GPU figures of issue 6, one stage per call (each stays under the 10 minutes a lent GPU allows a command):
#
#   bash benchmarks/gpu_suite.sh sd15    # train step, full-size SD 1.5, 512 px, with and without checkpointing
#   bash benchmarks/gpu_suite.sh sdxl    # train step, full-size SDXL, 1024 px, checkpointing, batch 1 and 4,
#                                        # with the float8 base (--fp8_base) for the VRAM stretch target
#   bash benchmarks/gpu_suite.sh whole   # whole 100-step DreamBooth run, SD 1.5 512 px: first run and rerun
#   bash benchmarks/gpu_suite.sh compile # train step, SD 1.5 512 px, checkpointing, with the UNet compiled
#                                        # (--torch_compile; each round compiles anew, its time reported apart)
#
# Results go to benchmarks/results/ (or $OUT/results when $OUT is set, as on the lent machine), each file
# with its machine, versions and date. Needs the environment of scripts/setup.sh with a CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  sd15|sdxl|whole|compile) ;;
  *) echo "usage: bash benchmarks/gpu_suite.sh sd15|sdxl|whole|compile" >&2; exit 2 ;;
esac
if [ -f .venv/bin/activate ]; then source .venv/bin/activate; fi
results="${OUT:+$OUT/results}"
results="${results:-benchmarks/results}"
mkdir -p "$results"
python - <<'EOF'
import torch
if not torch.cuda.is_available():
    raise SystemExit("gpu_suite.sh: no CUDA device visible; these figures are GPU figures")
print("GPU:", torch.cuda.get_device_name(0))
EOF

case "$1" in
  sd15)
    python -m benchmarks.train_step --family sd15 --resolution 512 --checkpointing both --rank 16 \
      --rounds 3 --steps-per-round 3 --variants peft_lora ours_lora ours_moslora ours_moslora_cl \
      --out-dir "$results" ;;
  sdxl)
    for batch in 1 4; do
      python -m benchmarks.train_step --family sdxl --resolution 1024 --checkpointing on --rank 16 \
        --batch "$batch" --rounds 3 --steps-per-round 3 --variants peft_lora ours_lora ours_moslora ours_moslora_fp8 \
        --out-dir "$results"
    done ;;
  whole)
    python -m benchmarks.whole_run --model full-sd15 --device cuda --steps 100 --repeats 1 --warmup-steps 2 \
      --name whole_run_gpu --out-dir "$results" ;;
  compile)
    python -m benchmarks.train_step --family sd15 --resolution 512 --checkpointing on --rank 16 \
      --rounds 2 --steps-per-round 3 --variants peft_lora ours_moslora ours_moslora_compiled \
      --name train_step_sd15_full_gpu_compiled --out-dir "$results" ;;
esac

