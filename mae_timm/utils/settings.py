"""Settings as dataclasses, read from defaults < a YAML file (``--config``) < command-line options.

Every field of a settings dataclass becomes an option: ``blr`` -> ``--blr``, ``batch_size`` -> ``--batch-size``,
booleans get ``--x/--no-x``, dicts take JSON (``--model-kwargs '{"drop_path_rate": 0.1}'``). The YAML file uses
the field names as keys. Model architecture stays in timm kwargs (``model_kwargs``), not here.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import json
import math
import textwrap
import tokenize
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import yaml

from mae_timm.utils.errors import UserError
from mae_timm.utils.files import atomic_write

__all__ = [
    "Allowed", "above", "add_config_arguments", "at_least", "check_settings", "check_warmup",
    "config_from_args", "fraction", "load_config", "one_of", "save_config", "split_outside_braces",
]


class Allowed(NamedTuple):
    """What a setting may be: a test of one value and its wording for the error message."""

    test: Callable[[object], bool]
    text: str


def at_least(low: float) -> Allowed:
    return Allowed(lambda v: v >= low, f"at least {low}")


def above(low: float) -> Allowed:
    return Allowed(lambda v: v > low, f"above {low}")


def fraction(*, zero: bool = False, one: bool = False) -> Allowed:
    """A value between 0 and 1, each end included when asked."""
    return Allowed(lambda v: (0 <= v if zero else 0 < v) and (v <= 1 if one else v < 1),
                   f"in {'[' if zero else '('}0, 1{']' if one else ')'}")


def one_of(*choices) -> Allowed:
    return Allowed(lambda v: v in choices, "one of " + ", ".join(repr(c) for c in choices))


def check_settings(config, rules: dict[str, Allowed], options: dict[str, str] | None = None) -> None:
    """Raise UserError naming the first setting of ``config`` outside its rule (None passes: optional settings;
    each item of a tuple is checked). Settings dataclasses call this once, when they are built. ``options``: the
    command-line option of a field where it is not ``--field-name``."""
    for name, allowed in rules.items():
        value = getattr(config, name)
        if value is not None and not all(allowed.test(v) for v in (value if isinstance(value, tuple) else (value,))):
            option = (options or {}).get(name, _option_name(name))
            raise UserError(f"setting {name} ({option}) is {value!r}; it must be {allowed.text}")



def split_outside_braces(text: str) -> list[str]:
    """Comma-separated items, split at the commas outside ``{...}`` and stripped: ``a,b{c,d}`` -> ``a``, ``b{c,d}``
    (arm settings, brace patterns of shard names)."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    return [item.strip() for item in [*items, text[start:]] if item.strip()]


def check_warmup(warmup: int, total: int, unit: str = "epochs") -> int:
    """The one warmup rule: 0 <= warmup < total, so the cosine decay after it gets at least one ``unit``."""
    if not 0 <= warmup < total:
        raise UserError(
            f"warmup of {warmup} {unit} must be at least 0 and below the {total} {unit} of the schedule: "
            "the cosine decay after the warmup needs at least one"
        )
    return warmup


def _option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _strip_optional(tp):
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(name: str, tp, value):
    """Turn a YAML or command-line value into the field's type, with a one-line error naming the setting."""
    tp, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise UserError(f"setting '{name}' cannot be empty")
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if tp in (int, float, str):
            if tp is not str and isinstance(value, bool):  # YAML `true` is not the number 1
                raise ValueError(value)
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if tp is float and not math.isfinite(float(value)):  # nan / inf: no setting means that
                raise ValueError(value)
            if tp is int and not -(2**63) <= int(value) < 2**63:  # beyond int64 no tensor or index can hold it
                raise ValueError(value)
            return tp(value)
        if tp is dict or typing.get_origin(tp) is dict:
            value = json.loads(value) if isinstance(value, str) else value
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
        if typing.get_origin(tp) is tuple:
            item_types = typing.get_args(tp)
            value = value.split(",") if isinstance(value, str) else value
            if len(value) != len(item_types):
                raise ValueError(value)
            return tuple(_coerce(name, t, v) for t, v in zip(item_types, value, strict=True))
    except (TypeError, ValueError, json.JSONDecodeError):
        raise UserError(f"setting '{name}': cannot read {value!r} as {getattr(tp, '__name__', tp)}") from None
    raise TypeError(f"setting '{name}': unsupported type {tp}")


