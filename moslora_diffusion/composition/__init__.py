"""Composing several trained subjects in one image: LoRA Switch, LoRA Composite, regional routing."""
