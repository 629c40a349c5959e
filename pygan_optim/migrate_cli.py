"""``pygan-optim migrate OLD.py -o NEW.py [--strict]``: MMGeneration 0.x -> 1.x configs.

Also runnable as ``python -m pygan_optim.migrate_cli OLD.py -o NEW.py``.
Warnings, notes and the settings that could not be translated are printed on
stderr (the untranslated ones are also kept, commented out, in NEW.py).

Exit codes: 0 success; 2 a ``--strict`` failure (a lossy conversion) or a
command-line usage error; 1 the 0.x config could not be read or converted.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_STRICT = 2


def build_parser(prog: str = "pygan-optim migrate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Convert an MMGeneration 0.x GAN config (its _base_ files are resolved) "
                    "into a single MMEngine/MMagic 1.x config file.")
    p.add_argument("old", metavar="OLD.py", help="the 0.x config file")
    p.add_argument("-o", "--output", metavar="NEW.py",
                   help="where to write the 1.x config (default: print it on stdout)")
    p.add_argument("--strict", action="store_true",
                   help="fail (exit code 2, nothing written) instead of warning when a "
                        "setting can only be converted approximately")
    return p


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
    from .migrate import MigrationError, migrate, write

    args_in = list(sys.argv[1:] if argv is None else argv)
    if len(args_in) > 1 and args_in[0] == "migrate":  # called with the subcommand word
        args_in = args_in[1:]
    args = build_parser().parse_args(args_in)
    err = sys.stderr
    try:
        result = migrate(args.old, strict=args.strict)
    except MigrationError as e:
        print(f"error: {e}", file=err)
        if args.strict and e.warnings:
            print("nothing written; rerun without --strict to accept these approximations",
                  file=err)
            return EXIT_STRICT
        return EXIT_ERROR
    except FileNotFoundError as e:
        print(f"error: {e}", file=err)
        return EXIT_ERROR
    except Exception as e:  # a 0.x config that mmengine cannot load
        print(f"error: cannot convert {args.old}: {type(e).__name__}: {e}", file=err)
        return EXIT_ERROR

    _report(result, err)
    if args.output:
        write(result, args.output)
        print(f"wrote {args.output} ({len(result.warnings)} warning(s), "
              f"{len(result.untranslated)} untranslated item(s))", file=err)
    else:
        sys.stdout.write(result.text)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
