"""``pygan-optim migrate OLD.py -o NEW.py [--strict] [--check]``: MMGeneration 0.x -> 1.x configs.

``pygan-optim migrate --checkpoint OLD.pth -o NEW.pth [--config NEW.py] [--strict]``
converts a 0.x training checkpoint into one MMEngine's Runner resumes
(``resume=True, load_from=NEW.pth``); see :mod:`pygan_optim.migrate.checkpoint`.

Also runnable as ``python -m pygan_optim.migrate_cli OLD.py -o NEW.py``.
Warnings, notes and the settings that could not be translated are printed on
stderr (the untranslated ones are also kept, commented out, in NEW.py).

Before anything is written the tool checks its own output: the text loads with
``mmengine.Config.fromfile`` to exactly the translated values; with ``--check``
the model and its optim_wrapper are also built, for the families pygan_optim
implements (others need MMagic, which the output's header says).

Exit codes: 0 success; 2 a ``--strict`` failure (a lossy conversion) or a
command-line usage error; 1 the 0.x config (or checkpoint) could not be read or
converted (a family with no 1.x equivalent, no optimizer, a failed check, ...).
Nothing is written unless the exit code is 0.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_STRICT = 2


def build_parser(prog: str = "pygan-optim migrate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Convert an MMGeneration 0.x GAN config (its _base_ files are resolved) "
                    "into a single MMEngine/MMagic 1.x config file, or (--checkpoint) a 0.x "
                    "training checkpoint into one MMEngine's Runner resumes.")
    p.add_argument("old", metavar="OLD.py", nargs="?", help="the 0.x config file")
    p.add_argument("-o", "--output", metavar="NEW.py",
                   help="where to write the 1.x config (default: print it on stdout), or "
                        "with --checkpoint the 1.x checkpoint NEW.pth (required)")
    p.add_argument("--checkpoint", metavar="OLD.pth",
                   help="convert this 0.x training checkpoint instead of a config")
    p.add_argument("--config", metavar="NEW.py",
                   help="with --checkpoint: the 1.x config the checkpoint will be resumed "
                        "with, checked against (default: the 0.x config stored in OLD.pth, "
                        "migrated)")
    p.add_argument("--strict", action="store_true",
                   help="fail (exit code 2, nothing written) instead of warning when a "
                        "setting can only be converted approximately; configs that cannot "
                        "be migrated at all fail (exit code 1) with or without it")
    p.add_argument("--check", action="store_true",
                   help="also build the migrated model and its optim_wrapper (families "
                        "pygan_optim implements; for the others the output says MMagic is "
                        "needed)")
    return p


def _usage(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors argparse cannot express (exit code 2 via parser.error)."""
    if args.checkpoint is None:
        if args.old is None:
            parser.error("give a 0.x config OLD.py, or --checkpoint OLD.pth -o NEW.pth")
        if args.config is not None:
            parser.error("--config is only used with --checkpoint")
        if args.output:
            from .migrate.reader import config_files

            for read in config_files(args.old):
                if _same_file(args.output, read):
                    which = "OLD.py" if _same_file(read, args.old) else f"its _base_ file {read}"
                    parser.error(f"NEW.py must differ from {which} (the 0.x config is kept)")
        return
    if args.check:
        parser.error("--check is for configs; a checkpoint is always checked")
    if args.old is not None:
        parser.error("give either a config OLD.py or --checkpoint OLD.pth, not both")
    if not args.output:
        parser.error("--checkpoint needs -o NEW.pth (a checkpoint is not printed)")
    # The same file under another name too (a link such as MMGeneration's latest.pth).
    if _same_file(args.output, args.checkpoint):
        parser.error("NEW.pth must differ from OLD.pth (the 0.x checkpoint is kept)")
    if args.config is not None and _same_file(args.output, args.config):
        parser.error("NEW.pth must differ from the --config file")


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def _checkpoint_main(args: argparse.Namespace) -> int:
    from .migrate.checkpoint import CheckpointConversionError, convert_checkpoint, \
        load_checkpoint_file, save_checkpoint_file

    err = sys.stderr
    try:
        old, load_note = load_checkpoint_file(args.checkpoint)
    except FileNotFoundError as e:
        print(f"error: {e}", file=err)
        return EXIT_ERROR
    except Exception as e:  # not a torch file, truncated, ...
        print(f"error: cannot read {args.checkpoint}: {type(e).__name__}: {e}", file=err)
        return EXIT_ERROR
    if load_note:
        print(f"note: {load_note}", file=err)
    try:
        new, report = convert_checkpoint(old, config=args.config, strict=args.strict)
    except CheckpointConversionError as e:
        print(f"error: {e}", file=err)
        print("nothing written", file=err)
        if args.strict and e.warnings:
            return EXIT_STRICT
        return EXIT_ERROR
    except (Exception, SystemExit) as e:  # e.g. a --config that does not load, or exits
        what = f" with the config {args.config}" if args.config else ""
        print(f"error: cannot convert {args.checkpoint}{what}: {type(e).__name__}: {e}",
              file=err)
        print("nothing written", file=err)
        return EXIT_ERROR
    for w in report.warnings:
        print(f"warning: {w}", file=err)
    for n in report.notes:
        print(f"note: {n}", file=err)
    print("mapped:", file=err)
    for old_key, new_key, detail in report.mapping:
        print(f"  {old_key} -> {new_key}" + (f" ({detail})" if detail else ""), file=err)
    try:
        save_checkpoint_file(new, args.output)
    except OSError as e:
        print(f"error: cannot write {args.output}: {e}", file=err)
        return EXIT_ERROR
    checked = ("checked against the 1.x model of " + str(report.config_source)
               if report.checked_against_model else "checked against its own weights only")
    print(f"wrote {args.output}: resumes at iter {report.iter}; {checked}; "
          f"{len(report.warnings)} warning(s)", file=err)
    return EXIT_OK


