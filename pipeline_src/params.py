"""The one reader of params files: load, validate, override with --set, resolve named runs.

Every key must be present in the file (no stage keeps hidden defaults) and every key must be known
to the `Params` model below (pydantic); a mistake names the key, its path and the file, and suggests
the closest key. A profile such as configs/imagenet.yaml is an overlay: `extends: ../params.yaml`
and only the keys that differ, deep-merged onto its base before validation (so every key is still
required). The result is a plain dict: every stage reads dicts.
"""

# No `from __future__ import annotations`: pydantic would compile each field's annotation string,
# a third more import time in every Snakemake parse.
import argparse
import copy
import difflib
import hashlib
import json
import math
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from pipeline_src.errors import InputError

DEFAULT_PARAMS = "params.yaml"


class ParamsError(InputError, ValueError):
    """A params file or override that does not validate; the message says where and what to do."""


# ---- leaf types: YAML gives exact types, so nothing is coerced but an int (or a YAML 1.1 string) to a float

def _number(value: Any) -> Any:
    """An int becomes a float, as a string YAML 1.1 reads from `1e-4` (no dot) does; the rest as given."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _exact_int(value: Any) -> Any:
    """An int Literal accepts True and 2.0 as 1 and 2: refuse them as an int field does."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    return value


def _rule(problem_of) -> AfterValidator:
    """A check beyond type and range; `problem_of` returns what is wrong, or None."""
    def check(value: Any) -> Any:
        problem = problem_of(value)
        if problem:
            raise PydanticCustomError("check", "{problem}", {"problem": problem, "value": value})
        return value
    return AfterValidator(check)


def _items(length: int) -> BeforeValidator:
    """A list of fixed length; checked before its items, so a short list is reported as short."""
    def check(value: Any) -> Any:
        if isinstance(value, list) and len(value) != length:
            raise PydanticCustomError("length", "{problem}", {"problem": f"must have {length} items",
                                                               "actual": len(value)})
        return value
    return BeforeValidator(check)


def _increasing(values: list) -> str | None:
    if any(b <= a for a, b in zip(values, values[1:])):
        return "must be strictly increasing"
    return None


def _nonempty_increasing(values: list) -> str | None:
    return "must not be empty" if not values else _increasing(values)


def _ordered_pair(values: list) -> str | None:
    return None if values[0] <= values[1] else "must be [low, high] with low <= high"


def _int(ge: int | None = None, le: int | None = None) -> Any:
    return Annotated[int, Field(ge=ge, le=le)]


def _float(ge: float | None = None, le: float | None = None) -> Any:
    return Annotated[float, BeforeValidator(_number), Field(ge=ge, le=le, allow_inf_nan=False)]


def _one_of(*choices: int) -> Any:
    return Annotated[Literal[choices], BeforeValidator(_exact_int)]


def _pair(item: Any) -> Any:
    return Annotated[list[item], _items(2), _rule(_ordered_pair)]


class _Overrides:
    """Marks a mapping of dotted keys (`train.epochs`) to values, checked against those keys by
    `_check_overrides` (our own code, as run resolution is)."""


Overrides = Annotated[dict[str, Any], BeforeValidator(lambda value: {} if value is None else value), _Overrides]


def _names(value: Any) -> Any:
    """Run and trick names are strings, even those YAML reads as numbers."""
    return {str(k): v for k, v in value.items()} if isinstance(value, dict) else value


class _Section(BaseModel):
    """A section of the file: every key required, no unknown key, no type coercion."""

    model_config = ConfigDict(extra="forbid", strict=True)


def _rule_error(message: str) -> PydanticCustomError:
    """A rule between keys; the message names them (the file is added where it is known)."""
    return PydanticCustomError("rule", "{message}", {"message": message})


# ---- the schema

class Profile(_Section):
    name: str
    description: str


class Paths(_Section):
    data: str
    runs: str
    reports: str


class Synthetic(_Section):
    seed: _int(0)
    classes: _int(2, 20)
    train_per_class: _int(1)
    val_per_class: _int(1)
    min_size: _int(16)
    max_size: _int(16)
    voc_trainval: _int(1)
    voc_test: _int(1)
    ade_train: _int(1)
    ade_val: _int(1)
    scene_size: Annotated[list[_int(32)], _items(2)]

    @model_validator(mode="after")
    def _sizes_ordered(self) -> Self:
        if self.min_size > self.max_size:
            raise _rule_error(f"key 'synthetic.min_size' ({self.min_size}) is above 'synthetic.max_size' "
                              f"({self.max_size}); set min_size <= max_size")
        return self


