"""The one reader of params files: load, validate, override with --set, resolve named runs.

Every key must be present in the file (no stage keeps hidden defaults) and every key must be known
to SCHEMA below; a mistake names the key, its path and the file, and suggests the closest key.
A profile such as configs/imagenet.yaml is an overlay: `extends: ../params.yaml` and only the keys
that differ, deep-merged onto its base before validation (so every key is still required).
"""
from __future__ import annotations

import argparse
import copy
import difflib
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from pipeline_src.errors import InputError

DEFAULT_PARAMS = "params.yaml"


class ParamsError(InputError, ValueError):
    """A params file or override that does not validate; the message says where and what to do."""


@dataclass(frozen=True)
class Spec:
    """One leaf of the schema: its type and the values it may take."""

    kind: str  # int | float | bool | str | list | path
    choices: tuple | None = None
    lo: float | None = None
    hi: float | None = None
    nullable: bool = False
    item: "Spec | None" = None  # for lists
    length: int | None = None  # for lists of fixed length
    check: Callable[[Any], str | None] | None = None  # extra rule; returns an error or None


@dataclass(frozen=True)
class MapOf:
    """A mapping from free names (runs, tricks) to values of one schema."""

    value: Any


@dataclass(frozen=True)
class Overrides:
    """A mapping of dotted keys (`train.epochs`) to values validated against those keys."""


def _int(lo=None, hi=None, **kw) -> Spec:
    return Spec("int", lo=lo, hi=hi, **kw)


def _float(lo=None, hi=None, **kw) -> Spec:
    return Spec("float", lo=lo, hi=hi, **kw)


def _str(choices=None, **kw) -> Spec:
    return Spec("str", choices=tuple(choices) if choices else None, **kw)


def _bool() -> Spec:
    return Spec("bool")


def _list(item: Spec, length=None, **kw) -> Spec:
    return Spec("list", item=item, length=length, **kw)


def _increasing(values: list) -> str | None:
    if any(b <= a for a, b in zip(values, values[1:])):
        return "must be strictly increasing"
    return None


def _nonempty_increasing(values: list) -> str | None:
    return "must not be empty" if not values else _increasing(values)


def _ordered_pair(values: list) -> str | None:
    return None if values[0] <= values[1] else "must be [low, high] with low <= high"


RUN_SCHEMA = {
    "base": _str(nullable=True),
    "tricks": _list(_str()),
    "set": Overrides(),
    "description": _str(),
}