def _report(result, stream) -> None:
    for w in result.warnings:
        print(f"warning: {w}", file=stream)
    for n in result.notes:
        print(f"note: {n}", file=stream)
    if result.untranslated:
        print(f"untranslated ({len(result.untranslated)} item(s), kept as comments in the "
              f"output):", file=stream)
        for item in result.untranslated:
            print(f"  - {item}", file=stream)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the migration CLI; returns the exit code."""
    from .migrate import MigrationError, check, migrate, write

    args_in = list(sys.argv[1:] if argv is None else argv)
    if len(args_in) > 1 and args_in[0] == "migrate":  # called with the subcommand word
        args_in = args_in[1:]
    parser = build_parser()
    args = parser.parse_args(args_in)
    _usage(parser, args)
    if args.checkpoint is not None:
        return _checkpoint_main(args)
    err = sys.stderr
    try:
        result = migrate(args.old, strict=args.strict)
    except MigrationError as e:
        print(f"error: {e}", file=err)
        if not e.warnings:
            print("nothing written", file=err)
        if args.strict and e.warnings:
            print("nothing written; rerun without --strict to accept these approximations",
                  file=err)
            return EXIT_STRICT
        return EXIT_ERROR
    except FileNotFoundError as e:
        print(f"error: {e}", file=err)
        return EXIT_ERROR
    except SystemExit as e:  # the config's own code called sys.exit()
        print(f"error: cannot convert {args.old}: the config calls sys.exit({e.code!r}) "
              f"when it is read", file=err)
        print("nothing written", file=err)
        return EXIT_ERROR
    except Exception as e:  # a 0.x config that mmengine cannot load
        print(f"error: cannot convert {args.old}: {type(e).__name__}: {e}", file=err)
        return EXIT_ERROR

    try:
        check(result, build=args.check)
    except MigrationError as e:
        _report(result, err)
        print(f"error: {e}", file=err)
        print("nothing written", file=err)
        return EXIT_ERROR
    _report(result, err)
    from .migrate.output import needs_line
    print(f"family: {result.family}; {needs_line(result)}", file=err)
    for c in result.checks:
        print(f"checked: {c}", file=err)
    if args.output:
        try:
            write(result, args.output)
        except OSError as e:  # a directory, a path below a file, no permission, ...
            print(f"error: cannot write {args.output}: {e}", file=err)
            print("nothing written", file=err)
            return EXIT_ERROR
        print(f"wrote {args.output} ({len(result.warnings)} warning(s), "
              f"{len(result.untranslated)} untranslated item(s))", file=err)
    else:
        sys.stdout.write(result.text)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
