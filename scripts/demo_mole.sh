#!/usr/bin/env bash
# The composition demo on the embedded toy model, on any machine, no download: three experts DreamBooth-trained
# on the toy base (assets/toy-base) -- the striped "sks star" (assets/toy-subject), the checkered "v square"
# (assets/toy-subject-2) and the zigzag "z background" (assets/toy-background, ordinary objects on it) --, then
# MoLE gates trained over them (python -m moslora_diffusion.mole train), images drawn with the learned gates for
# each concept alone and for a subject on the zigzag (with the gate heat maps), the composition exported as one
# kohya LoRA for A1111 / ComfyUI, and the toy checker's count of which concept each image shows.
# Outputs: outputs/demo-mole/ (experts, their class images, gates, samples, the static LoRA; a later run's samples go
# to samples-2, ...). OUT=folder writes there instead: nothing already in it is deleted. STEPS=... changes the experts'
# length (default 600 each: about 3 minutes per expert on one CPU thread), GATE_STEPS the gates' (default 150).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # the toy model is small: one thread is fastest
BASE=assets/toy-base
OUT="${OUT:-outputs/demo-mole}"
STEPS="${STEPS:-600}"
GATE_STEPS="${GATE_STEPS:-150}"
# Every expert: the quality benchmark's `baseline` recipe (benchmarks/quality.py DEFAULTS; class images, LoRA on the
# text encoder), the recipe the MoLE figures in the README were measured with.
RECIPE=(--resolution 64 --adapter moslora --rank 16 --target_modules all --train_text_encoder --learning_rate 3e-3
        --lr_scheduler constant_with_warmup --lr_warmup_steps 20 --train_batch_size 4 --prior_loss_weight 1.0
        --num_class_images 24 --with_prior_preservation --max_train_steps "$STEPS" --seed 0 --report_to none)
train_expert() {  # name, photo folder, instance prompt, class prompt
  python train_dreambooth.py --pretrained_model_name_or_path "$BASE" --instance_data_dir "$2" \
    --instance_prompt "$3" --class_prompt "$4" --class_data_dir "$OUT/class-$1" "${RECIPE[@]}" \
    --output_dir "$OUT/$1" --overwrite_output_dir
}
train_expert sks-star assets/toy-subject "a photo of sks star" "a photo of a star"
train_expert v-square assets/toy-subject-2 "a photo of v square" "a photo of a square"
train_expert z-background assets/toy-background "a photo of a star, on a z background" \
  "a photo of a star, on a blue background"
# The gates: each expert's photos and prompt are read from its training run.
python -m moslora_diffusion.mole train --pretrained_model_name_or_path "$BASE" \
  --experts "$OUT/sks-star" "$OUT/v-square" "$OUT/z-background" --resolution 64 --train_batch_size 4 \
  --learning_rate 1e-2 --max_train_steps "$GATE_STEPS" --seed 0 --report_to none \
  --output_dir "$OUT/gates" --overwrite_output_dir
. scripts/new_folder.sh  # new_samples_folder
SAMPLES="$(new_samples_folder)"
python -m moslora_diffusion.mole generate --base "$BASE" --mole "$OUT/gates" \
  --prompt "a photo of sks star" --prompt "a photo of v square" \
  --prompt "a photo of a red star, on a z background" --prompt "a photo of sks star, on a z background" \
  --seeds 0 1 2 3 --steps 25 --guidance 5 --sampler DDIM --heatmap --out "$SAMPLES"
python -m moslora_diffusion.mole export --base "$BASE" --mole "$OUT/gates" --to lora-kohya \
  --out "$OUT/composition_kohya.safetensors" --overwrite
python -m moslora_diffusion.toy.subject_check "$SAMPLES"
echo "done: experts in $OUT/{sks-star,v-square,z-background}, gates in $OUT/gates (mole.safetensors, gates.png),"
echo "      samples and heat maps in $SAMPLES, the static composition in $OUT/composition_kohya.safetensors"
