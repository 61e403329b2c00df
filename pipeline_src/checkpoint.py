"""Checkpoints: atomic saves, exact resume, and loads that never unpickle arbitrary objects.

A run directory holds `last.pt` (the full training state, rewritten every epoch) and, once training
is done, `model.pt` (final weights plus the metadata needed to rebuild the model). `model.pt` is the
"done" marker: it is written last, atomically.

Every file is read with `torch.load(weights_only=True)`, so states are stored as tensors, dicts,
lists and plain scalars only; the numpy and `random` RNG states are converted to and from that form.
"""
from __future__ import annotations

import errno
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline_src.errors import InputError
from pipeline_src.io import MB, atomic_path, check_free_space, free_bytes, no_space, read_json, sha256

LAST_NAME = "last.pt"
FINAL_NAME = "model.pt"

# What a training checkpoint must hold for an exact resume (the scheduler counts the steps).
STATE_KEYS = ("model", "optimizer", "scaler", "scheduler", "epoch", "rng")
# What a final model file's metadata must hold to rebuild the network and name its classes:
# `model` is the params' model section (arch, depth, variant, width, ...).
META_KEYS = ("model", "num_classes", "wnids")

_PLAIN = (bool, int, float, str, bytes, type(None), torch.dtype, torch.device)


class CheckpointError(InputError, RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file and what to do."""


def _check_plain(value: Any, where: str) -> None:
    """Refuse at save time anything `torch.load(weights_only=True)` would refuse at resume time."""
    if isinstance(value, (torch.Tensor, *_PLAIN)):
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise CheckpointError(f"{where}: key {key!r} must be a str or int, not {type(key).__name__}")
            _check_plain(item, f"{where}[{key!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    raise CheckpointError(
        f"{where}: a {type(value).__module__}.{type(value).__name__} cannot go into a weights_only "
        "checkpoint; store tensors, dicts, lists and plain scalars (use capture_rng_state for RNGs)"
    )


def capture_rng_state(generators: dict[str, torch.Generator]) -> dict:
    """Every RNG stream a training step draws from, as weights_only-loadable values."""
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": bit_generator,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "generators": {name: gen.get_state() for name, gen in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    """Put every stream back where `capture_rng_state` found it, so draws continue identically."""
    saved = set(state["generators"])
    if saved != set(generators):
        raise CheckpointError(
            f"the checkpoint holds RNG states for generators {sorted(saved)} but the trainer passed "
            f"{sorted(generators)}; resume with the same generators the run was started with"
        )
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((
        np_state["bit_generator"],
        np_state["keys"].numpy().astype(np.uint32),
        np_state["pos"],
        np_state["has_gauss"],
        np_state["cached_gaussian"],
    ))
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(py_state["internal"]), py_state["gauss_next"]))
    for name, gen in generators.items():
        gen.set_state(state["generators"][name])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.nelement() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _save(path: Path, obj: dict) -> None:
    """Write beside the old file, then rename: until then both exist, so a save needs the new file's
    size free next to the old one (twice the size of a checkpoint in all)."""
    _check_plain(obj, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    need = _tensor_bytes(obj)
    what = (f"saving {path} (the previous file stays until the new one is complete, so a checkpoint "
            "needs twice its size on disk)")
    check_free_space(path.parent, need, what)
    try:
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)
    except (RuntimeError, OSError) as exc:  # torch reports a full disk as "basic_ios::clear: iostream error"
        full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
        if full or free_bytes(path.parent) < need + need // 10 + MB:  # the estimate omits headers
            raise no_space(path.parent, need, what) from exc
        raise


def save_checkpoint(path: Path, state: dict) -> None:
    """Write the training state atomically: a kill mid-write leaves the previous file intact."""
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise CheckpointError(
            f"{path}: the state to save lacks key(s) {missing}; it needs {list(STATE_KEYS)}"
        )
    _save(Path(path), state)


def _load(path: Path, map_location: Any) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise _corrupt(path, exc) from exc
        # torch names the refused global as "Unsupported global: GLOBAL x.y" or, for a blocked
        # module such as os or subprocess, "unsupported GLOBAL posix.system whose module ..."
        refused = re.search(r"GLOBAL (\S+)", str(exc))
        what = refused.group(1) if refused else "a call torch does not allow"
        raise CheckpointError(
            f"{path}: refused: it holds a pickled Python object ({what}), code that "
            "torch.load(weights_only=True) refuses to run, and only checkpoints that load that way are "
            "accepted, because unpickling can run arbitrary code. If you trust the file, convert it once: load it with "
            "weights_only=False, keep only tensors, dicts, lists and plain numbers (e.g. "
            "model.state_dict()), and torch.save that"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise _corrupt(path, exc) from exc


def _corrupt(path: Path, exc: Exception) -> CheckpointError:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return CheckpointError(
        f"{path}: cannot be read, the file is truncated or corrupt ({first_line}); delete it and "
        "re-run the stage that writes it (training resumes or restarts), or restore it with DVC"
    )


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict:
    """Read a training checkpoint written by `save_checkpoint` (weights_only, never unpickling)."""
    state = _load(path, map_location)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a training checkpoint dict")
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        hint = " (a final model file: read it with load_model_weights)" if "meta" in state else ""
        raise CheckpointError(f"{path}: not a training checkpoint, it lacks key(s) {missing}{hint}")
    return state


def finished_metrics(out: Path, recipe: str | None = None) -> dict | None:
    """The metrics.json of a finished run folder, or None: it must be written for `recipe` (when
    given) and record the sha256 of the model.pt beside it, so a truncated or replaced model.pt
    is trained again instead of being skipped forever."""
    metrics_path, model = Path(out) / "metrics.json", Path(out) / FINAL_NAME
    if not (metrics_path.is_file() and model.is_file()):
        return None
    metrics = read_json(metrics_path)
    if recipe is not None and metrics.get("recipe") != recipe:
        return None
    if metrics.get("model_sha256") != sha256(model):
        print(f"{model}: does not match the sha256 in {metrics_path} (truncated or replaced); running again")
        return None
    return metrics


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint to resume from (`last.pt`), or None when training starts from scratch."""
    last = Path(run_dir) / LAST_NAME
    return last if last.is_file() else None


def _check_meta(meta: Any, where: str) -> None:
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: 'meta' must be a dict, got {type(meta).__name__}")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{where}: 'meta' lacks key(s) {missing}; it needs {list(META_KEYS)}")
    if not isinstance(meta["model"], dict):
        raise CheckpointError(f"{where}: 'meta.model' must be the dict of model params")
    wnids = meta["wnids"]
    if not isinstance(wnids, list) or not all(isinstance(w, str) for w in wnids):
        raise CheckpointError(f"{where}: 'meta.wnids' must be a list of class ids (str)")
    if meta["num_classes"] != len(wnids):
        raise CheckpointError(
            f"{where}: 'meta.num_classes' is {meta['num_classes']} but 'meta.wnids' names "
            f"{len(wnids)} classes"
        )


