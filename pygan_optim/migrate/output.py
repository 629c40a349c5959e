"""Writing and reporting: the 1.x config file's text, its header, and the self-checks.

``render`` gives deterministic Python source; ``check`` proves the text loads
with ``mmengine.Config.fromfile`` to exactly ``result.config`` and, with
``build=True``, that the model and its optim_wrapper build (for the families
pygan_optim implements, on plain MMEngine). ``write`` saves the text.
"""
from __future__ import annotations

import copy
import errno
import keyword
import math
import os
import re
import secrets
import tempfile
import textwrap
from typing import Any, List

from .common import MigrationError, MigrationResult

#: Line width of the rendered config.
WIDTH = 79

#: Types a migrated config can name that only MMagic registers (none is ours).
MMAGIC_ONLY = ("PGGANOptimWrapperConstructor", "SinGANOptimWrapperConstructor",
               "LinearLrInterval", "RampUpEMA")


def _key_ok(k: Any) -> bool:
    return isinstance(k, str) and k.isidentifier() and not keyword.iskeyword(k)


def _fmt_scalar(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "float('nan')"
        if math.isinf(v):
            return "float('inf')" if v > 0 else "float('-inf')"
    if isinstance(v, (str, bytes, int, float, type(None))):
        return repr(v)
    return _without_addresses(repr(v))  # another object: a lambda kept as a comment


def _without_addresses(text: str) -> str:
    """Object reprs without their memory addresses, so that one input always
    gives the same output."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", text)


def _fmt(v: Any, indent: int, lead: int) -> str:
    """Python source for ``v``; ``lead`` = columns already used on the first line."""
    flat = _flat(v)
    if lead + len(flat) <= WIDTH or not isinstance(v, (dict, list, tuple)) or not v:
        return flat
    pad = " " * (indent + 4)
    if isinstance(v, dict):
        use_kw = all(_key_ok(k) for k in v)
        parts = []
        for k, x in v.items():
            head = f"{k}=" if use_kw else f"{k!r}: "
            parts.append(pad + head + _fmt(x, indent + 4, indent + 4 + len(head)))
        open_, close = ("dict(", ")") if use_kw else ("{", "}")
    else:
        parts = [pad + _fmt(x, indent + 4, indent + 4) for x in v]
        open_, close = ("[", "]") if isinstance(v, list) else ("(", ")")
        if isinstance(v, tuple) and len(v) == 1:
            close = ",)"
    return open_ + "\n" + ",\n".join(parts) + close


def _flat(v: Any) -> str:
    if isinstance(v, dict):
        if all(_key_ok(k) for k in v):
            return "dict(" + ", ".join(f"{k}={_flat(x)}" for k, x in v.items()) + ")"
        return "{" + ", ".join(f"{k!r}: {_flat(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_flat(x) for x in v) + "]"
    if isinstance(v, tuple):
        if len(v) == 1:
            return f"({_flat(v[0])},)"
        return "(" + ", ".join(_flat(x) for x in v) + ")"
    return _fmt_scalar(v)


def _assign(name: str, value: Any) -> str:
    return f"{name} = " + _fmt(value, 0, len(name) + 3)


def _comment_block(lines: List[str], bullet: str = "") -> List[str]:
    out = []
    for line in lines:  # (warnings and notes may quote any object's repr)
        wrapped = textwrap.wrap(_without_addresses(line), WIDTH - 6) or [""]
        out.append(f"#{bullet}{wrapped[0]}")
        out.extend(f"#{' ' * len(bullet)}{w}" for w in wrapped[1:])
    return out


def render(result: MigrationResult) -> str:
    """The 1.x config file for ``result`` (deterministic for a given input)."""
    src = os.path.basename(result.source)
    lines = ["# MMEngine 1.x config converted from an MMGeneration 0.x config",
             f"# ({src!r}) by `pygan-optim migrate` (pygan_optim.migrate).",
             "# Review the warnings and the NOT TRANSLATED section at the end before",
             "# training."]
    lines += ["#"] + _comment_block([needs_line(result)], " ")
    if result.warnings:
        lines += ["#", "# WARNINGS (lossy conversions):"]
        lines += _comment_block(result.warnings, "   - ")
    if result.notes:
        lines += ["#", "# Notes:"]
        lines += _comment_block(result.notes, "   - ")
    for name, value in result.config.items():
        lines += ["", _assign(name, value)]
    if result.untranslated:
        lines += ["", "", "# " + "=" * (WIDTH - 2),
                  "# NOT TRANSLATED: these 0.x settings have no automatic 1.x equivalent.",
                  "# They are kept here, commented out, so that nothing is lost; port them",
                  "# to their 1.x counterparts by hand.",
                  "# " + "=" * (WIDTH - 2)]
        for item in result.untranslated:
            lines.append("")
            lines += _comment_block([f"{item.path}: {item.reason}"], " [0.x] ")
            code = _assign(item.path, item.value)
            lines += ["# " + ln if ln else "#" for ln in code.split("\n")]
    return "\n".join(lines) + "\n"

def mmagic_types(config: Any) -> List[str]:
    """The MMagic-only type / constructor names a config uses, in order of appearance."""
    found: List[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                if k in ("type", "constructor") and x in MMAGIC_ONLY and x not in found:
                    found.append(x)
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
    walk(config)
    return found


def needs_line(result: MigrationResult) -> str:
    model = result.config.get("model", {}).get("type")
    if result.needs == "pygan_optim":
        return (f"Runs on plain MMEngine with pygan_optim, which implements the {model!r} "
                f"model ({result.family}): add custom_imports=dict(imports=['pygan_optim']). "
                f"MMagic 1.x trains it too.")
    others = mmagic_types(result.config)
    extra = f" and {', '.join(repr(t) for t in others)}" if others else ""
    verb = "are" if others else "is"
    return (f"NEEDS MMAGIC 1.x: the {model!r} model ({result.family}){extra} {verb} registered "
            f"by MMagic, not by pygan_optim or MMEngine; train it with MMagic "
            f"(default_scope='mmagic').")


def check(result: MigrationResult, build: bool = False) -> List[str]:
    """Verify ``result`` as the tool's own last step; returns what was checked.

    Raises :class:`MigrationError` when the text does not load back to
    ``result.config`` or (``build=True``) the optim_wrapper does not build.
    """
    from mmengine import Config

    done = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "migrated.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(result.text)
        try:
            loaded = Config.fromfile(path).to_dict()
        except Exception as e:
            raise MigrationError(f"internal: the migrated config does not load with "
                                 f"Config.fromfile: {type(e).__name__}: {e}") from e
    if not _same_values(loaded, result.config):
        raise MigrationError("internal: the migrated config loads with different values "
                             "than were translated")
    done.append("loads with mmengine Config.fromfile to the translated values")
    if build:
        done.append(_build(result))
        runtime = _build_runtime(result.config)
        if runtime:
            done.append(runtime)
    result.checks.extend(done)
    return done


def _same_values(a: Any, b: Any) -> bool:
    """a == b, with a NaN equal to a NaN (a 0.x value may be float('nan'))."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_values(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return (type(a) is type(b) and len(a) == len(b)
                and all(_same_values(x, y) for x, y in zip(a, b)))
    return a == b


