"""A toy world and a small Stable Diffusion model genuinely trained on it.

world     procedural 64 px scenes (one shape on a background) and their captions
checker   reads class, colour, size, position and background back from pixels
subject   the DreamBooth subjects (sks: a yellow-and-black striped star; v: a red-and-white checkered square)
patterns  which subject's pattern an object carries, and whether the background is the zigzag
concepts  the zigzag background concept (z) and `write_concepts`, which renders every concept's photo folder
models    the SD 1.x-shaped components at toy sizes, and the word-level tokenizer
pretrain  trains the base model (`python -m moslora_diffusion.toy.pretrain --out DIR`)
evaluate  measures a pipeline's generations with the checker

Only numpy, Pillow, torch, diffusers and transformers are needed; nothing is downloaded.
"""
