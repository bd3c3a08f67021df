"""Files the ecosystem reads: the exact fold into diffusers / kohya LoRA files, UNet / VAE / text-encoder
key maps, the original single-file layouts, baking adapters into a pipeline, and the export targets.

May import: adapters, models, files.
"""