SCHEMA: dict[str, Any] = {
    "profile": {
        "name": _str(),
        "description": _str(),
    },
    "paths": {
        "data": _str(),
        "runs": _str(),
        "reports": _str(),
    },
    "synthetic": {
        "seed": _int(0),
        "classes": _int(2, 20),
        "train_per_class": _int(1),
        "val_per_class": _int(1),
        "min_size": _int(16),
        "max_size": _int(16),
        "voc_trainval": _int(1),
        "voc_test": _int(1),
        "ade_train": _int(1),
        "ade_val": _int(1),
        "scene_size": _list(_int(32), length=2),
    },
    "data": {
        "imagenet_dir": _str(nullable=True),
        "voc_dir": _str(nullable=True),
        "ade20k_dir": _str(nullable=True),
        "on_corrupt": _str(["error", "skip"]),
    },
    "prepare": {
        "max_resolution": _int(16),
        "jpeg_quality": _int(1, 100),
        "compress_probability": _float(0.0, 1.0),
        "write_mode": _str(["raw", "jpg", "proportion"]),
        "num_workers": _int(1),
        "seed": _int(0),
    },
    "loader": {
        "num_workers": _int(1),
        "order": _str(["random", "quasi_random", "sequential"]),
        "os_cache": _bool(),
        "drop_last": _bool(),
        "res": _int(16),
        "val_res": _int(16),
        "val_crop_ratio": _float(0.1, 1.0),
        "device": _str(["auto", "cpu", "cuda"]),
        "max_decode_scale": _int(choices=(1, 2, 4, 8)),
    },
    "augment": {
        "crop_area": _list(_float(0.0, 1.0), length=2, check=_ordered_pair),
        "crop_ratio": _list(_float(0.0), length=2, check=_ordered_pair),
        "flip": _bool(),
        "brightness": _float(0.0, 1.0),
        "contrast": _float(0.0, 1.0),
        "saturation": _float(0.0, 1.0),
        "hue": _float(0.0, 0.5),
        "lighting_std": _float(0.0),
        "mean": _list(_float(0.0, 255.0), length=3),
        "std": _list(_float(1e-6), length=3),
    },
    "model": {
        "arch": _str(["resnet", "inception_v3", "mobilenet_v2", "plain_cnn"]),
        "depth": _int(choices=(26, 50, 101, 152)),
        "variant": _str(["A", "B", "C", "D"]),
        "width": _float(0.0625, 4.0),
        "stem_stride": _int(choices=(1, 2, 4)),
        "init": _str(["xavier", "kaiming"]),
        "zero_gamma": _bool(),
    },
    "train": {
        "epochs": _int(1),
        "batch_size": _int(1),
        "base_lr": _float(0.0),
        "base_batch": _int(1),
        "linear_scaling": _bool(),
        "warmup_epochs": _float(0.0),
        "schedule": _str(["step", "cosine"]),
        "step_milestones": _list(_int(1), check=_increasing),
        "step_gamma": _float(0.0, 1.0),
        "momentum": _float(0.0, 1.0),
        "nesterov": _bool(),
        "weight_decay": _float(0.0),
        "no_bias_decay": _bool(),
        "label_smoothing": _float(0.0, 1.0),
        "mixup_alpha": _float(0.0),
        "distill": _bool(),
        "precision": _str(["fp32", "amp"]),
        "cpu_amp": _str(["bf16", "native_only"]),
        "channels_last": _bool(),
        "compile": _bool(),
        "sync_bn": _bool(),
        "eval_every": _int(1),
    },
    "monitor": {
        "finite_check_every": _int(1),
        "progress": _str(["auto", "always", "never"]),
    },
    "launch": {
        "nodes": _int(1),
    },
    "distill": {
        "temperature": _float(1e-6),
        "weight": _float(0.0),
    },
    "teacher": {
        "run": _str(),
        "seed": _int(0),
        "checkpoint": _str(nullable=True),
    },
    "sanity": {
        "overfit_steps": _int(1),
        "overfit_loss": _float(0.0),
        "lr_range": _list(_float(1e-12), length=2, check=_ordered_pair),
        "lr_range_steps": _int(5),
    },
    "tracking": {
        "uri": _str(nullable=True),
        "experiment": _str(),
        "artifact_root": _str(nullable=True),
    },
    "transfer": {
        "backbones": _list(_str()),
        "detection": {
            "style": _str(["c4", "fpn"]),
            "frozen_stages": _list(_str(["stem", "layer1", "layer2", "layer3", "layer4"])),
            "epochs": _int(1),
            "batch_size": _int(1),
            "lr": _float(0.0),
            "lr_milestones": _list(_int(1), check=_increasing),
            "lr_decay": _float(0.0, 1.0),
            "momentum": _float(0.0, 1.0),
            "weight_decay": _float(0.0),
            "min_size": _int(16),
            "max_size": _int(16),
            "anchor_sizes": _list(_float(1.0), check=_nonempty_increasing),
            "aspect_ratios": _list(_float(1e-3), check=_nonempty_increasing),
            "rpn_batch_size_per_image": _int(1),
            "rpn_positive_fraction": _float(0.0, 1.0),
            "rpn_pre_nms_top_n_train": _int(1),
            "rpn_post_nms_top_n_train": _int(1),
            "rpn_pre_nms_top_n_test": _int(1),
            "rpn_post_nms_top_n_test": _int(1),
            "box_batch_size_per_image": _int(1),
            "box_positive_fraction": _float(0.0, 1.0),
            "rpn_nms_thresh": _float(0.0, 1.0),
            "rpn_fg_iou_thresh": _float(0.0, 1.0),
            "rpn_bg_iou_thresh": _float(0.0, 1.0),
            "box_fg_iou_thresh": _float(0.0, 1.0),
            "box_bg_iou_thresh": _float(0.0, 1.0),
            "box_score_thresh": _float(0.0, 1.0),
            "box_nms_thresh": _float(0.0, 1.0),
            "box_detections_per_img": _int(1),
            "metric": _str(["voc07", "voc07_exact", "all_point"]),
            "train_difficult": _bool(),
            "allow_missing_voc2012": _bool(),
            "stem_stride": _int(choices=(1, 2, 4), nullable=True),
        },
        "segmentation": {
            "epochs": _int(1),
            "batch_size": _int(1),
            "lr": _float(0.0),
            "poly_power": _float(0.0),
            "momentum": _float(0.0, 1.0),
            "weight_decay": _float(0.0),
            "base_size": _int(16),
            "crop_size": _int(16),
            "scale_range": _list(_float(0.01), length=2, check=_ordered_pair),
            "output_stride": _int(choices=(8, 16, 32)),
            "aux_loss": _bool(),
            "aux_weight": _float(0.0),
            "stem_stride": _int(choices=(1, 2, 4), nullable=True),
        },
    },
    "tricks": MapOf(Overrides()),
    "runs": MapOf(RUN_SCHEMA),
    "study": {
        "seeds": _list(_int(0)),
        "transfer_seeds": _list(_int(0)),
        "tables": _list(_str()),
        "distilled": _list(_str()),
        "single_trick": {"base": _str(), "tricks": _list(_str())},
        "leave_one_out": {"stack": _str(), "tricks": _list(_str())},
    },
}

