"""The resolved options of one audit and of the release gate, as frozen dataclasses.

The CLI and the Python API both build an :class:`AuditConfig` and hand it to the engine; the
resolved values are written into summary.json so a run can be reproduced from its report.
:class:`GateConfig` holds the gate's thresholds (checked by :mod:`eqaudit.gate`).

:func:`resolve_config` merges the sources, highest first: command line, environment variables
``EQAUDIT_<OPTION>`` (e.g. ``EQAUDIT_FAIL_UNDER=90``), the config file (``[tool.eqaudit]`` in
``pyproject.toml`` or an ``eqaudit.toml``, the nearest in the current folder or above it, or
``--config FILE``), then the defaults.
"""

from __future__ import annotations

import difflib
import json
import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from eqaudit.errors import ConfigError, EqauditError, UsageError

OUTPUT_KINDS = ("auto", "logits", "probs")
#: How misaligned (layer, element) pairs are compared (:mod:`eqaudit.transforms.geometry`):
#: ``flag`` on the map's own grid, reported but kept out of layer scores; ``resample`` about the
#: true grid (approximate); ``skip`` not compared.
MISALIGNED_MODES = ("flag", "resample", "skip")
#: Where rotations by other angles are compared: ``exclude`` the cells that read padding
#: (DESIGN.md section 4; :mod:`eqaudit.grids`, "Padding-free cells"), or ``include`` them.
PADDING_BORDER_MODES = ("exclude", "include")