def save_final_model(path: Path, model_state: dict, meta: dict) -> None:
    """Write the final weights with what is needed to rebuild the model; this file marks 'done'."""
    _check_meta(meta, str(path))
    _save(Path(path), {"state_dict": model_state, "meta": meta})


def load_file(path: Path) -> Any:
    """Whatever a weights_only file holds, for callers that recognise several formats."""
    return _load(path, "cpu")


def load_model_weights(path: Path) -> tuple[dict, dict]:
    """(state_dict, meta) of a file written by `save_final_model`, validated."""
    return final_model_of(_load(path, "cpu"), path)


def final_model_of(obj: Any, path: Path) -> tuple[dict, dict]:
    """(state_dict, meta) of what `load_file` read from a `save_final_model` file, validated."""
    if not isinstance(obj, dict) or "state_dict" not in obj or "meta" not in obj:
        is_training = isinstance(obj, dict) and "rng" in obj
        hint = " (a training checkpoint: read it with load_checkpoint)" if is_training else ""
        raise CheckpointError(
            f"{path}: not a final model file, it needs keys 'state_dict' and 'meta' as written by "
            f"save_final_model{hint}"
        )
    state_dict = obj["state_dict"]
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path}: 'state_dict' must map parameter names to tensors")
    _check_meta(obj["meta"], str(path))
    return state_dict, obj["meta"]