class _PlainLoader(yaml.SafeLoader):
    """``yaml.safe_load`` without aliases (``&a`` / ``*a``: a 600-byte file can expand to gigabytes) and without
    duplicate keys (the last one would win in silence)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"aliases (*{event.anchor}) are not read, at line {event.start_mark.line + 1}")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.YAMLError(f"the key {key!r} is given twice, at line {key_node.start_mark.line + 1}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # installed with the package


def resolve_config_path(path: str | Path) -> Path:
    """A YAML file, or a shipped config by name from any folder: ``fashion_mnist_late``, ``fashion_mnist_late.yaml``
    and ``configs/fashion_mnist_late.yaml`` (a path relative to the package folder) all name
    ``mae_timm/configs/fashion_mnist_late.yaml``."""
    path = Path(path)
    if path.is_file():
        return path
    shipped = SHIPPED_CONFIGS / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml")))
    raise FileNotFoundError(f"config file {path} does not exist, nor is it a shipped config ({names})")


def load_config(cls, path: str | Path | None = None, overrides: dict | None = None):
    """Build ``cls`` from its defaults, then the YAML file at ``path``, then ``overrides`` (field name -> value)."""
    types_ = _field_types(cls)
    values = {}
    if path is not None:
        path = resolve_config_path(path)
        try:
            loaded = yaml.load(path.read_text(), Loader=_PlainLoader) or {}
        except yaml.YAMLError as e:  # a syntax error, or a tag (!!python/...) that safe_load refuses
            problem = getattr(e, "problem", None) or (str(e) if type(e) is yaml.YAMLError else type(e).__name__)
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise UserError(f"config file {path} is not plain YAML: {problem}{where}") from None
        if not isinstance(loaded, dict):
            raise UserError(f"config file {path} must hold a mapping of setting: value")
        values.update(loaded)
    values.update(overrides or {})
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise UserError(f"unknown setting(s) {', '.join(unknown)}; valid: {', '.join(types_)}")
    return cls(**{name: _coerce(name, types_[name], value) for name, value in values.items()})


@functools.cache
def field_comments(cls) -> dict[str, str]:
    """Each field's comment in the source of ``cls`` (and its dataclass bases): the trailing ``# ...`` on the field's
    line, else the comment lines directly above it. The options' help is written once, where the field is."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            lines, _ = inspect.getsourcelines(klass)
        except (OSError, TypeError):
            continue
        by_line = {tok.start[0]: tok.string.lstrip("#").strip()
                   for tok in tokenize.generate_tokens(io.StringIO("".join(lines)).readline)
                   if tok.type == tokenize.COMMENT}
        body = ast.parse(textwrap.dedent("".join(lines))).body[0].body
        for node in body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                text = by_line.get(node.end_lineno)
                if text is None:  # no trailing comment: the comment lines directly above
                    above, line = [], node.lineno - 1
                    while line in by_line and lines[line - 1].lstrip().startswith("#"):
                        above.insert(0, by_line[line])
                        line -= 1
                    text = " ".join(above) or None
                if text:
                    comments[node.target.id] = text
    return comments


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Add ``--config`` and one option per field of ``cls`` (help = the field's comment, then its default)."""
    parser.add_argument("--config", default=None, help="YAML file of settings, or a shipped config's name (e.g. "
                        "fashion_mnist_late; command-line options override it)")
    defaults = {f.name: f for f in dataclasses.fields(cls)}
    for name, tp in _field_types(cls).items():
        f = defaults[name]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        base, _ = _strip_optional(tp)
        about = field_comments(cls).get(name)
        kwargs = dict(dest=name, default=argparse.SUPPRESS,
                      help=f"{about} (default: {default})".replace("%", "%%") if about else f"default: {default}")
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is tuple:
            kwargs["nargs"] = len(typing.get_args(base))
            kwargs["metavar"] = tuple(t.__name__.upper() for t in typing.get_args(base))
        else:
            kwargs["metavar"] = "JSON" if base is dict else getattr(base, "__name__", "VALUE").upper()
        parser.add_argument(_option_name(name), **kwargs)


def config_from_args(cls, args: argparse.Namespace):
    """The settings given by ``--config`` plus the options the user typed (others keep the file's or defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    overrides = {name: value for name, value in vars(args).items() if name in names}
    return load_config(cls, getattr(args, "config", None), overrides)


def save_config(config, path: str | Path) -> None:
    """Write ``config`` as YAML that ``load_config`` reads back to an equal object."""
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
    with atomic_write(path, "w") as f:
        f.write(yaml.safe_dump(values, sort_keys=False))
