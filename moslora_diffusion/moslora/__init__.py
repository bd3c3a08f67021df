"""The method: the MoSLoRA layer, attaching it to a pipeline and taking it off, the per-forward adapter
weights, and the native adapter file. (Named after the method rather than `adapters`, which is a public
function of the package face.)

May import: models, files.
"""