class Data(_Section):
    imagenet_dir: str | None
    voc_dir: str | None
    ade20k_dir: str | None
    on_corrupt: Literal["error", "skip"]


class Prepare(_Section):
    max_resolution: _int(16)
    jpeg_quality: _int(1, 100)
    jpeg_restart_interval: _int(0, 65535)
    compress_probability: _float(0.0, 1.0)
    write_mode: Literal["raw", "jpg", "proportion"]
    num_workers: _int(1)
    seed: _int(0)


class Loader(_Section):
    num_workers: _int(1)
    order: Literal["random", "quasi_random", "sequential"]
    os_cache: bool
    drop_last: bool
    res: _int(16)
    val_res: _int(16)
    val_crop_ratio: _float(0.1, 1.0)
    device: Literal["auto", "cpu", "cuda"]
    max_decode_scale: _one_of(1, 2, 4, 8)


class Augment(_Section):
    crop_area: _pair(_float(0.0, 1.0))
    crop_ratio: _pair(_float(0.0))
    flip: bool
    brightness: _float(0.0, 1.0)
    contrast: _float(0.0, 1.0)
    saturation: _float(0.0, 1.0)
    hue: _float(0.0, 0.5)
    lighting_std: _float(0.0)
    mean: Annotated[list[_float(0.0, 255.0)], _items(3)]
    std: Annotated[list[_float(1e-6)], _items(3)]


class Model(_Section):
    arch: Literal["resnet", "inception_v3", "mobilenet_v2", "plain_cnn"]
    depth: _one_of(26, 50, 101, 152)
    variant: Literal["A", "B", "C", "D"]
    width: _float(0.0625, 4.0)
    stem_stride: _one_of(1, 2, 4)
    init: Literal["xavier", "kaiming"]
    zero_gamma: bool


class Train(_Section):
    epochs: _int(1)
    batch_size: _int(1)
    base_lr: _float(0.0)
    base_batch: _int(1)
    linear_scaling: bool
    warmup_epochs: _float(0.0)
    schedule: Literal["step", "cosine"]
    step_milestones: Annotated[list[_int(1)], _rule(_increasing)]
    step_gamma: _float(0.0, 1.0)
    momentum: _float(0.0, 1.0)
    nesterov: bool
    weight_decay: _float(0.0)
    no_bias_decay: bool
    label_smoothing: _float(0.0, 1.0)
    mixup_alpha: _float(0.0)
    distill: bool
    precision: Literal["fp32", "amp"]
    cpu_amp: Literal["bf16", "native_only"]
    channels_last: bool
    compile: bool
    sync_bn: bool
    eval_every: _int(1)


class Monitor(_Section):
    finite_check_every: _int(1)
    progress: Literal["auto", "always", "never"]


class Launch(_Section):
    nodes: _int(1)
    allocator: Literal["tcmalloc", "jemalloc", "system"]


class Distill(_Section):
    temperature: _float(1e-6)
    weight: _float(0.0)


class Teacher(_Section):
    run: str
    seed: _int(0)
    checkpoint: str | None


class Sanity(_Section):
    overfit_steps: _int(1)
    overfit_loss: _float(0.0)
    lr_range: _pair(_float(1e-12))
    lr_range_steps: _int(5)


class Tracking(_Section):
    uri: str | None
    experiment: str
    artifact_root: str | None


_STAGES = Literal["stem", "layer1", "layer2", "layer3", "layer4"]


