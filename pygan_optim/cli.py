"""The ``pygan-optim`` command: train from a config, migrate 0.x configs.

Exit codes of ``pygan-optim train``: 0 trained; 1 the config could not be read or
built, or training failed (one ``error:`` line on stderr; ``--debug`` shows the
traceback, which is also in the run's log file once the Runner has one); 2 a
command-line usage error; 130 interrupted (Ctrl-C, also while torch and MMEngine
still import: see :mod:`pygan_optim._interrupt`). ``pygan-optim migrate`` documents
its own (:mod:`pygan_optim.migrate_cli`).
"""
from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import sys
import traceback
from typing import Dict, List, Optional

from . import _interrupt

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = _interrupt.EXIT_INTERRUPTED

COMMANDS = {
    "train": "train a model from an MMEngine config file",
    "migrate": "convert an MMGeneration 0.x GAN config or checkpoint to MMEngine 1.x",
}

# Top-level config keys MMEngine's Runner (0.10) reads besides its __init__ arguments.
_RUNNER_EXTRA_KEYS = ("_base_", "custom_imports", "model_wrapper_cfg", "compile", "strategy",
                      "runner_type", "find_unused_parameters", "filename")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("pygan_optim")
    except Exception:  # not installed (run from a source tree)
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    commands = "\n".join(f"  {k:<9}{v}" for k, v in COMMANDS.items())
    p = argparse.ArgumentParser(
        prog="pygan-optim",
        usage="%(prog)s [-h] [--version] COMMAND [ARGS ...]",
        description="Fused Adam for MMEngine: train GANs from a config, migrate 0.x "
                    f"configs.\n\ncommands:\n{commands}",
        epilog="Run 'pygan-optim COMMAND --help' for a command's options.\n"
               "Examples:\n"
               "  pygan-optim train configs/biggan_32x32_tiny.py --work-dir work_dirs/tiny\n"
               "  pygan-optim migrate old_config.py -o new_config.py",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    p.add_argument("command", metavar="COMMAND", choices=list(COMMANDS),
                   help="one of: " + ", ".join(COMMANDS))
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="the command's arguments")
    return p


def _key_value(token: str) -> str:
    """A --cfg-options token: refused as a usage error before anything is imported."""
    if "=" not in token:
        raise argparse.ArgumentTypeError(f"{token!r} is not KEY=VALUE")
    return token


def build_train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pygan-optim train",
        description="Train a model from an MMEngine config file.",
        epilog="The console shows iteration lines, checkpoints and warnings; MMEngine's "
               "environment, config and hook-order dumps go only to the run's log file, "
               "WORK_DIR/<timestamp>/<timestamp>.log (--verbose prints them too).\n"
               "Exit codes: 0 trained; 1 config or training error (one line on stderr, "
               "--debug for the traceback); 2 usage error; 130 interrupted.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", metavar="CONFIG", help="an MMEngine config file (.py)")
    p.add_argument("--work-dir", required=True, help="where logs and checkpoints go")
    p.add_argument("--resume", action="store_true", help="resume from the latest checkpoint")
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                   type=_key_value, help="override config entries, e.g. train_cfg.max_iters=100")
    loud = p.add_mutually_exclusive_group()
    loud.add_argument("--quiet", dest="quiet", action="store_true", default=True,
                      help="(default) keep MMEngine's start-up dumps and known noise warnings "
                           "out of the console; they stay in the log file")
    loud.add_argument("--verbose", dest="quiet", action="store_false",
                      help="print everything MMEngine logs, as MMEngine's own tools do")
    p.add_argument("--debug", action="store_true",
                   help="on an error, show the full Python traceback")
    return p


def _err(msg: str) -> None:
    print(f"pygan-optim train: {msg}", file=sys.stderr, flush=True)


# Registry names may hold spaces ('optimizer wrapper constructor', 'data sampler',
# 'parameter scheduler'): the name is everything up to " registry.".
_NOT_REGISTERED = re.compile(r"^(\S+) is not in the (?:(\S+)::)?(.+?) registry\.")


def _registered_names(scope: Optional[str], name: str) -> List[str]:
    """Names registered in MMEngine's root registry ``name`` (and its children)."""
    import mmengine.registry as registries

    names: List[str] = []
    for reg in vars(registries).values():
        if isinstance(reg, registries.Registry) and reg.name == name and (
                scope is None or reg.scope == scope):
            todo = [reg]
            while todo:
                r = todo.pop()
                names.extend(k for k in r.module_dict if isinstance(k, str))
                todo.extend(r.children.values())
    return sorted(set(names))


