"""The --device a user names, checked before a model loads: torch's own parser says whether the name is a device
at all, and torch says whether this machine has it (a missing GPU failed after loading, as an AssertionError)."""

from __future__ import annotations


def check_device(name: str | None, flag: str = "--device") -> None:
    """None (the default: cuda when available) passes; else ValueError (one line) unless `name` is a device torch
    knows and this machine has: cpu, cuda, cuda:N (N below the GPU count) or mps."""
    if name is None:
        return
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"{flag} {name!r} is not a device: give cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{flag} {name}: this machine has no CUDA GPU that torch can use; leave {flag} out or "
                             "give cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"{flag} {name}: this machine has {count} CUDA GPU{'s' * (count != 1)} (cuda:0"
                             f"{f' to cuda:{count - 1}' if count > 1 else ''})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{flag} {name}: this machine has no Apple GPU (mps); leave {flag} out or give cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{flag} {name}: this tool runs on cpu, cuda or mps")