class Detection(_Section):
    style: Literal["c4", "fpn"]
    frozen_stages: list[_STAGES]
    epochs: _int(1)
    batch_size: _int(1)
    lr: _float(0.0)
    lr_milestones: Annotated[list[_int(1)], _rule(_increasing)]
    lr_decay: _float(0.0, 1.0)
    momentum: _float(0.0, 1.0)
    weight_decay: _float(0.0)
    min_size: _int(16)
    max_size: _int(16)
    anchor_sizes: Annotated[list[_float(1.0)], _rule(_nonempty_increasing)]
    aspect_ratios: Annotated[list[_float(1e-3)], _rule(_nonempty_increasing)]
    rpn_batch_size_per_image: _int(1)
    rpn_positive_fraction: _float(0.0, 1.0)
    rpn_pre_nms_top_n_train: _int(1)
    rpn_post_nms_top_n_train: _int(1)
    rpn_pre_nms_top_n_test: _int(1)
    rpn_post_nms_top_n_test: _int(1)
    box_batch_size_per_image: _int(1)
    box_positive_fraction: _float(0.0, 1.0)
    rpn_nms_thresh: _float(0.0, 1.0)
    rpn_fg_iou_thresh: _float(0.0, 1.0)
    rpn_bg_iou_thresh: _float(0.0, 1.0)
    box_fg_iou_thresh: _float(0.0, 1.0)
    box_bg_iou_thresh: _float(0.0, 1.0)
    box_score_thresh: _float(0.0, 1.0)
    box_nms_thresh: _float(0.0, 1.0)
    box_detections_per_img: _int(1)
    metric: Literal["voc07", "voc07_exact", "all_point"]
    train_difficult: bool
    allow_missing_voc2012: bool
    stem_stride: _one_of(1, 2, 4) | None

    @model_validator(mode="after")
    def _fits_torchvision(self) -> Self:
        """Rules between keys that no single key's range can state."""
        # torchvision's FPN has five levels (layer1..layer4 and a max-pooled one), one anchor size each
        if self.style == "fpn" and len(self.anchor_sizes) != 5:
            raise _rule_error(
                "key 'transfer.detection.anchor_sizes' must have 5 items with style fpn (one per "
                f"level: layer1..layer4 and the pooled level), got {len(self.anchor_sizes)}"
            )
        for stage in ("rpn", "box"):  # torchvision's Matcher needs background IoU <= foreground IoU
            low, high = getattr(self, f"{stage}_bg_iou_thresh"), getattr(self, f"{stage}_fg_iou_thresh")
            if low > high:
                raise _rule_error(
                    f"key 'transfer.detection.{stage}_bg_iou_thresh' ({low}) must not exceed "
                    f"'transfer.detection.{stage}_fg_iou_thresh' ({high})"
                )
        return self


class Segmentation(_Section):
    epochs: _int(1)
    batch_size: _int(1)
    lr: _float(0.0)
    poly_power: _float(0.0)
    momentum: _float(0.0, 1.0)
    weight_decay: _float(0.0)
    base_size: _int(16)
    crop_size: _int(16)
    scale_range: _pair(_float(0.01))
    output_stride: _one_of(8, 16, 32)
    aux_loss: bool
    aux_weight: _float(0.0)
    stem_stride: _one_of(1, 2, 4) | None


class Transfer(_Section):
    backbones: list[str]
    detection: Detection
    segmentation: Segmentation


class Run(_Section):
    base: str | None
    tricks: list[str]
    set: Overrides
    description: str


class SingleTrick(_Section):
    base: str
    tricks: list[str]


class LeaveOneOut(_Section):
    stack: str
    tricks: list[str]


class Study(_Section):
    seeds: list[_int(0)]
    transfer_seeds: list[_int(0)]
    tables: list[str]
    distilled: list[str]
    single_trick: SingleTrick
    leave_one_out: LeaveOneOut


class Params(_Section):
    """A whole params file (after its overlays and --set)."""

    profile: Profile
    paths: Paths
    synthetic: Synthetic
    data: Data
    prepare: Prepare
    loader: Loader
    augment: Augment
    model: Model
    train: Train
    monitor: Monitor
    launch: Launch
    distill: Distill
    teacher: Teacher
    sanity: Sanity
    tracking: Tracking
    transfer: Transfer
    tricks: Annotated[dict[str, Overrides], BeforeValidator(_names)]
    runs: Annotated[dict[str, Run], BeforeValidator(_names)]
    study: Study


# Sections a run may override with `set:` or a trick; the rest are shared by every run.
RUN_SECTIONS = ("loader", "augment", "model", "train", "distill")


# ---- walking the schema: a node is a section (model class), a mapping of names, overrides or a leaf

def _unwrap(node: Any) -> tuple[Any, list]:
    """The type under Annotated[...] and `| None`, with the metadata it carried."""
    metadata: list = []
    while True:
        origin = typing.get_origin(node)
        if origin is Annotated:
            node, *more = typing.get_args(node)
            metadata += more
        elif origin in (typing.Union, types.UnionType):
            node = next(arg for arg in typing.get_args(node) if arg is not type(None))
        else:
            return node, metadata