# Sections a run may override with `set:` or a trick; the rest are shared by every run.
RUN_SECTIONS = ("loader", "augment", "model", "train", "distill")


def _where(path: tuple[str, ...]) -> str:
    return ".".join(path) if path else "<top level>"


def _check_leaf(spec: Spec, value: Any, path: tuple[str, ...], src: str) -> Any:
    where = f"{src}: key '{_where(path)}'"
    if value is None:
        if spec.nullable:
            return None
        raise ParamsError(f"{where} is null; give it a {spec.kind} value")
    kind = spec.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise ParamsError(f"{where} must be true or false, got {value!r}")
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{where} must be an integer, got {value!r}")
    elif kind == "float":
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{where} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ParamsError(f"{where} must be finite, got {value!r}")
    elif kind == "str":
        if not isinstance(value, str):
            raise ParamsError(f"{where} must be a string, got {value!r}")
    elif kind == "list":
        if not isinstance(value, list):
            raise ParamsError(f"{where} must be a list, got {value!r}")
        if spec.length is not None and len(value) != spec.length:
            raise ParamsError(f"{where} must have {spec.length} items, got {len(value)}")
        value = [_check_leaf(spec.item, v, path + (str(i),), src) for i, v in enumerate(value)]
    if spec.choices is not None and value not in spec.choices:
        raise ParamsError(f"{where} must be one of {list(spec.choices)}, got {value!r}")
    if spec.lo is not None and value < spec.lo:
        raise ParamsError(f"{where} must be >= {spec.lo}, got {value!r}")
    if spec.hi is not None and value > spec.hi:
        raise ParamsError(f"{where} must be <= {spec.hi}, got {value!r}")
    if spec.check is not None:
        problem = spec.check(value)
        if problem:
            raise ParamsError(f"{where} {problem}, got {value!r}")
    return value


def _unknown(key: str, known: list[str], path: tuple[str, ...], src: str) -> ParamsError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = (f"; did you mean '{_where(path + (close[0],))}'?" if close
            else f"; valid keys here: {sorted(known)}")
    return ParamsError(f"{src}: unknown key '{_where(path + (key,))}'{hint}")


def schema_at(dotted: str, src: str = "<override>") -> Spec | dict:
    """The schema node of a dotted key such as `train.epochs`, or a clear error."""
    node: Any = SCHEMA
    path: tuple[str, ...] = ()
    for part in dotted.split("."):
        if not isinstance(node, dict):
            raise ParamsError(f"{src}: key '{dotted}' goes below a leaf at '{_where(path)}'")
        if part not in node:
            raise _unknown(part, list(node), path, src)
        node = node[part]
        path += (part,)
    return node


