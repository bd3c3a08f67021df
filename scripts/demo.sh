#!/usr/bin/env bash
# The main job on the embedded default, on any machine, no download: DreamBooth-train a MoSLoRA adapter on
# the toy subject (assets/toy-subject: a yellow-and-black striped star) with the toy base model
# (assets/toy-base), then draw it next to the base model's drawing for the same seeds, and count how often
# the subject shows for instance prompts (it should) and class prompts (it should not). Outputs: outputs/demo/
# (adapter, LoRA exports, model card, samples, samples/subject_check.json; a later run's samples go to samples-2, ...).
# OUT=folder writes there instead: nothing already in it is deleted (training replaces only an earlier run's files).
#
# With the toy base model the settings are the preset toy-subject (moslora_diffusion/training/settings/presets/
# toy-subject.toml): the quality benchmark's recipe bp_ti with a prior loss weight of 10, chosen on the benchmark's
# validation split so that the class prompt keeps drawing a star (benchmarks/results/quality_demo_recipe*.md):
# rank 16 on every UNet projection (--target_modules all), learning rate 3e-3, batch 4, 600 steps (about 3 minutes
# on one CPU thread), prior preservation against the base model's own prediction for "a photo of a star" (no class
# images: the default --prior_source auto without --class_data_dir), and pivotal tuning of the trigger word "sks"
# (--train_text_encoder_ti) instead of LoRA on the text encoder: the class prompt's features stay the base model's.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# One thread: the toy model gains nothing from a second (about 4 steps/s either way on a quiet 2-core machine) and
# loses 5x when anything else wants the CPU.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
BASE=assets/toy-base
OUT="${OUT:-outputs/demo}"
if [ -f "$BASE/model_index.json" ]; then
  STEPS="${STEPS:-600}"
  SETTINGS=(--preset toy-subject)
  SAMPLER=DDIM
else  # a checkout without the trained toy model: random tiny model, which exercises every step but draws noise
  BASE=outputs/tiny-sd15
  [ -f "$BASE/model_index.json" ] || python -m moslora_diffusion.tiny --family sd15 --out "$BASE"
  STEPS="${STEPS:-100}"
  SETTINGS=(--rank 8 --learning_rate 1e-3 --lr_warmup_steps 20 --train_batch_size 4)
  SAMPLER="DPM++ 2M"
fi
python train_dreambooth.py \
  --pretrained_model_name_or_path "$BASE" \
  --instance_data_dir assets/toy-subject --instance_prompt "a photo of sks star" \
  --with_prior_preservation --class_prompt "a photo of a star" \
  --resolution 64 --adapter moslora "${SETTINGS[@]}" --max_train_steps "$STEPS" --seed 0 \
  --validation_prompt "a photo of sks star" --validation_steps 200 \
  --output_dir "$OUT" --overwrite_output_dir
. scripts/new_folder.sh  # new_samples_folder
SAMPLES="$(new_samples_folder)"
python -m moslora_diffusion.generate --base "$BASE" --adapter "$OUT" --compare_with_base \
  --prompt "a photo of sks star" \
  --prompt "a photo of sks star, on a green background" \
  --prompt "a photo of a star" \
  --seeds 0 1 2 3 4 5 6 7 --steps 25 --guidance 5 --sampler "$SAMPLER" --out "$SAMPLES"
if [ "$BASE" = assets/toy-base ]; then
  python -m moslora_diffusion.toy.subject_check "$SAMPLES"
fi
echo "done: adapter and exports in $OUT, samples (base and adapted, same seeds) in $SAMPLES"
echo "next: python app.py --base $BASE --adapter $OUT"