def _is_section(node: Any) -> bool:
    return isinstance(node, type) and issubclass(node, BaseModel)


def _is_overrides(node: Any) -> bool:
    return _Overrides in _unwrap(node)[1]


def _child(node: Any, key: str) -> Any:
    """The schema node one key below `node`, or None where the key is not part of the schema."""
    if _is_section(node):
        field = node.model_fields.get(key)
        if field is None:
            return None
        return Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    if _is_overrides(node):  # replaced whole by an overlay, checked key by key by _check_overrides
        return None
    bare, _ = _unwrap(node)
    if typing.get_origin(bare) is dict:
        return typing.get_args(bare)[1]
    if typing.get_origin(bare) is list and key.isdigit():
        return typing.get_args(bare)[0]
    return None


def _kind(node: Any) -> str:
    """int | float | bool | str | list | section, as the error messages name them."""
    bare, _ = _unwrap(node)
    if typing.get_origin(bare) is Literal:
        return type(typing.get_args(bare)[0]).__name__
    if typing.get_origin(bare) is list:
        return "list"
    return "section" if _is_section(bare) else getattr(bare, "__name__", str(bare))


def _where(path: tuple[str, ...]) -> str:
    return ".".join(path) if path else "<top level>"


def _unknown(key: str, known: list[str], path: tuple[str, ...], src: str) -> ParamsError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = (f"; did you mean '{_where(path + (close[0],))}'?" if close
            else f"; valid keys here: {sorted(known)}")
    return ParamsError(f"{src}: unknown key '{_where(path + (key,))}'{hint}")


def schema_at(dotted: str, src: str = "<override>") -> Any:
    """The schema node of a dotted key such as `train.epochs` (a section's model or a leaf's type),
    or a clear error."""
    node: Any = Params
    path: tuple[str, ...] = ()
    for part in dotted.split("."):
        if not _is_section(node):
            raise ParamsError(f"{src}: key '{dotted}' goes below a leaf at '{_where(path)}'")
        child = _child(node, part)
        if child is None:
            raise _unknown(part, list(node.model_fields), path, src)
        node = child
        path += (part,)
    return node


# ---- pydantic's errors in our words: the file, the key path, what to do

_TYPE_PHRASES = {
    "int": "must be an integer", "float": "must be a number", "bool": "must be true or false",
    "str": "must be a string", "list": "must be a list",
}
_TYPE_ERRORS = {
    "int_type": "int", "float_type": "float", "bool_type": "bool", "string_type": "str", "list_type": "list",
}


def _node_at(root: Any, loc: tuple[str, ...]) -> Any:
    node = root
    for key in loc:
        node = _child(node, key)
    return node


def _params_error(error: dict, root: Any, prefix: tuple[str, ...], src: str) -> ParamsError:
    """One pydantic error (at `loc` below `root`, which sits at `prefix` in the file) as our message."""
    loc = tuple(str(key) for key in error["loc"])
    path, kind, value, ctx = prefix + loc, error["type"], error["input"], error.get("ctx") or {}
    where = f"{src}: key '{_where(path)}'"
    if kind == "extra_forbidden":
        return _unknown(loc[-1], list(_node_at(root, loc[:-1]).model_fields), path[:-1], src)
    if kind == "rule":
        return ParamsError(f"{src}: {ctx['message']}")
    if kind == "check":
        return ParamsError(f"{where} {ctx['problem']}, got {ctx['value']!r}")
    node = _node_at(root, loc)
    if kind in ("model_type", "dict_type"):
        what = ("a section (a mapping)" if _is_section(node) else
                "a mapping of dotted keys to values" if _is_overrides(node) else "a mapping of names")
        return ParamsError(f"{where} must be {what}" + (f", got {value!r}" if _is_section(node) else ""))
    if value is None:
        return ParamsError(f"{where} is null; give it a {_kind(node)} value")
    if _kind(node) == "float":  # say the number as it was read: `1e-4` and `1` are 0.0001 and 1.0
        value = _number(value)
        if isinstance(value, float) and not math.isfinite(value):
            return ParamsError(f"{where} must be finite, got {value!r}")
    if kind in _TYPE_ERRORS:
        return ParamsError(f"{where} {_TYPE_PHRASES[_TYPE_ERRORS[kind]]}, got {value!r}")
    if kind == "literal_error":
        if type(value).__name__ != _kind(node):  # a choice of strings given a number, or the reverse
            return ParamsError(f"{where} {_TYPE_PHRASES[_kind(node)]}, got {value!r}")
        return ParamsError(f"{where} must be one of {list(typing.get_args(_unwrap(node)[0]))}, got {value!r}")
    if kind == "length":
        return ParamsError(f"{where} {ctx['problem']}, got {ctx['actual']}")
    if kind == "greater_than_equal":
        return ParamsError(f"{where} must be >= {ctx['ge']}, got {value!r}")
    if kind == "less_than_equal":
        return ParamsError(f"{where} must be <= {ctx['le']}, got {value!r}")
    return ParamsError(f"{where}: {error['msg']}")