def _one_line(e: BaseException) -> str:
    if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        msg = e.args[0]  # str(KeyError) adds quotes
        m = _NOT_REGISTERED.match(msg)
        if m:  # MMEngine's long "is not in the registry" message, made short
            obj_type, scope, name = m.groups()
            guess = difflib.get_close_matches(obj_type, _registered_names(scope, name), n=1,
                                              cutoff=0.6)
            return (f"unknown {name} type '{obj_type}'"
                    + (f"; did you mean '{guess[0]}'?" if guess else
                       " (not registered; is the module that defines it in custom_imports?)"))
    elif isinstance(e, SyntaxError) and e.msg:
        where = e.filename if e.filename and not e.filename.startswith("<") else ""
        msg = f"{e.msg} at line {e.lineno}" + (f" of {where}" if where else "")
    else:
        msg = str(e)
    worker = _WORKER_ERROR.match(msg)
    if worker:
        # torch re-raises a DataLoader worker's exception with the worker's whole
        # traceback in its message (every config but the tiny one has workers):
        # keep the original exception's own text and say where it came from.
        where, tb = worker.groups()
        lines = tb.rstrip().splitlines()
        last_frame = max((i for i, line in enumerate(lines) if line.startswith(" ")), default=-1)
        original = " ".join(lines[last_frame + 1:]) or lines[-1]
        return " ".join(f"{original} ({where})".split())
    msg = " ".join(msg.split())
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


# torch.utils.data's ExceptionWrapper.reraise: "Caught <Type> in DataLoader worker
# process N.\nOriginal Traceback (most recent call last):\n<traceback>".
_WORKER_ERROR = re.compile(r"^Caught \S+ (in DataLoader worker process \d+)\.\n"
                           r"Original Traceback \(most recent call last\):\n(.*)$", re.S)


def _registered_class(name):
    """The class registered as ``name`` in any of MMEngine's registries (or children)."""
    import mmengine.registry as registries

    if not isinstance(name, str):
        return name if isinstance(name, type) else None
    for reg in vars(registries).values():
        if isinstance(reg, registries.Registry):
            todo = [reg]
            while todo:
                r = todo.pop()
                if name in r.module_dict:
                    return r.module_dict[name]
                todo.extend(r.children.values())
    return None


def _takes_argument(type_name, key: str) -> bool:
    """Whether the class registered as ``type_name`` (or a base class whose
    ``__init__`` it forwards ``**kwargs`` to) takes an argument ``key``."""
    import inspect

    cls = _registered_class(type_name)
    if not isinstance(cls, type):
        return False
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters
        except (TypeError, ValueError):
            return False
        if key in params and params[key].kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                      inspect.Parameter.VAR_KEYWORD):
            return True
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return False
    return False


def _close(key: str, known) -> Optional[str]:
    match = difflib.get_close_matches(key, list(known), n=1, cutoff=0.8)
    return match[0] if match else None


def _check_keys(cfg, cfg_options: Dict[str, object]) -> List[str]:
    """Warnings for likely typos that MMEngine would silently accept: a top-level key
    the Runner never reads, or a --cfg-options key that adds a new entry next to a
    close existing one."""
    import inspect

    from mmengine.runner import Runner

    warnings = []
    known = set(inspect.signature(Runner.__init__).parameters) | set(_RUNNER_EXTRA_KEYS)
    for key in cfg.keys():
        if key not in known:
            guess = _close(key, known)
            if guess:
                warnings.append(f"config key '{key}' is not read by MMEngine's Runner; "
                                f"did you mean '{guess}'?")
    for full in cfg_options:
        parts = full.split(".")
        node = cfg._cfg_dict if hasattr(cfg, "_cfg_dict") else cfg
        for depth, part in enumerate(parts):
            if not isinstance(node, dict):
                break
            if part not in node:
                # The first new key on the path (MMEngine creates it and all below it
                # silently): a parent's typo as much as a leaf's. A Runner argument the
                # config leaves out is not new to the Runner.
                if depth == 0 and part in known:
                    break
                # An argument of the class this dict builds is no typo, however
                # close it is to a sibling ('dtype' next to 'type' when
                # --cfg-options turns AMP on), also where the same options change
                # the dict's type.
                type_name = cfg_options.get(".".join(parts[:depth] + ["type"]),
                                            node.get("type"))
                if type_name is not None and _takes_argument(type_name, part):
                    break
                siblings = [k for k in node.keys() if isinstance(k, str)]
                guess = _close(part, siblings + (sorted(known) if depth == 0 else []))
                if guess:
                    where = ".".join(parts[:depth] + [guess])
                    warnings.append(f"--cfg-options {full} adds a new key; did you mean "
                                    f"{where}?")
                break
            node = node[part]
    return warnings