def _check_overrides(value: Any, path: tuple[str, ...], src: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ParamsError(f"{src}: key '{_where(path)}' must be a mapping of dotted keys to values")
    out = {}
    for dotted, v in value.items():
        if dotted.split(".")[0] not in RUN_SECTIONS:
            raise ParamsError(
                f"{src}: key '{_where(path)}.{dotted}': a run may only change "
                f"{list(RUN_SECTIONS)}; '{dotted.split('.')[0]}' is shared by every run"
            )
        node = schema_at(dotted, f"{src}: in '{_where(path)}'")
        if not isinstance(node, Spec):
            raise ParamsError(f"{src}: key '{_where(path)}.{dotted}' names a section, not a value")
        out[dotted] = _check_leaf(node, v, path + (dotted,), src)
    return out


def _validate(node: Any, value: Any, path: tuple[str, ...], src: str) -> Any:
    if isinstance(node, Spec):
        return _check_leaf(node, value, path, src)
    if isinstance(node, Overrides):
        return _check_overrides(value, path, src)
    if isinstance(node, MapOf):
        if not isinstance(value, dict):
            raise ParamsError(f"{src}: key '{_where(path)}' must be a mapping of names")
        return {str(k): _validate(node.value, v, path + (str(k),), src) for k, v in value.items()}
    if not isinstance(value, dict):
        raise ParamsError(f"{src}: key '{_where(path)}' must be a section (a mapping), got {value!r}")
    for key in value:
        if key not in node:
            raise _unknown(str(key), list(node), path, src)
    missing = [k for k in node if k not in value]
    if missing:
        raise ParamsError(
            f"{src}: section '{_where(path)}' is missing key(s) {missing}; every key must be set "
            "in the params file (see params.yaml for the full list)"
        )
    return {k: _validate(node[k], value[k], path + (k,), src) for k in node}


def _check_references(params: dict, src: str) -> None:
    tricks, runs = params["tricks"], params["runs"]
    for name, run in runs.items():
        if run["base"] is not None and run["base"] not in runs:
            raise ParamsError(f"{src}: key 'runs.{name}.base' names unknown run '{run['base']}'")
        for trick in run["tricks"]:
            if trick not in tricks:
                raise _unknown(trick, list(tricks), ("runs", name, "tricks"), src)
    study = params["study"]
    for key in ("single_trick", "leave_one_out"):
        for trick in study[key]["tricks"]:
            if trick not in tricks:
                raise _unknown(trick, list(tricks), ("study", key, "tricks"), src)
    for ref in (study["single_trick"]["base"], study["leave_one_out"]["stack"], params["teacher"]["run"],
                *study["tables"], *study["distilled"], *params["transfer"]["backbones"]):
        if ref not in runs:
            raise ParamsError(f"{src}: run '{ref}' named in study/teacher/transfer is not in 'runs'")
    if not study["seeds"]:
        raise ParamsError(f"{src}: key 'study.seeds' is empty; list at least one seed (3 or more resolve deltas)")
    outside = [k for k in study["transfer_seeds"] if k not in study["seeds"]]
    if outside:
        raise ParamsError(f"{src}: key 'study.transfer_seeds' has seed(s) {outside} that are not in 'study.seeds' "
                          f"{study['seeds']}; a fine-tune needs its backbone trained with the same seed")
    for name in runs:
        _lineage(runs, name, src)
    for key in ("tables", "distilled"):
        for name in study[key]:
            distills = "distill" in run_recipe({**params, "_source": src}, name)[0]
            if distills != (key == "distilled"):
                raise ParamsError(
                    f"{src}: key 'study.{key}' lists run '{name}', which "
                    f"{'does not use' if key == 'distilled' else 'uses'} the distill trick; runs that "
                    "distill go in study.distilled (they wait for the teacher), the others in study.tables"
                )


def _check_transfer(params: dict, src: str) -> None:
    """Rules between transfer keys that no single key's range can state."""
    det = params["transfer"]["detection"]
    # torchvision's FPN has five levels (layer1..layer4 and a max-pooled one), one anchor size each
    if det["style"] == "fpn" and len(det["anchor_sizes"]) != 5:
        raise ParamsError(
            f"{src}: key 'transfer.detection.anchor_sizes' must have 5 items with style fpn (one per "
            f"level: layer1..layer4 and the pooled level), got {len(det['anchor_sizes'])}"
        )
    for stage in ("rpn", "box"):  # torchvision's Matcher needs background IoU <= foreground IoU
        low, high = det[f"{stage}_bg_iou_thresh"], det[f"{stage}_fg_iou_thresh"]
        if low > high:
            raise ParamsError(
                f"{src}: key 'transfer.detection.{stage}_bg_iou_thresh' ({low}) must not exceed "
                f"'transfer.detection.{stage}_fg_iou_thresh' ({high})"
            )


def _lineage(runs: dict, name: str, src: str) -> list[str]:
    chain, seen = [], set()
    while name is not None:
        if name in seen:
            raise ParamsError(f"{src}: runs form a cycle through 'runs.{name}.base'")
        seen.add(name)
        chain.append(name)
        name = runs[name]["base"]
    return chain[::-1]


def _check_sizes(params: dict, src: str) -> None:
    synthetic = params["synthetic"]
    if synthetic["min_size"] > synthetic["max_size"]:
        raise ParamsError(
            f"{src}: key 'synthetic.min_size' ({synthetic['min_size']}) is above 'synthetic.max_size' "
            f"({synthetic['max_size']}); set min_size <= max_size"
        )


def _check_schedule(resolved: dict) -> None:
    """Rules between train keys, on a run as resolved: its tricks, `set:` and --set change them."""
    train, run = resolved["train"], resolved["run"]["name"]
    where = f"{resolved['_source']}: run '{run}'"
    epochs, warmup = train["epochs"], train["warmup_epochs"]
    if warmup >= epochs:
        raise ParamsError(
            f"{where}: key 'train.warmup_epochs' ({warmup:g}) must be below 'train.epochs' ({epochs}); "
            "shorten the warmup or train longer"
        )
    outside = [m for m in train["step_milestones"] if not warmup < m < epochs]
    if train["schedule"] == "step" and outside:
        raise ParamsError(
            f"{where}: key 'train.step_milestones' {train['step_milestones']} has {outside} outside "
            f"(warmup_epochs, epochs) = ({warmup:g}, {epochs}); each LR decay must fall after the warmup "
            "and before the last epoch (with --set train.epochs=N, set train.step_milestones too)"
        )


def parse_value(text: str, assignment: str = "") -> Any:
    """A --set value is YAML: `3`, `0.1`, `true`, `null`, `[1, 2]`, `cosine`."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = str(exc).splitlines()[0]
        raise ParamsError(
            f"--set '{assignment or text}': the value is not valid YAML ({problem}); write lists as "
            "[1, 2] and quote strings holding ':' or '#'"
        ) from exc


def apply_set(raw: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` to the raw (not yet validated) params."""
    if "=" not in assignment:
        raise ParamsError(f"--set '{assignment}': expected KEY=VALUE, e.g. train.epochs=3")
    dotted, text = assignment.split("=", 1)
    schema_at(dotted, f"--set {assignment}")
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = parse_value(text, assignment)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error, not the last value."""

    src = "<params>"

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ParamsError(
                    f"{self.src}: line {line}: key '{key}' is given twice in one mapping "
                    f"(first on line {seen[key]}); YAML would silently keep the last value, delete one"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _load_unique_keys(text: str, src: str) -> Any:
    loader = _UniqueKeyLoader(text)
    loader.src = src
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _read_yaml(path: Path) -> dict:
    src = str(path)
    if not path.is_file():
        raise ParamsError(f"{src}: params file not found; pass --params FILE or run from the repo root")
    try:
        raw = _load_unique_keys(path.read_text(encoding="utf-8"), src)
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{src}: not UTF-8 text ({exc}); save the file as UTF-8") from exc
    except yaml.YAMLError as exc:
        raise ParamsError(f"{src}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ParamsError(f"{src}: must hold a mapping of sections at the top level")
    return raw


def _overlay(base: Any, over: Any, node: Any) -> Any:
    """Mappings merge key by key; values, lists and a recipe's overrides (`tricks.<name>`,
    `runs.<name>.set`) are replaced whole, so no base override survives unseen in a profile."""
    if isinstance(node, Overrides) or not isinstance(base, dict) or not isinstance(over, dict):
        return copy.deepcopy(over)
    merged = copy.deepcopy(base)
    for key, value in over.items():
        child = node.value if isinstance(node, MapOf) else node.get(key) if isinstance(node, dict) else None
        merged[key] = _overlay(base[key], value, child) if key in base else copy.deepcopy(value)
    return merged


def profile_files(path: str | Path) -> list[Path]:
    """The files a profile is made of, base first: an overlay names its base with `extends:`."""
    chain = [Path(path)]
    while True:
        raw = _read_yaml(chain[0])
        if "extends" not in raw:
            return chain
        base = chain[0].parent / str(raw["extends"])
        if base.resolve() in {p.resolve() for p in chain}:
            raise ParamsError(f"{chain[0]}: key 'extends' ({raw['extends']}) makes a cycle of profiles")
        chain.insert(0, base)


def _read_profile(path: Path) -> dict:
    """A params file, or an overlay deep-merged onto the file it extends (validated afterwards)."""
    files = profile_files(path)
    raw = _read_yaml(files[0])
    for overlay in files[1:]:
        over = _read_yaml(overlay)
        over.pop("extends")
        base, raw = raw, _overlay(raw, over, SCHEMA)
        base_paths, paths = base.get("paths") or {}, raw.get("paths") or {}
        shared = [f"paths.{key}" for key in paths
                  if isinstance(base_paths, dict) and base_paths.get(key) == paths[key]]
        if shared:
            raise ParamsError(
                f"{overlay}: key(s) {shared} are the same as in the profile it extends ({files[0]}); "
                "give the overlay its own paths.data, paths.runs and paths.reports so the two "
                "profiles do not overwrite each other's betons, runs and reports"
            )
    return raw


def load(path: str | Path = DEFAULT_PARAMS, sets: list[str] | tuple[str, ...] = ()) -> dict:
    """Read, override and validate a params file; the result has every key of SCHEMA."""
    path = Path(path)
    src = str(path)
    raw = _read_profile(path)
    for assignment in sets:
        apply_set(raw, assignment)
    params = _validate(SCHEMA, raw, (), src)
    _check_references(params, src)
    _check_transfer(params, src)
    params["_source"] = src
    params["_sets"] = [a.split("=", 1)[0] for a in sets]
    _check_sizes(params, src)
    return params


def all_run_names(params: dict) -> list[str]:
    """Declared runs, then the generated single-trick and leave-one-out runs."""
    names = list(params["runs"])
    names += [f"single-{t}" for t in params["study"]["single_trick"]["tricks"]]
    names += [f"loo-{t}" for t in params["study"]["leave_one_out"]["tricks"]]
    return names


def run_recipe(params: dict, run: str) -> tuple[list[str], dict[str, Any]]:
    """The tricks a run applies and its merged overrides, in application order."""
    runs, tricks = params["runs"], params["tricks"]
    if run.startswith("single-"):
        trick = run[len("single-"):]
        base = params["study"]["single_trick"]["base"]
        names, sets = run_recipe(params, base)
        if trick not in tricks:
            raise _unknown(trick, list(tricks), ("study", "single_trick", "tricks"), params["_source"])
        return names + [trick], {**sets, **tricks[trick]}
    if run.startswith("loo-"):
        left_out = run[len("loo-"):]
        names, _ = run_recipe(params, params["study"]["leave_one_out"]["stack"])
        if left_out not in names:
            raise ParamsError(f"{params['_source']}: leave-one-out trick '{left_out}' is not in the stack")
        names = [t for t in names if t != left_out]
        sets: dict[str, Any] = {}
        for t in names:
            sets.update(tricks[t])
        return names, sets
    if run not in runs:
        raise _unknown(run, all_run_names(params), ("runs",), params["_source"])
    names, sets = [], {}
    for step in _lineage(runs, run, params["_source"]):
        for t in runs[step]["tricks"]:
            names.append(t)
            sets.update(tricks[t])
        sets.update(runs[step]["set"])
    return names, sets


def run_description(params: dict, run: str) -> str:
    """A run's `description`; the generated single-/loo- runs say what they add or leave out."""
    study = params["study"]
    if run.startswith("single-"):
        return f"{study['single_trick']['base']} + {run[len('single-'):]} (study.single_trick)"
    if run.startswith("loo-"):
        return f"{study['leave_one_out']['stack']} without {run[len('loo-'):]} (study.leave_one_out)"
    return params["runs"][run]["description"]


