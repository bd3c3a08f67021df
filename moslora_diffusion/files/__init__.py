"""Files on disk, at the bottom of every layer: atomic writes, and safetensors reading (never a pickle).

Imports nothing from the rest of the package.
"""