def _iters_done(runner) -> Optional[int]:
    """The iterations the train loop has run, None before it was built. Not
    ``runner.iter``: that property builds the loop (dataset and dataloader)
    when it is still a config, so a Ctrl-C while the dataset was being built
    (an image folder scanned) would build it all over again, and the
    interrupt's message would wait for it."""
    if runner is None:
        return None
    from mmengine.runner import BaseLoop

    loop = getattr(runner, "_train_loop", None)
    return loop.iter if isinstance(loop, BaseLoop) else None


def train(argv: List[str]) -> int:
    args = build_train_parser().parse_args(argv)

    if not os.path.isfile(args.config):
        _err(f"error: config file not found: {args.config}")
        return EXIT_ERROR

    # MMEngine 0.10 loads its own checkpoints (message hub history, numpy arrays)
    # with torch.load's default, which since torch 2.6 is weights_only=True and
    # refuses them: resume and load_from would fail. Checkpoints this command
    # loads are the user's own; an explicit setting in the environment wins.
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

    runner_cls = runner = None
    started = [False]
    stage = "cannot start"
    try:
        # From here a Ctrl-C is a KeyboardInterrupt again (until now the package's
        # start-up guard answered it: torch and MMEngine were importing).
        _interrupt.release()
        from .console import make_runner_class, silence_known_warnings

        if args.quiet:
            silence_known_warnings()
        runner_cls = make_runner_class(quiet=args.quiet)
        stage = f"cannot read the config {args.config}"
        from mmengine.config import Config, DictAction
        from mmengine.hooks import Hook

        import pygan_optim  # noqa: F401  (registers the models, wrappers and optimizers)

        cfg = Config.fromfile(args.config)
        stage = "cannot apply --cfg-options"
        options = argparse.Namespace(options={})
        if args.cfg_options:
            DictAction(option_strings=[], dest="options")(None, options, args.cfg_options)
        for w in _check_keys(cfg, options.options):
            _err(f"warning: {w}")
        cfg.merge_from_dict(options.options)
        cfg.work_dir = args.work_dir
        if args.resume:
            cfg.resume = True

        stage = f"cannot start training from {args.config}"
        runner = runner_cls.from_cfg(cfg)
        log_file = getattr(runner.logger, "log_file", None)
        if args.quiet and log_file:
            print(f"pygan-optim train: environment, config and hooks are in {log_file} "
                  f"(--verbose prints them here)", flush=True)

        class _Started(Hook):
            def before_train(self, runner):
                started[0] = True

        runner.register_hook(_Started(), priority="LOWEST")
        runner.train()
    except (KeyboardInterrupt, Exception) as e:
        if _raised_for_ctrl_c(e):
            _err(_interrupt.interrupted_message(args.work_dir, _iters_done(runner)))
            return EXIT_INTERRUPTED
        if started[0]:
            stage = f"training failed at iter {_iters_done(runner)}"
        logger = (runner.logger if runner is not None else
                  runner_cls.last_logger if runner_cls is not None else None)
        if logger is not None:  # (none when .console itself failed to import)
            from .console import log_to_file_only

            log_to_file_only(logger, logging.ERROR, f"{stage}:\n{traceback.format_exc()}",
                             pathname=__file__, func="train")
        where = getattr(logger, "log_file", None)
        hint = "" if args.debug else " (--debug shows the traceback" + (
            f"; it is also in {where})" if where else ")")
        _err(f"error: {stage}: {_one_line(e)}{hint}")
        if args.debug:
            traceback.print_exc()
        return EXIT_ERROR
    return EXIT_OK


def _raised_for_ctrl_c(error: BaseException) -> bool:
    """Whether `error` is a KeyboardInterrupt or was raised while one was being
    handled: code that turns every exception into its own (MMEngine's config
    formatting, a bare except around yapf, raises SyntaxError) would otherwise
    make a Ctrl-C an error."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        parser.print_usage(sys.stderr)
        print("pygan-optim: error: no command given (one of: " + ", ".join(COMMANDS)
              + "); 'pygan-optim --help' lists them", file=sys.stderr)
        return EXIT_USAGE
    parsed = parser.parse_args(argv)  # --help, --version, usage errors exit here
    if parsed.command == "train":
        return train(parsed.args)
    _interrupt.release()
    return _migrate(parsed.args)


def _migrate(argv: List[str]) -> int:
    from .migrate_cli import main as migrate_main

    return migrate_main(argv)


if __name__ == "__main__":
    sys.exit(main())