def resolve_run(params: dict, run: str) -> dict:
    """The params one run trains with: shared sections plus its tricks and `set` applied."""
    names, sets = run_recipe(params, run)
    # A --set on the command line wins over the run's own tricks: it is the user's last word.
    for dotted in params["_sets"]:
        sets.pop(dotted, None)
    resolved = copy.deepcopy(params)
    for dotted, value in sets.items():
        node = resolved
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    resolved["run"] = {"name": run, "tricks": names}
    _check_schedule(resolved)
    return resolved


def recipe_of(resolved: dict) -> dict:
    """The settings that shape one resolved run's training: a change re-trains exactly that run."""
    sections = [k for k in RUN_SECTIONS if k != "distill" or resolved["train"]["distill"]]
    return {k: resolved[k] for k in sections}


def recipe_hash(resolved: dict) -> str:
    """Fingerprint of everything that shapes a run's training, to never resume, skip or report a stale
    one; here rather than in train.py so the report and the workflow compute it without importing torch."""
    return hashlib.sha256(json.dumps(recipe_of(resolved), sort_keys=True).encode()).hexdigest()


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """`{'a': {'b': 1}}` -> `{'a.b': 1}`, for logging and comparing."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `--params FILE` and `--set KEY=VALUE` options every stage takes."""
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="params file (default: params.yaml)")
    parser.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
        help="override one key, validated like the file (repeatable), e.g. --set train.epochs=3",
    )


def from_args(args: argparse.Namespace) -> dict:
    return load(args.params, args.sets)
