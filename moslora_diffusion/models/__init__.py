"""Base models: which family a model is (SD 1.x, SD 2.x, SDXL), loading one the way users name it, and
the full-size and tiny builders used for benchmarks and tests.

May import: files.
"""