def parse_input_size(text: str | int | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"224"`` -> (224, 224); ``"48x192"`` -> (48, 192) (height x width)."""
    if text is None:
        return None
    if isinstance(text, (tuple, list)) and len(text) == 2:
        size = tuple(text)
    elif isinstance(text, int) and not isinstance(text, bool):
        size = (text, text)
    else:
        match = re.fullmatch(r"\s*(\d+)\s*(?:[xX,]\s*(\d+))?\s*", text)
        if not match:
            raise UsageError(
                f"--input-size '{text}' is not a size: write N for a square input or HxW, "
                "e.g. 48x192 (or aligned, aligned:N)"
            )
        h = int(match.group(1))
        size = (h, int(match.group(2)) if match.group(2) else h)
    if min(size) < 1 or max(size) > 16384:
        raise UsageError(f"--input-size {size[0]}x{size[1]} is out of range (1..16384 per side)")
    return (int(size[0]), int(size[1]))


def split_input_size(
    value: str | int | tuple[int, int] | None,
) -> tuple[tuple[int, int] | None, bool]:
    """``--input-size`` -> (size, aligned): ``224`` -> ((224, 224), False); ``aligned`` ->
    (None, True); ``aligned:225`` / ``aligned:48x192`` -> ((225, 225), True), the size the
    search for an aligned size starts from."""
    if isinstance(value, str) and value.strip().lower().startswith("aligned"):
        rest = value.strip()[len("aligned") :]
        if not rest:
            return None, True
        if not rest.startswith(":"):
            raise UsageError(
                f"--input-size '{value}' is not a size: write aligned, aligned:N or aligned:HxW"
            )
        return parse_input_size(rest[1:]), True
    return parse_input_size(value), False


def _int_like(value: Any) -> Any:
    """numpy integers as ints; a float size is refused (16.5 was cut to 16)."""
    if isinstance(value, (list, tuple)):
        return tuple(_int_like(v) for v in value)
    if isinstance(value, float) or (hasattr(value, "dtype") and value.dtype.kind == "f"):
        raise UsageError(f"--input-size takes whole pixels, not {value}")
    return int(value) if hasattr(value, "dtype") else value


def parse_shard(value: str | tuple[int, int] | list | None) -> tuple[int, int] | None:
    """``"2/8"`` -> (2, 8): the second of eight slices (1-based, as Slurm array indices)."""
    if value is None:
        return None
    if isinstance(value, (tuple, list)) and len(value) == 2:
        index, total = (int(v) for v in value)
    else:
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(value))
        if not match:
            raise UsageError(f"--shard '{value}' is not I/N: write e.g. --shard 2/8 (1-based)")
        index, total = int(match.group(1)), int(match.group(2))
    if not 1 <= index <= total:
        raise UsageError(f"--shard {index}/{total}: I must be between 1 and N")
    return (index, total)


def format_input_size(size: tuple[int, int] | None, aligned: bool) -> str | None:
    """The inverse of :func:`split_input_size` (for printing a resolved configuration)."""
    text = f"{size[0]}x{size[1]}" if size else None
    if aligned:
        return f"aligned:{text}" if text else "aligned"
    return text


#: The largest --seed: the largest int64.
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class AuditConfig:
    """Every option that changes the numbers of an audit."""

    transforms: str = "d4"
    shift_mode: str = "crop"
    # model
    factory: str | None = None
    trust_pickle: bool = False
    input_name: str | None = None
    output_name: str | None = None
    layout: str | None = None
    providers: tuple[str, ...] = ()
    input_size: tuple[int, int] | None = None
    #: --input-size aligned: pick the nearest size at which every strided layer is aligned
    align_input: bool = False
    outputs: str = "auto"
    # data
    data: str | None = None
    labels: str | None = None
    num_images: int | None = None
    seed: int = 0
    # preprocessing
    preset: str | None = None
    resize: str | None = None
    channels: str | None = None
    scale: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    # engine
    layers: bool = True
    layer_patterns: tuple[str, ...] = field(default_factory=tuple)
    #: images per forward call, all elements included; None: 64 on the CPU, from free memory
    #: on a GPU
    batch_size: int | None = None
    #: where the model runs: cpu, cuda, cuda:N (eqaudit.device)
    device: str = "cpu"
    #: CPU threads for the model and the comparisons: torch's intra-op threads during the
    #: audit and onnxruntime's; None: torch's setting as it is, onnxruntime's default (one per
    #: physical core), both kept within a container's CPU limit. The numbers do not depend on
    #: it (summary.run.cpu_threads records it).
    threads: int | None = None
    #: how (layer, element) pairs whose grid is not mapped onto itself are compared
    misaligned: str = "flag"
    #: rotations by other angles: compare only the cells that read no padding, or all of the disk
    padding_border: str = "exclude"
    #: Lie derivatives of the outputs (and per-layer attribution for PyTorch models)
    lie: bool = False
    #: also fit a 1x1 channel map per (layer, element) (equivariance up to channel permutation)
    channel_map: bool = False
    #: (I, N): audit only the I-th of N deterministic slices of the images (1-based), and save a
    #: mergeable state beside the report (eqaudit merge)
    shard: tuple[int, int] | None = None
    # declared label action: ((element, action), ...), see eqaudit/transforms/labels.py
    label_action: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        # From Python: the forms the command line takes as text (input_size=224, output_name=1,
        # mean="0.5,0.5,0.5", transforms=["d4", "rot:30"], device=torch.device("cuda")).
        if self.input_size is not None:
            size, align = split_input_size(_int_like(self.input_size))
            object.__setattr__(self, "input_size", size)
            object.__setattr__(self, "align_input", align or self.align_input)
        if self.shard is not None:
            object.__setattr__(self, "shard", parse_shard(self.shard))
        action = self.label_action
        if isinstance(action, Mapping):
            action = tuple((str(k), str(v)) for k, v in action.items())
        elif isinstance(action, str):
            action = (action,)
        if action and all(isinstance(a, str) for a in action):  # ("rot90=1,2,3,0", ...)
            from eqaudit.transforms.labels import parse_label_action_options

            action = parse_label_action_options(list(action))
        object.__setattr__(self, "label_action", tuple(tuple(a) for a in action or ()))
        if self.output_name is not None and not isinstance(self.output_name, str):
            object.__setattr__(self, "output_name", str(self.output_name))
        if isinstance(self.transforms, (list, tuple)):
            object.__setattr__(self, "transforms", ",".join(map(str, self.transforms)))
        if not isinstance(self.device, str):
            object.__setattr__(self, "device", str(self.device))
        for key in ("mean", "std"):
            value = getattr(self, key)
            if isinstance(value, str):
                try:
                    floats = tuple(float(v) for v in value.split(","))
                except ValueError:
                    raise UsageError(
                        f"{key}={value!r} is not a list of numbers, e.g. 0.485,0.456,0.406"
                    ) from None
                object.__setattr__(self, key, floats)
            elif isinstance(value, (int, float)):
                object.__setattr__(self, key, (float(value),))
            elif value is not None:
                object.__setattr__(self, key, tuple(value))
        for key in ("providers", "layer_patterns"):  # (comma lists, as on the command line)
            value = getattr(self, key) or ()
            items = value.split(",") if isinstance(value, str) else list(value)
            object.__setattr__(self, key, tuple(i.strip() for i in items if i.strip()))
        if self.outputs not in OUTPUT_KINDS:
            raise UsageError(
                f"--outputs must be one of {', '.join(OUTPUT_KINDS)}, not '{self.outputs}'"
            )
        if self.batch_size is not None and self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, not {self.batch_size}")
        if self.threads is not None and (
            isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1
        ):
            raise UsageError(f"--threads must be a whole number of at least 1, not {self.threads}")
        if self.num_images is not None and self.num_images < 1:
            raise UsageError(f"--num-images must be at least 1, not {self.num_images}")
        if (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, numbers.Integral)
            or not 0 <= self.seed <= MAX_SEED
        ):
            # (torch's generators take 64-bit seeds and numpy's no negative one: int64's range
            # fits both, and every file that records the seed)
            raise UsageError(
                f"--seed must be a whole number from 0 to {MAX_SEED} (2**63 - 1), not {self.seed}"
            )
        if not isinstance(self.layers, bool):  # (audit(layers=["conv*"]) meant the patterns)
            raise UsageError(
                f"layers= is True or False (all layers or none), not {self.layers!r}: pick "
                "layers with layer_patterns=[...] (--layers on the command line)"
            )
        if not self.layers and self.layer_patterns:
            raise UsageError("--layers and --no-layers contradict each other: keep one")
        if self.misaligned not in MISALIGNED_MODES:
            raise UsageError(
                f"--misaligned must be one of {', '.join(MISALIGNED_MODES)}, not '{self.misaligned}'"
            )
        if self.padding_border not in PADDING_BORDER_MODES:
            raise UsageError(
                f"--padding-border must be one of {', '.join(PADDING_BORDER_MODES)}, not "
                f"'{self.padding_border}'"
            )
        if self.shard is not None:
            index, total = self.shard
            if not (isinstance(index, int) and isinstance(total, int) and 1 <= index <= total):
                raise UsageError(
                    f"--shard must be I/N with 1 <= I <= N, not {index}/{total}: e.g. --shard 2/8"
                )
        if self.channel_map and not self.layers:
            raise UsageError("--channel-map needs per-layer results: drop --no-layers")

    def to_dict(self) -> dict:
        """The options as the summary records them. ``threads`` is left to the run block (how
        the audit ran, not what it measured): shards run on different machines merge, and a
        baseline made on another machine compares."""
        d = asdict(self)
        del d["threads"]
        d["providers"] = list(self.providers)
        d["layer_patterns"] = list(self.layer_patterns)
        d["label_action"] = {name: action for name, action in self.label_action}
        for key in ("input_size", "mean", "std", "shard"):
            if d[key] is not None:
                d[key] = list(d[key])
        return d


# -- gate thresholds -------------------------------------------------------------------------------
#: ``((pattern, value), ...)``: a transform-element or layer glob and its threshold. ``*`` is the
#: global value; see :func:`eqaudit.gate.assign` for which pattern applies to a name.
Thresholds = tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class GateConfig:
    """The release gate's thresholds (how each is checked: :mod:`eqaudit.gate`)."""

    fail_under: float | None = None
    min_agreement: Thresholds = ()
    max_js: Thresholds = ()
    max_layer_error: Thresholds = ()
    confidence: float | None = None
    baseline: str | None = None
    save_baseline: str | None = None
    max_regression: float | None = None

    def __post_init__(self) -> None:
        if self.fail_under is not None and not 0 <= self.fail_under <= 100:
            raise UsageError(f"--fail-under is a score from 0 to 100, not {self.fail_under:g}")
        for option, pairs, top in (
            ("--min-agreement", self.min_agreement, 1.0),
            ("--max-js", self.max_js, 1.0),
            ("--max-layer-error", self.max_layer_error, None),
        ):
            for pattern, value in pairs:
                if value < 0 or (top is not None and value > top) or value != value:
                    limit = f"0 to {top:g}" if top is not None else "0 or more"
                    raise UsageError(f"{option} {pattern}={value:g}: the threshold must be {limit}")
        if self.confidence is not None and not 0 < self.confidence < 1:
            raise UsageError(
                f"--confidence is a level between 0 and 1 (e.g. 0.95), not {self.confidence:g}"
            )
        if self.confidence is not None and not self.min_agreement:
            raise UsageError(
                "--confidence applies to --min-agreement checks, and none is given: add "
                "--min-agreement VALUE or drop --confidence"
            )
        if self.max_regression is not None:
            if not 0 <= self.max_regression <= 1:  # (NaN fails too)
                raise UsageError(
                    "--max-regression is a worsening on the 0-1 scale of agreement and JS "
                    f"divergence (0.02: two points), from 0 to 1, not {self.max_regression:g}"
                )
            if self.baseline is None:
                raise UsageError(
                    "--max-regression needs --baseline FILE (a file written by --save-baseline)"
                )

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("min_agreement", "max_js", "max_layer_error"):
            d[key] = dict(getattr(self, key))
        return d


#: The gate's option names (``check`` and ``merge`` take them all; a shard run none).
GATE_OPTIONS = frozenset(f.name for f in fields(GateConfig))


# -- configuration files and environment -----------------------------------------------------------
ENV_PREFIX = "EQAUDIT_"
CONFIG_FILE = "eqaudit.toml"
PYPROJECT = "pyproject.toml"
SOURCES = ("default", "config file", "environment", "command line")


@dataclass(frozen=True)
class _Option:
    kind: str  # str, path, factory, int, float, bool, floats, strs, size, thresholds
    default: Any = None
    separator: str = ","  # between list items in an environment variable or a string


#: Options that can come from a config file or the environment (names as in ``eqaudit check``,
#: with ``_`` for ``-``). ``--trust-pickle`` is deliberately absent: allowing a model file to run
#: code must be said on the command line, never inherited from a file or the environment.
OPTIONS: dict[str, _Option] = {
    "transforms": _Option("str", "d4"),
    "shift_mode": _Option("str", "crop"),
    "data": _Option("path"),
    "labels": _Option("path"),
    "num_images": _Option("int"),
    "seed": _Option("int", 0),
    "preset": _Option("str"),
    "resize": _Option("str"),
    "channels": _Option("str"),
    "scale": _Option("float"),
    "mean": _Option("floats"),
    "std": _Option("floats"),
    "outputs": _Option("str", "auto"),
    "layers": _Option("strs", ()),
    "no_layers": _Option("bool", False),
    "batch_size": _Option("int"),
    "device": _Option("str", "cpu"),
    "threads": _Option("int"),
    "label_action": _Option("strs", (), separator=";"),
    "factory": _Option("factory"),
    "input_name": _Option("str"),
    "output_name": _Option("str"),
    "layout": _Option("str"),
    "input_size": _Option("size"),
    "misaligned": _Option("str", "flag"),
    "padding_border": _Option("str", "exclude"),
    "lie": _Option("bool", False),
    "channel_map": _Option("bool", False),
    "shard": _Option("shard"),
    "providers": _Option("strs", ()),
    "out": _Option("path"),
    "fail_under": _Option("float"),
    "min_agreement": _Option("thresholds", ()),
    "max_js": _Option("thresholds", ()),
    "max_layer_error": _Option("thresholds", ()),
    "confidence": _Option("float"),
    "baseline": _Option("path"),
    "save_baseline": _Option("path"),
    "max_regression": _Option("float"),
}
#: Command-line-only switches: never read from a file or the environment.
CLI_ONLY = ("trust_pickle", "config", "print_config", "suggest_label_action")


def _toml_loads(text: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    return tomllib.loads(text)


def _read_toml(path: Path) -> dict:
    try:
        return _toml_loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file '{path}': {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{path}' is not UTF-8 text") from None
    except ValueError as exc:  # tomllib.TOMLDecodeError
        raise ConfigError(f"config file '{path}' is not valid TOML: {exc}") from None


def find_config_file(start: Path) -> Path | None:
    """The nearest ``eqaudit.toml``, or ``pyproject.toml`` with a ``[tool.eqaudit]`` table, in
    ``start`` or a folder above it (``eqaudit.toml`` wins within one folder)."""
    start = Path(start).resolve()
    for folder in (start, *start.parents):
        candidate = folder / CONFIG_FILE
        if candidate.is_file():
            return candidate
        pyproject = folder / PYPROJECT
        if pyproject.is_file():
            try:
                text = pyproject.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            # Parse only files that mention the table: a broken pyproject.toml of an unrelated
            # project above us is not our business.
            if "tool.eqaudit" in text and "eqaudit" in _read_toml(pyproject).get("tool", {}):
                return pyproject
    return None


def load_config_file(path: Path) -> dict:
    """The eqaudit table of a config file: ``[tool.eqaudit]`` of a pyproject.toml (or of any file
    that has one), else the whole file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist: check the --config path")
    data = _read_toml(path)
    tool = data.get("tool")
    if isinstance(tool, dict) and "eqaudit" in tool:
        table = tool["eqaudit"]
    elif path.name == PYPROJECT:
        raise ConfigError(f"'{path}' has no [tool.eqaudit] table: add one or pass another --config")
    else:
        table = data
    if not isinstance(table, dict):
        raise ConfigError(f"[tool.eqaudit] in '{path}' must be a table of options")
    return table


def _option_name(key: str) -> str:
    return key.strip().replace("-", "_").lower()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _as_list(value: Any, separator: str) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        return [v.strip() for v in value.split(separator) if v.strip()]
    return [value]


def _coerce(name: str, value: Any, where: str, base: Path | None) -> Any:
    """One option's value (from TOML, an environment string, or the parsed command line) in
    canonical form. ``base``: the config file's folder, for relative paths in the file."""
    option = OPTIONS[name]
    kind = option.kind
    error = ConfigError if where != _flag(name) else UsageError

    def bad(expected: str) -> EqauditError:
        return error(f"{where} = {value!r} is not {expected}")

    if isinstance(value, Path):
        value = str(value)
    if kind in ("str", "path", "factory"):
        if not isinstance(value, str):
            raise bad("a string")
        if kind == "path" and not value.strip():  # (an unset variable written in, $OUT)
            raise bad("a path: an empty one would mean the current folder")
        if base is not None and kind == "path":
            value = _relative_to(base, value)
        if base is not None and kind == "factory":
            file, sep, func = value.rpartition(":")
            if sep and file.endswith(".py"):
                value = f"{_relative_to(base, file)}:{func}"
        return value
    if kind == "int":
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise bad("a whole number") from None
    if kind == "float":
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise bad("a number") from None
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise bad("true or false")
    if kind == "floats":
        try:
            return tuple(float(v) for v in _as_list(value, ","))
        except (TypeError, ValueError):
            raise bad("a list of numbers, e.g. 0.485,0.456,0.406") from None
    if kind == "strs":
        items = _as_list(value, option.separator)
        if name == "label_action" and isinstance(value, dict):
            items = [f"{k}={v}" for k, v in value.items()]
        if not all(isinstance(v, str) for v in items):
            raise bad("a list of strings")
        return tuple(items)
    if kind == "size":
        if isinstance(value, (list, tuple)) and len(value) == 2:
            value = f"{value[0]}x{value[1]}"
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise bad("a size N or HxW")
        try:
            size, aligned = split_input_size(value)
            return format_input_size(size, aligned) if aligned else size
        except UsageError as exc:
            if error is UsageError:
                raise
            raise ConfigError(f"{where}: {exc}") from None
    if kind == "shard":
        try:
            return parse_shard(value)
        except UsageError as exc:
            if error is UsageError:
                raise
            raise ConfigError(f"{where}: {exc}") from None
    if kind == "thresholds":
        return _thresholds(value, where, error)
    raise AssertionError(kind)


def _relative_to(base: Path, value: str) -> str:
    """A path written in a config file is relative to the file's folder."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    joined = base / path
    try:
        return os.path.relpath(joined)
    except ValueError:  # another drive on Windows
        return str(joined)


def _thresholds(value: Any, where: str, error: type[EqauditError]) -> dict[str, float]:
    """``0.9`` | ``"0.9,rot90=0.8"`` | ``["rot*=0.9"]`` | ``{"*" = 0.9, rot90 = 0.8}`` -> map."""
    if isinstance(value, dict):
        items = [(str(k), v, f"{k}={v}") for k, v in value.items()]
    else:
        items = []
        for item in _as_list(value, ","):
            if isinstance(item, str) and "=" in item:
                pattern, _, number = item.rpartition("=")
                items.append((pattern.strip(), number.strip(), item))
            else:
                items.append(("*", item, item))
    out: dict[str, float] = {}
    for pattern, number, given in items:  # given: the item as the user wrote it
        try:
            if isinstance(number, bool) or not pattern:
                raise ValueError
            number = float(number)
        except (TypeError, ValueError):
            raise error(
                f"{where}: '{given}' is not PATTERN=VALUE or a number; write e.g. "
                "0.9 (every element) or rot90=0.9 or 'layer3.*=0.05'"
            ) from None
        out.pop(pattern, None)  # given again: last, so it wins ties among globs
        out[pattern] = number
    return out


@dataclass(frozen=True)
class ResolvedConfig:
    """Every option of one command after merging command line > environment > file > defaults."""

    audit: AuditConfig
    gate: GateConfig
    out: str | None
    values: dict[str, Any]
    sources: dict[str, str]
    config_file: str | None = None
    warnings: tuple[str, ...] = ()

    def to_toml(self) -> str:
        """The resolved options as a ``[tool.eqaudit]`` table, each with its source."""
        where = self.config_file or "none found"
        lines = [
            "# eqaudit: resolved configuration (command line > environment > config file > "
            "defaults)",
            f"# config file: {where}",
            "[tool.eqaudit]",
        ]
        for name in OPTIONS:
            value = self.values[name]
            key = name.replace("_", "-")
            source = self.sources[name]
            if value is None or (value == () and OPTIONS[name].kind != "thresholds"):
                lines.append(f"# {key} = (not set)")
            else:
                lines.append(f"{key} = {_toml_value(value)}  # {source}")
        if self.audit.trust_pickle:
            lines.append("# trust-pickle: on (command line only)")
        return "\n".join(lines) + "\n"


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        inner = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"


def resolve_config(
    cli: Mapping[str, Any] | None = None,
    *,
    config_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
) -> ResolvedConfig:
    """Merge the options: command line > environment (``EQAUDIT_<OPTION>``) > config file >
    defaults.

    ``cli`` holds only the options given on the command line (names as in :data:`OPTIONS`, plus
    ``trust_pickle``). The config file is ``config_file``, else ``$EQAUDIT_CONFIG``, else the
    nearest ``eqaudit.toml`` / ``pyproject.toml`` with ``[tool.eqaudit]`` from ``cwd`` upward.
    Paths in a file are relative to the file's folder. Threshold maps (``min_agreement``,
    ``max_js``, ``max_layer_error``) merge pattern by pattern, the higher source winning.
    """
    cli = dict(cli or {})
    environ = os.environ if environ is None else environ
    cwd = Path.cwd() if cwd is None else Path(cwd)
    warnings: list[str] = []

    # The config file.
    if config_file is None and environ.get(ENV_PREFIX + "CONFIG"):
        config_file = environ[ENV_PREFIX + "CONFIG"]
    path = Path(config_file) if config_file is not None else find_config_file(cwd)
    if path is not None and not path.is_absolute():
        path = cwd / path
    file_values: dict[str, Any] = {}
    label = None
    if path is not None:
        table = load_config_file(path)
        try:
            label = os.path.relpath(path, cwd)
        except ValueError:  # another drive on Windows
            label = str(path)
        if path.name == PYPROJECT or "tool" in table:
            label += " [tool.eqaudit]"
        for key, value in table.items():
            name = _option_name(key)
            if name in CLI_ONLY:
                raise ConfigError(
                    f"'{key}' in {label} can only be given on the command line"
                    + (" (it lets a model file run code)" if name == "trust_pickle" else "")
                )
            if name not in OPTIONS:
                close = difflib.get_close_matches(name, list(OPTIONS), n=1)
                hint = f": did you mean '{close[0].replace('_', '-')}'?" if close else ""
                raise ConfigError(f"unknown option '{key}' in {label}{hint}")
            if name in file_values:
                raise ConfigError(f"option '{key}' is given twice in {label}")
            file_values[name] = _coerce(name, value, f"'{key}' in {label}", path.parent)

    # The environment.
    env_values: dict[str, Any] = {}
    for variable, value in sorted(environ.items()):
        if not variable.startswith(ENV_PREFIX) or variable == ENV_PREFIX + "CONFIG":
            continue
        name = variable[len(ENV_PREFIX) :].lower()
        if name == "trust_pickle":
            raise ConfigError(
                f"{variable} is refused: allowing a model file to run code must be said on the "
                "command line (--trust-pickle)"
            )
        if name not in OPTIONS:
            # An error, as in a config file: a misspelt EQAUDIT_FAIL_UNDER would turn a CI
            # gate off with nothing but a warning in the log.
            close = difflib.get_close_matches(name, list(OPTIONS), n=1)
            hint = f": did you mean {ENV_PREFIX}{close[0].upper()}?" if close else ""
            raise ConfigError(
                f"environment variable {variable} is not an eqaudit option{hint} (unset it; "
                "'eqaudit check --print-config' lists the options)"
            )
        env_values[name] = _coerce(name, value, variable, None)

    cli_values = {
        name: _coerce(name, value, _flag(name), None)
        for name, value in cli.items()
        if name in OPTIONS and value is not None
    }

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    layers = (
        ("default", {n: o.default for n, o in OPTIONS.items()}),
        ("config file", file_values),
        ("environment", env_values),
        ("command line", cli_values),
    )
    for name, option in OPTIONS.items():
        if option.kind == "thresholds":
            merged: dict[str, float] = {}
            given = []
            for source, layer in layers[1:]:
                for pattern, number in (layer.get(name) or {}).items():
                    merged.pop(pattern, None)  # re-inserted last: it wins ties among globs
                    merged[pattern] = number
                    if source not in given:
                        given.append(source)
            values[name] = merged
            sources[name] = " + ".join(given) or "default"
            continue
        for source, layer in layers:
            if name in layer:
                values[name], sources[name] = layer[name], source

    v = values
    if v["no_layers"] and v["max_layer_error"]:
        raise UsageError("--max-layer-error needs per-layer results: drop --no-layers")
    from eqaudit.transforms.labels import parse_label_action_options

    input_size, align_input = split_input_size(v["input_size"])
    audit = AuditConfig(
        transforms=v["transforms"],
        shift_mode=v["shift_mode"],
        factory=v["factory"],
        trust_pickle=bool(cli.get("trust_pickle", False)),
        input_name=v["input_name"],
        output_name=v["output_name"],
        layout=v["layout"],
        providers=tuple(v["providers"]),
        input_size=input_size,
        align_input=align_input,
        outputs=v["outputs"],
        data=v["data"],
        labels=v["labels"],
        num_images=v["num_images"],
        seed=v["seed"],
        preset=v["preset"],
        resize=v["resize"],
        channels=v["channels"],
        scale=v["scale"],
        mean=v["mean"],
        std=v["std"],
        layers=not v["no_layers"],
        layer_patterns=tuple(v["layers"]),
        batch_size=v["batch_size"],
        device=v["device"],
        threads=v["threads"],
        misaligned=v["misaligned"],
        padding_border=v["padding_border"],
        lie=bool(v["lie"]),
        channel_map=bool(v["channel_map"]),
        shard=v["shard"],
        label_action=parse_label_action_options(list(v["label_action"])),
    )
    gate = GateConfig(
        fail_under=v["fail_under"],
        min_agreement=tuple(v["min_agreement"].items()),
        max_js=tuple(v["max_js"].items()),
        max_layer_error=tuple(v["max_layer_error"].items()),
        confidence=v["confidence"],
        baseline=v["baseline"],
        save_baseline=v["save_baseline"],
        max_regression=v["max_regression"],
    )
    return ResolvedConfig(
        audit=audit,
        gate=gate,
        out=v["out"],
        values=values,
        sources=sources,
        config_file=label,
        warnings=tuple(warnings),
    )
