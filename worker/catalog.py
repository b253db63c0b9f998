"""Which models a worker serves: checkpoint directories found under the models directory."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from contract.limits import MODEL_NAME_PATTERN
from models import load_checkpoint
from models.checkpoint import CONFIG_FILE, WEIGHTS_FILE

from .engine import LoadedModel

log = logging.getLogger(__name__)


def discover(models_dir: Path) -> dict[str, Path]:
    """Name → checkpoint directory: `models_dir` itself if it is a checkpoint, else each
    sub-directory holding a `config.json` (named after the directory). Symlinks inside the
    directory are followed only while they stay inside it.
    """
    if not models_dir.is_dir():
        raise FileNotFoundError(f"models directory {models_dir} does not exist")
    if (models_dir / CONFIG_FILE).is_file():
        return {models_dir.resolve().name: models_dir}
    root = models_dir.resolve()
    found = {}
    for sub in sorted(models_dir.iterdir()):
        if (sub / CONFIG_FILE).is_file():
            if not re.fullmatch(MODEL_NAME_PATTERN, sub.name):
                log.warning("skipping %s: %r is not a valid model name", sub, sub.name)
                continue
            if _escapes(sub, root):
                log.warning("skipping %s: a symlink leads out of the models directory %s "
                            "(or nowhere)", sub, root)
                continue
            found[sub.name] = sub
    return found


def _escapes(checkpoint: Path, root: Path) -> bool:
    """Whether the checkpoint directory, or a file the loader reads in it, resolves outside
    `root` (or not at all: a symlink loop): the models directory is the whole of what a
    worker may load from."""
    try:
        return any(not p.resolve().is_relative_to(root)
                   for p in (checkpoint, checkpoint / CONFIG_FILE, checkpoint / WEIGHTS_FILE))
    except (OSError, RuntimeError):        # RuntimeError: a symlink loop (Python < 3.13)
        return True


@dataclass
class Catalog:
    """Loaded models, and the ones that failed with why (their jobs fail with that message)."""

    loaded: dict[str, LoadedModel] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return sorted({*self.loaded, *self.broken})


def load_models(models_dir: Path, device: torch.device, only: list[str] | None = None) -> Catalog:
    """Load every discovered checkpoint (or those named in `only`) onto `device`."""
    paths = discover(models_dir)
    if only:
        missing = sorted(set(only) - set(paths))
        if missing:
            raise FileNotFoundError(f"models not found in {models_dir}: {', '.join(missing)}")
        paths = {n: p for n, p in paths.items() if n in only}
    catalog = Catalog()
    for name, path in paths.items():
        t0 = time.perf_counter()
        try:
            ckpt = load_checkpoint(path, device=device,
                                   for_inference=True)
        except Exception as e:  # a bad checkpoint fails its own jobs, never the worker
            log.error("model %s failed to load: %s", name, e)
            catalog.broken[name] = f"model {name!r} failed to load: {e}"
            continue
        catalog.loaded[name] = LoadedModel.from_checkpoint(name, ckpt, time.perf_counter() - t0)
        log.info("model %s loaded from %s in %.2fs", name, path, catalog.loaded[name].load_seconds)
    return catalog
