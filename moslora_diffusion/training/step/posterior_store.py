"""VAE posteriors kept on disk between runs, so a later run on the same images and VAE skips the encoder.

DreamBooth is rerun on the same photos and class folder with another learning rate, rank or step count,
and every run used to VAE-encode the same images again: at SD 1.5 scale encoding an image costs about 0.7x
the FLOPs of its UNet work in a training step. A posterior depends only on the pixels, the VAE weights,
their dtype and the device kind, so it is stored under exactly that:

    <cache dir>/vae-<fingerprint of the VAE encoder>/<device type>-<dtype>/<shard>.safetensors

Each shard holds what one run (one process) encoded, tensors named "<pixel key>.mean" / ".std". Shards are
written atomically (safetensors_io) and never rewritten, so neither a crash nor two runs at once can leave a
broken one; a shard that cannot be read anyway is skipped with a warning. Shards a run reads from
are touched, and past the size budget the least recently used go first. Nothing here can fail a run: a
cache that cannot be written is reported and training goes on.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
from pathlib import Path

import torch

from ...files.safetensors_io import read_keys, save_tensors

DEFAULT_BUDGET_BYTES = 2 << 30  # the whole cache folder, all VAEs together
CACHE_DIR_ENV = "MOSLORA_CACHE_DIR"
SHARD_SUFFIX = ".safetensors"


def default_cache_dir() -> Path:
    """$MOSLORA_CACHE_DIR, else $XDG_CACHE_HOME/moslora-diffusion, else ~/.cache/moslora-diffusion; + /latents."""
    root = os.environ.get(CACHE_DIR_ENV)
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moslora-diffusion"
    return Path(root).expanduser() / "latents"


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw bytes of a tensor (any device or dtype), for hashing."""
    return tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()


@torch.no_grad()
def vae_fingerprint(vae) -> str:
    """A digest of what decides a posterior: the encoder's weights and the VAE config (not the decoder)."""
    digest = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, tensor in vae.state_dict().items():
        if name.startswith(("decoder.", "post_quant_conv.")):
            continue
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()[:32]


class PosteriorStore:
    """The shards of one (VAE, device type, dtype): `get(key)` reads one entry, `write(entries)` adds a shard."""

    def __init__(self, root: Path, folder: Path, process_index: int = 0, budget_bytes: int = DEFAULT_BUDGET_BYTES):
        """`root`: the whole cache (pruned to `budget_bytes`); `folder`: this VAE's shards under it."""
        self.root, self.folder = Path(root), Path(folder)
        self.process_index, self.budget_bytes = process_index, budget_bytes
        self.where: dict[str, Path] = {}  # pixel key -> the shard holding it
        self.used: set[Path] = set()
        for shard in sorted(self.folder.glob(f"*{SHARD_SUFFIX}")) if self.folder.is_dir() else []:
            try:
                keys = _shard_keys(shard)
            except Exception as err:  # a foreign or damaged file must not stop a run
                warnings.warn(f"latent cache: skipping unreadable {shard} ({err})", stacklevel=2)
                continue
            for key in keys:
                self.where.setdefault(key, shard)

    @classmethod
    def for_vae(cls, root: Path, vae, device, process_index: int = 0,
                budget_bytes: int = DEFAULT_BUDGET_BYTES) -> PosteriorStore:
        device_type = torch.device(device).type
        dtype = str(vae.dtype).removeprefix("torch.")
        folder = Path(root) / f"vae-{vae_fingerprint(vae)}" / f"{device_type}-{dtype}"
        return cls(root, folder, process_index, budget_bytes)

    def __len__(self) -> int:
        return len(self.where)

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        shard = self.where.get(key)
        if shard is None:
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(shard), framework="pt") as f:
                mean, std = f.get_tensor(f"{key}.mean"), f.get_tensor(f"{key}.std")
        except Exception as err:  # deleted or damaged since the scan: encode instead
            warnings.warn(f"latent cache: cannot read {shard} ({err}); encoding instead", stacklevel=2)
            self.where = {k: s for k, s in self.where.items() if s != shard}
            return None
        self.used.add(shard)
        return mean, std

    def write(self, entries: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Path | None:
        """One new shard with `entries` (CPU tensors); marks the shards read from as recently used and
        prunes the cache folder to its budget."""
        for shard in self.used:
            _touch(shard)
        if not entries:
            return None
        final = self.folder / f"{uuid.uuid4().hex}-p{self.process_index}{SHARD_SUFFIX}"
        save_tensors({f"{key}.{part}": value for key, pair in entries.items()
                      for part, value in zip(("mean", "std"), pair, strict=True)}, final)
        for key in entries:
            self.where.setdefault(key, final)
        prune(self.root, self.budget_bytes, keep=final)
        return final


def _shard_keys(shard: Path) -> set[str]:
    names = read_keys(shard)
    keys = {name.rsplit(".", 1)[0] for name in names}
    return {key for key in keys if f"{key}.mean" in names and f"{key}.std" in names}


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass  # pruned by another run meanwhile: nothing to keep fresh


def prune(root: Path, budget_bytes: int = DEFAULT_BUDGET_BYTES, keep: Path | None = None) -> list[Path]:
    """Deletes the least recently used shards under `root` (never `keep`) until they fit `budget_bytes`."""
    shards = []
    for shard in Path(root).glob(f"vae-*/*/*{SHARD_SUFFIX}") if Path(root).is_dir() else []:
        try:
            stat = shard.stat()
        except OSError:
            continue
        shards.append((stat.st_mtime, stat.st_size, shard))
    total = sum(size for _, size, _ in shards)
    removed = []
    for _, size, shard in sorted(shards, key=lambda s: s[0]):
        if total <= budget_bytes:
            break
        if shard == keep:
            continue
        shard.unlink(missing_ok=True)
        total -= size
        removed.append(shard)
    return removed
