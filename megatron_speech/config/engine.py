"""A generic engine for a config made of typed dataclass sections: YAML files, `section.key=value` overrides,
plain-dict round trips, `--help` text and the driver command line. Nothing here knows what a section means.

The root is a dataclass whose fields are the sections (themselves dataclasses of typed fields, each followed by
an attribute docstring). Every key is checked against the dataclasses: an unknown section or key, or a value of
the wrong type, is a ValueError naming the dotted key (and close matches). A root may define
`after_assignments(keys)`, called with the dotted keys one source (a file, a mapping, an override) set.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import functools
import inspect
import itertools
import math
import textwrap
import types
from collections.abc import Sequence
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

Root = TypeVar("Root")


class Problems(list[str]):
    """Broken rules, one message each (naming its dotted key); a validation collects them all, then raises."""

    def need(self, ok: bool, msg: str) -> None:
        if not ok:
            self.append(msg)

    def positive(self, section: object, prefix: str, *names: str, allow_zero: bool = False) -> None:
        for name in names:
            v = getattr(section, name)
            ok = v >= 0 if allow_zero else v > 0
            self.need(ok, f"{prefix}.{name}={v} must be {'>= 0' if allow_zero else '> 0'}")

    def raise_if_any(self) -> None:
        if self:
            raise ValueError("invalid configuration:\n  - " + "\n  - ".join(self))


# ------------------------------------------------------------------------------------------------------------
# Schema: sections, field types, attribute docstrings


@functools.cache
def _sections(root: type) -> dict[str, type]:
    hints = get_type_hints(root)
    return {f.name: hints[f.name] for f in dataclasses.fields(root)}


def sections(root: type) -> dict[str, type]:
    """The root's sections, name -> section dataclass, in declaration order."""
    return dict(_sections(root))


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """A section's fields, name -> type (resolved annotations), in declaration order."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal right after each field), from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def all_keys(root: type) -> list[str]:
    """Every dotted key, `section.field`, in declaration order."""
    return [f"{s}.{name}" for s, cls in _sections(root).items() for name in field_types(cls)]


def type_name(tp: Any) -> str:
    """Readable name of a field type: `list[tuple[int, int, int]]`, `float | None`, `one of 'fp32', ...`."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is type(None):
        return "None"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"tuple[{type_name(args[0])}, ...]"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


# ------------------------------------------------------------------------------------------------------------
# Checks every schema gets


def finite_problems(cfg: Any) -> Problems:
    """Every float finite: inf passes lower bounds (and breaks later arithmetic), NaN passes any rule phrased as
    what must not hold, so a validation checks this first and stops there."""
    problems = Problems()
    for section in _sections(type(cfg)):
        for name, value in vars(getattr(cfg, section)).items():
            if any(isinstance(v, float) and not math.isfinite(v)
                   for v in (value if isinstance(value, (list, tuple)) else [value])):
                problems.append(f"{section}.{name}={value} must be a finite number")
    return problems


def choice_problems(cfg: Any) -> Problems:
    """Every Literal-typed field holds one of its choices: checked by type on load, repeated for configs built in
    code."""
    problems = Problems()
    for section, cls in _sections(type(cfg)).items():
        for name, tp in field_types(cls).items():
            if get_origin(tp) is Literal:
                value = getattr(getattr(cfg, section), name)
                problems.need(value in get_args(tp),
                              f"{section}.{name}={value!r} must be one of {list(get_args(tp))}")
    return problems


# ------------------------------------------------------------------------------------------------------------
# Coercion of parsed YAML values to field types


