#!/usr/bin/env bash
# The main job on the embedded default, on any machine, no download: DreamBooth-train a MoSLoRA adapter on
# the toy subject (assets/toy-subject: a yellow-and-black striped star) with the toy base model
# (assets/toy-base), then draw the subject in scenes it never appeared in, next to the base model's
# drawing for the same seeds. Outputs: outputs/demo/ (adapter, LoRA exports, model card, samples).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
BASE=assets/toy-base
OUT="${OUT:-outputs/demo}"
STEPS="${STEPS:-100}"
if [ ! -f "$BASE/model_index.json" ]; then  # a checkout without the trained toy model: random tiny model
  BASE=outputs/tiny-sd15
  [ -f "$BASE/model_index.json" ] || python -m moslora_diffusion.tiny --family sd15 --out "$BASE"
fi
python train_dreambooth.py \
  --pretrained_model_name_or_path "$BASE" \
  --instance_data_dir assets/toy-subject --instance_prompt "a photo of sks star" \
  --with_prior_preservation --class_prompt "a photo of a star" --num_class_images 24 \
  --class_data_dir outputs/demo-class-images \
  --resolution 64 --rank 8 --adapter moslora --learning_rate 1e-3 --lr_warmup_steps 20 \
  --train_batch_size 4 --max_train_steps "$STEPS" --seed 0 \
  --validation_prompt "a photo of sks star on a green background" --validation_steps 200 \
  --output_dir "$OUT" --overwrite_output_dir
python -m moslora_diffusion.generate --base "$BASE" --adapter "$OUT" --compare_with_base \
  --prompt "a photo of sks star on a green background" \
  --prompt "a photo of a small sks star on the left" \
  --prompt "a photo of sks star on a red background" \
  --seeds 0 1 --steps 25 --guidance 5 --out "$OUT/samples"
echo "done: adapter and exports in $OUT, samples (base and adapted, same seeds) in $OUT/samples/images"
echo "next: python app.py --base $BASE --adapter $OUT"