def _first_problem(exc: ValidationError, root: Any, prefix: tuple[str, ...], src: str) -> ParamsError:
    """The one error to report, as the file is read: unknown keys first, then missing ones (all those
    of the first section missing any), then values."""
    errors = exc.errors(include_url=False)
    unknown = [e for e in errors if e["type"] == "extra_forbidden"]
    if unknown:
        return _params_error(unknown[0], root, prefix, src)
    missing = [e for e in errors if e["type"] == "missing"]
    if missing:
        section = missing[0]["loc"][:-1]
        keys = [str(e["loc"][-1]) for e in missing if e["loc"][:-1] == section]
        return ParamsError(
            f"{src}: section '{_where(prefix + tuple(map(str, section)))}' is missing key(s) {keys}; every key "
            "must be set in the params file (see params.yaml for the full list)"
        )
    return _params_error(errors[0], root, prefix, src)


def _check_overrides(params: dict, src: str) -> None:
    """Validate each trick's and run's overrides as the key they name, in place: a value is checked by
    its section's own validator, with the rest of the section as the file gives it."""
    recipes = [(("tricks", name), sets) for name, sets in params["tricks"].items()]
    recipes += [(("runs", name, "set"), run["set"]) for name, run in params["runs"].items()]
    for path, sets in recipes:
        for dotted, value in sets.items():
            if dotted.split(".")[0] not in RUN_SECTIONS:
                raise ParamsError(
                    f"{src}: key '{_where(path)}.{dotted}': a run may only change "
                    f"{list(RUN_SECTIONS)}; '{dotted.split('.')[0]}' is shared by every run"
                )
            if _is_section(schema_at(dotted, f"{src}: in '{_where(path)}'")):
                raise ParamsError(f"{src}: key '{_where(path)}.{dotted}' names a section, not a value")
            *parents, key = dotted.split(".")
            section = _node_at(Params, tuple(parents))
            current = params
            for part in parents:
                current = current[part]
            try:
                checked = section.model_validate({**current, key: value})
            except ValidationError as exc:
                raise _first_problem(exc, section, path + tuple(parents), src) from None
            sets[dotted] = getattr(checked, key)


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


def _lineage(runs: dict, name: str, src: str) -> list[str]:
    chain, seen = [], set()
    while name is not None:
        if name in seen:
            raise ParamsError(f"{src}: runs form a cycle through 'runs.{name}.base'")
        seen.add(name)
        chain.append(name)
        name = runs[name]["base"]
    return chain[::-1]


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
    if node is None or _is_overrides(node) or not isinstance(base, dict) or not isinstance(over, dict):
        return copy.deepcopy(over)
    merged = copy.deepcopy(base)
    for key, value in over.items():
        merged[key] = _overlay(base[key], value, _child(node, str(key))) if key in base else copy.deepcopy(value)
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
        base, raw = raw, _overlay(raw, over, Params)
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
    """Read, override and validate a params file; the result is a plain dict with every key of `Params`."""
    path = Path(path)
    src = str(path)
    raw = _read_profile(path)
    for assignment in sets:
        apply_set(raw, assignment)
    try:
        params = Params.model_validate(raw).model_dump()
    except ValidationError as exc:
        raise _first_problem(exc, Params, (), src) from None
    _check_overrides(params, src)
    _check_references(params, src)
    params["_source"] = src
    params["_sets"] = [a.split("=", 1)[0] for a in sets]
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