def _type_error(key: str, value: Any, tp: Any, hint: str = "") -> ValueError:
    msg = f"{key}={value!r} ({type(value).__name__}): expected {type_name(tp)}"
    return ValueError(msg + (f"; {hint}" if hint else ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return value converted to type tp, or raise ValueError naming key, the value and the expected type."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        raise _type_error(key, value, tp)
    if origin in (Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() == "none")):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError:
                pass
        raise _type_error(key, value, tp)
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise _type_error(key, value, tp)
    if tp is bool:
        # No 0/1 or "yes"-strings beyond YAML's own booleans: `sequence_parallel=1` is more likely a typo.
        if isinstance(value, bool):
            return value
        raise _type_error(key, value, tp, "write true or false")
    if tp is int:
        if isinstance(value, bool):
            raise _type_error(key, value, tp)
        if isinstance(value, int):
            return value
        # YAML 1.1 reads `1e5` as a string and `1.0e+5` as a float: accept both when integral.
        number = _as_float(value)
        if number is not None and math.isfinite(number) and number.is_integer():
            return int(number)
        raise _type_error(key, value, tp)
    if tp is float:
        if isinstance(value, bool):
            raise _type_error(key, value, tp)
        if isinstance(value, (int, float)):
            return float(value)
        number = _as_float(value)  # `5e-4` is a string to YAML 1.1
        if number is not None:
            return number
        raise _type_error(key, value, tp)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(key, value, tp, "quote it")
    if origin is list:
        (elem,) = args
        if not isinstance(value, (list, tuple)):
            scalar = isinstance(value, (str, int, float)) and not isinstance(value, bool)
            if scalar and get_origin(elem) is None:
                value = [value]  # `data.prefix=/data/en` means a one-element list
            else:
                raise _type_error(key, value, tp, "write a YAML list, e.g. [a, b]")
        return [_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, value, tp, "write tuples as YAML lists, [a, b], not (a, b)")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise _type_error(key, value, tp, f"needs exactly {len(args)} entries")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    raise TypeError(f"{key}: unsupported field type {tp!r}")  # a schema bug, not a user error


def _as_float(value: Any) -> float | None:
    if isinstance(value, str):
        try:
            return float(value.replace("_", ""))
        except ValueError:
            return None
    if isinstance(value, float):
        return value
    return None


# ------------------------------------------------------------------------------------------------------------
# Applying YAML mappings, dicts and overrides


def _unknown_key_error(root: type, key: str, source: str, what: str = "key") -> ValueError:
    keys = all_keys(root)
    candidates = list(_sections(root)) if "." not in key else keys
    close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
    # Right name, wrong (or missing) section: `optim.max_steps`, `max_steps`.
    leaf = key.rsplit(".", 1)[-1]
    close += [k for k in keys if k.rsplit(".", 1)[-1] == leaf and k not in close]
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(f"{source}: unknown {what} {key!r}{hint} (`--help` lists every key)")


def _resolve(root: type, key: str, source: str) -> tuple[str, str, Any]:
    """Split `section.name`; return (section, name, field type). Unknown: ValueError with close matches."""
    secs = _sections(root)
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in secs or parts[1] not in field_types(secs[parts[0]]):
        raise _unknown_key_error(root, key, source)
    section, name = parts
    return section, name, field_types(secs[section])[name]


def _set(cfg: Any, key: str, value: Any, source: str) -> None:
    section, name, tp = _resolve(type(cfg), key, source)
    try:
        coerced = _coerce(value, tp, key)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    setattr(getattr(cfg, section), name, coerced)


def _after_assignments(cfg: Any, keys: set[str]) -> None:
    hook = getattr(cfg, "after_assignments", None)
    if hook is not None:
        hook(keys)


def apply_mapping(cfg: Any, mapping: Any, source: str) -> None:
    """Apply a nested {section: {key: value}} mapping (a YAML file or a stored dict) onto cfg."""
    if mapping is None:
        return
    secs = _sections(type(cfg))
    if not isinstance(mapping, dict):
        raise ValueError(f"{source}: expected a mapping of sections ({', '.join(secs)}), "  # noqa: TRY004
                         f"got {type(mapping).__name__}")
    assigned: set[str] = set()
    for section, values in mapping.items():
        if not isinstance(section, str) or section not in secs:
            raise _unknown_key_error(type(cfg), str(section), source, what="section")
        if values is None:  # `data:` with nothing under it
            continue
        if not isinstance(values, dict):
            raise ValueError(f"{source}: section {section!r} must be a mapping of keys, got {values!r}")  # noqa: TRY004
        for name, value in values.items():
            key = f"{section}.{name}"
            _set(cfg, key, value, source)
            assigned.add(key)
    _after_assignments(cfg, assigned)


def apply_override(cfg: Any, override: str) -> None:
    """Apply one `section.key=value` override; the value is YAML (`[0.9, 1.1]`, `true`, `null`, `5e-4`)."""
    if "=" not in override:
        raise ValueError(f"override {override!r}: expected section.key=value, e.g. train.max_steps=100")
    key, raw = override.split("=", 1)
    key = key.strip()
    source = f"override {override!r}"
    _, _, tp = _resolve(type(cfg), key, source)
    if tp is str and not raw.strip().startswith(("'", '"')):
        value: Any = raw  # a path or name verbatim: `save_dir=runs/007`, `noise_dir=` (empty = off)
    else:
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ValueError(f"{source}: cannot parse the value {raw!r} as YAML ({e.__class__.__name__}); "
                             f"expected {type_name(tp)}") from None
    _set(cfg, key, value, source)
    _after_assignments(cfg, {key})


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ValueError(f"{node.start_mark.name}:{key_node.start_mark.line + 1}: duplicate key {key!r}")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load(root: type[Root], path: str | None, overrides: Sequence[str] = (), base: Root | None = None) -> Root:
    """Dataclass defaults (or a copy of `base`), then the YAML file at path (if any), then each `section.key=value`
    in order. Unknown keys and wrong types raise ValueError naming the dotted key; nothing is validated."""
    cfg = copy.deepcopy(base) if base is not None else root()
    if path is not None:
        with open(path) as f:
            mapping = yaml.load(f, Loader=_StrictLoader)  # a SafeLoader subclass
        apply_mapping(cfg, mapping, path)
    for override in overrides:
        apply_override(cfg, override)
    return cfg


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def to_dict(cfg: Any) -> dict[str, dict[str, Any]]:
    """Nested {section: {key: value}} of plain JSON/YAML types (tuples become lists); see from_dict."""
    return {s: {f.name: _plain(getattr(getattr(cfg, s), f.name)) for f in dataclasses.fields(getattr(cfg, s))}
            for s in _sections(type(cfg))}


def from_dict(root: type[Root], mapping: dict[str, Any], source: str) -> Root:
    """A root from a to_dict mapping (missing keys keep defaults; unknown keys raise ValueError)."""
    cfg = root()
    apply_mapping(cfg, mapping, source)
    return cfg


# ------------------------------------------------------------------------------------------------------------
# Help and command line


def format_help(cfg: Any) -> str:
    """Every dotted key with its type, its value in cfg (and the default when different) and its docstring."""
    lines = ["Configuration keys (override with section.key=value; values are YAML):"]
    defaults = type(cfg)()
    for section, cls in _sections(type(cfg)).items():
        lines.append("")
        lines.append(f"{section}: {(inspect.getdoc(cls) or '').splitlines()[0]}")
        docs = field_docs(cls)
        for name, tp in field_types(cls).items():
            value = _plain(getattr(getattr(cfg, section), name))
            default = _plain(getattr(getattr(defaults, section), name))
            shown = f"{value!r}" + (f" (default {default!r})" if value != default else "")
            lines.append(f"  {section}.{name}: {type_name(tp)} = {shown}")
            lines.append(f"      {docs.get(name, '(undocumented)')}")
    return "\n".join(lines)


def parse_cli(argv: Sequence[str]) -> tuple[str | None, list[str], bool]:
    """Split driver arguments into (config path or None, `key=value` overrides, help requested).

    Accepts `--config PATH`, `--config=PATH`, `--help`/`-h` and `key=value`; anything else is a ValueError.
    """
    config_path: str | None = None
    overrides: list[str] = []
    help_requested = False
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-h", "--help"):
            help_requested = True
        elif arg == "--config" or arg.startswith("--config="):
            if config_path is not None:
                raise ValueError(f"--config given twice ({config_path!r} and {arg!r}): give one file")
            if arg == "--config":
                if i + 1 >= len(args) or args[i + 1].startswith("-"):
                    raise ValueError("--config needs a path: --config configs/NAME.yaml")
                i += 1
                config_path = args[i]
            else:
                config_path = arg.split("=", 1)[1]
        elif "=" in arg and not arg.startswith("-"):
            overrides.append(arg)
        else:
            raise ValueError(f"unexpected argument {arg!r}: expected --config PATH, --help or "
                             "section.key=value")
        i += 1
    return config_path, overrides, help_requested