def _build(result: MigrationResult) -> str:
    model_cfg = result.config["model"]
    if result.needs != "pygan_optim":
        return (f"--check did not build the {model_cfg['type']!r} model: it needs MMagic 1.x, "
                f"which pygan_optim does not replace")
    import pygan_optim  # noqa: F401  registers the model, networks and constructor
    from mmengine.optim import OptimWrapperDict, build_optim_wrapper
    from mmengine.registry import MODELS

    try:
        model = MODELS.build(model_cfg)
        wrappers = build_optim_wrapper(model, result.config["optim_wrapper"])
    except Exception as e:
        raise MigrationError(f"--check: the migrated {model_cfg['type']!r} model or its "
                             f"optim_wrapper does not build: {type(e).__name__}: {e}") from e
    names = sorted(wrappers.keys()) if isinstance(wrappers, OptimWrapperDict) else []
    n = sum(p.numel() for p in model.parameters())
    return (f"--check built the {model_cfg['type']!r} model ({n} parameters) and its "
            f"optim_wrapper {names} with pygan_optim")


def _build_runtime(config: dict) -> str:
    """Build the default hooks, the log processor and the visualizer's backends (MMEngine
    types in every migrated config); '' when the config has none of them."""
    from mmengine.registry import HOOKS, LOG_PROCESSORS, VISBACKENDS, VISUALIZERS

    def visualizer(vis: dict) -> None:
        if VISUALIZERS.get(vis["type"]) is None:
            raise KeyError(f"{vis['type']!r} is not registered")
        with tempfile.TemporaryDirectory() as tmp:  # backends start lazily: no files
            for backend in vis.get("vis_backends", []):
                VISBACKENDS.build(dict(dict(save_dir=tmp), **backend))

    items = [(f"default_hooks.{name}", HOOKS.build, hook)
             for name, hook in (config.get("default_hooks") or {}).items() if hook is not None]
    if "log_processor" in config:
        items.append(("log_processor", LOG_PROCESSORS.build, config["log_processor"]))
    if "visualizer" in config:
        items.append(("visualizer", visualizer, config["visualizer"]))
    for name, build, cfg in items:
        try:
            build(copy.deepcopy(cfg))
        except Exception as e:
            raise MigrationError(f"--check: the migrated {name} does not build: "
                                 f"{type(e).__name__}: {e}") from e
    return (f"--check built {', '.join(name for name, _, _ in items)} with MMEngine"
            if items else "")


def write(result: MigrationResult, new_path: str) -> str:
    """Write ``result.text`` to ``new_path`` (parent folders are created), all or nothing:
    a temporary file beside it, then renamed. OSError when it cannot be written."""
    if os.path.isdir(new_path):  # else the rename's error would name the temporary file
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), new_path)
    parent = os.path.dirname(os.path.abspath(new_path))
    os.makedirs(parent, exist_ok=True)
    # os.open with 0o666 honours the umask (mkstemp would leave the file 0600).
    tmp = os.path.join(parent, f".{os.path.basename(new_path)}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(result.text)
        os.replace(tmp, new_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return new_path
