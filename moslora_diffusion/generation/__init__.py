"""Text-to-image with adapters fused at live per-adapter scales: checked requests, schedulers, and PNGs
whose A1111-style parameters text reproduces the image. Used by the app and the generate command.

May import: adapters, models, files.
"""
