"""The ``pygan-optim`` command: train from a config, migrate 0.x configs."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional


def train(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(prog="pygan-optim train",
                                 description="Train a model from an MMEngine config file.")
    ap.add_argument("config")
    ap.add_argument("--work-dir", required=True, help="where logs and checkpoints go")
    ap.add_argument("--resume", action="store_true", help="resume from the latest checkpoint")
    ap.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                    help="override config entries, e.g. train_cfg.max_iters=100")
    args = ap.parse_args(argv)

    # MMEngine 0.10 loads its own checkpoints (message hub history, numpy arrays)
    # with torch.load's default, which since torch 2.6 is weights_only=True and
    # refuses them: resume and load_from would fail. Checkpoints this command
    # loads are the user's own; an explicit setting in the environment wins.
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

    from mmengine.config import Config, DictAction
    from mmengine.runner import Runner

    import pygan_optim  # noqa: F401  (registers the models, wrappers and optimizers)

    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        options = argparse.Namespace()
        DictAction(option_strings=[], dest="options")(None, options, args.cfg_options)
        cfg.merge_from_dict(options.options)
    cfg.work_dir = args.work_dir
    if args.resume:
        cfg.resume = True
    Runner.from_cfg(cfg).train()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"train": train, "migrate": _migrate}
    if not argv or argv[0] not in commands:
        print("usage: pygan-optim {train,migrate} ...\n"
              "  train CONFIG --work-dir DIR     train from an MMEngine config\n"
              "  migrate OLD.py -o NEW.py        convert an MMGeneration 0.x GAN config",
              file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


def _migrate(argv: List[str]) -> int:
    from .migrate_cli import main as migrate_main

    return migrate_main(argv)


if __name__ == "__main__":
    sys.exit(main())
