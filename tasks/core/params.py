"""params.yaml: one section per stage, parsed into that stage's dataclass with clear errors.

A stage reads its own section (`domain` also the data stages'), and dvc.yaml lists exactly the sections
each stage reads, so changing a value reruns exactly the stages that read it. `set_overrides`
implements `-S section.key=value` the way `dvc exp run -S` does: the value is written into params.yaml
(comments preserved).
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import yaml
from ruamel.yaml import YAML

from tasks.core.io import atomic_file

T = TypeVar("T")

#: Settings that moved, old key → new key: a params.yaml or `-S` written before the move gets a clear
#: rename error instead of "unknown key".
MOVED_KEYS = {
    "pretrain.model": ("plan.model", "the stage that decides it reads it"),
    "evaluate.max_tokens": ("evaluate.max_bytes", "bytes are the same text whatever the tokenizer"),
}


class ParamsError(ValueError):
    """A missing, unknown or ill-typed parameter; the message names it as `section.key`."""


def _check_not_moved(key: str) -> None:
    for old, (new, why) in MOVED_KEYS.items():
        if key == old or key.startswith(f"{old}."):
            raise ParamsError(
                f"params.yaml: {old} is now {new} ({why}): rename {key} to {new}{key.removeprefix(old)}"
            )


@contextmanager
def setting_errors(section: str, separator: str = ".") -> Iterator[None]:
    """Turn a model-side settings ValueError ("lr must be > 0 ...") into the ParamsError that names the
    params.yaml key (`params.yaml: pretrain.lr must be > 0 ...`)."""
    try:
        yield
    except ValueError as err:
        raise ParamsError(f"params.yaml: {section}{separator}{err}") from None


class StageParams:
    """Base of the stages' params dataclasses: validated once, when built, whoever builds them
    (params.yaml through `parse_section`, a test, the domain stage reusing another stage's params)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ParamsError naming the bad `section.key`; types are checked by `parse_section` already."""


def load_params_file(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of stage sections, got {type(data).__name__}")
    return data


#: A number in exponent notation that YAML 1.1 leaves a string (`2e13`, `2.0e13`: no `+` after the e).
YAML11_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE]\d+")


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    """Accept `value` if it fits `annotation` (ints are accepted for floats); raise ParamsError if not."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _check_type(value, option, where)
            except ParamsError:
                continue
        raise ParamsError(f"{where}: {value!r} is not a valid {annotation}")
    if annotation is type(None):
        if value is None:
            return None
        raise ParamsError(f"{where}: expected null, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{where}: expected a list, got {value!r}")
        (item_type, *_) = typing.get_args(annotation) or (Any,)
        return [_check_type(item, item_type, f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value not in typing.get_args(annotation):
            raise ParamsError(f"{where}: {value!r} is not one of {list(typing.get_args(annotation))}")
        return value
    if annotation is Any:
        return value
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):  # a nested mapping
        return parse_section(annotation, where.removeprefix("params.yaml: "), value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str) and YAML11_EXPONENT.fullmatch(value.strip()):
        return float(value)  # `2e13`: YAML 1.1 (PyYAML, DVC) reads an exponent without a sign as a string
    if annotation in (int, float) and isinstance(value, bool):
        raise ParamsError(f"{where}: expected {annotation.__name__}, got a boolean {value!r}")
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise ParamsError(f"{where}: expected {annotation.__name__}, got {type(value).__name__} {value!r}")
    return value


def parse_section(cls: type[T], section: str, values: dict[str, Any] | None) -> T:
    """Build dataclass `cls` from one params.yaml section; unknown keys and wrong types are errors."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ParamsError(f"params.yaml: section '{section}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    for key in unknown:
        _check_not_moved(f"{section}.{key}")
    if unknown:
        raise ParamsError(
            f"params.yaml: unknown key(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
            f"known keys: {', '.join(sorted(fields))}"
        )
    kwargs = {
        name: _check_type(value, hints[name], f"params.yaml: {section}.{name}")
        for name, value in values.items()
    }
    try:
        return cls(**kwargs)  # a StageParams validates itself here
    except TypeError as err:
        raise ParamsError(f"params.yaml: section '{section}': {err}") from None


def load_section(cls: type[T], section: str, params_file: Path) -> T:
    return parse_section(cls, section, load_params_file(params_file).get(section))


def parse_override(assignment: str) -> tuple[list[str], Any]:
    """`normalize.min_words=20` → (["normalize", "min_words"], 20); the value is parsed as YAML."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key or "." not in key:
        raise ParamsError(f"override {assignment!r}: expected section.key=value")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def _assign(params: dict[str, Any], assignment: str) -> None:
    """Apply one `section.key=value` to a params mapping (plain dict or ruamel's commented map)."""
    keys, value = parse_override(assignment)
    _check_not_moved(".".join(keys))
    node = params
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            raise ParamsError(f"override {assignment!r}: params.yaml has no section '{key}'")
        node = node[key]
    node[keys[-1]] = value


def apply_overrides(params: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """A copy of `params` (as loaded from params.yaml) with the assignments applied."""
    updated = copy.deepcopy(params)
    for assignment in assignments:
        _assign(updated, assignment)
    return updated


def _yaml_writer() -> YAML:
    """ruamel configured like params.yaml is written: 2-space maps, indented lists, explicit null."""
    ruamel = YAML()
    ruamel.preserve_quotes = True
    ruamel.indent(mapping=2, sequence=4, offset=2)
    ruamel.representer.add_representer(
        type(None), lambda representer, _: representer.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    return ruamel


def set_overrides(
    params_file: Path,
    assignments: list[str],
    validate: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Write `section.key=value` assignments into params.yaml, keeping its comments and order.

    `validate` sees the would-be params first; if it raises, the file is left untouched.
    """
    if not assignments:
        return
    if validate is not None:
        validate(apply_overrides(load_params_file(params_file), assignments))
    ruamel = _yaml_writer()
    with open(params_file, encoding="utf-8") as handle:
        document = ruamel.load(handle)
    for assignment in assignments:
        _assign(document, assignment)
    with atomic_file(params_file) as handle:
        ruamel.dump(document, handle)
