"""rora-fast: fine-tune with RoRA from the command line; `rora-fast <subcommand> --help`
on each subcommand.

Installed packages add subcommands through the entry point group rora_fast.commands (a
callable that takes argparse's subparsers and gives each parser a func): the paper's
backdoor experiment (demo, poison, defend, evaluate, spectra, rescale-sweep, sweep, seeds,
bias, report) comes with the harness, harness/ in the repository (pip install ./harness).
"""
from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points
from typing import List, Optional

__all__ = ["main", "build_parser", "COMMAND_GROUP"]

#: the entry point group through which installed packages add subcommands
COMMAND_GROUP = "rora_fast.commands"


def build_parser() -> argparse.ArgumentParser:
    return _build()[0]


def _build():
    """The parser and its subparsers (whose ``choices`` name every subcommand)."""
    from . import __version__
    from .train_cli import add_parser as add_train_parser
    ap = argparse.ArgumentParser(prog="rora-fast", description=__doc__,
                                 usage="rora-fast [-h] [--version] <subcommand> [options]",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"rora-fast {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="<subcommand>",
                            prog="rora-fast")
    add_train_parser(sub)
    sub.add_parser("plan-memory", add_help=False,
                   help="predict peak GPU memory of RoRA fine-tuning (LLaMA 7B/8B/13B; "
                        "`rora-fast plan-memory --help`)")
    for ep in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        ep.load()(sub)
    return ap, sub


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "plan-memory":  # its own parser (rora_fast.memory's model)
        from .memory import main as plan_memory_main
        return plan_memory_main(argv[1:], prog="rora-fast plan-memory")
    parser, sub = _build()
    if argv and not argv[0].startswith("-") and argv[0] not in sub.choices:
        print(f"rora-fast: error: no subcommand {argv[0]!r} (have: "
              f"{', '.join(sub.choices)}). The paper's backdoor experiment (demo, "
              f"poison, defend, ...) comes with the harness: pip install ./harness from the "
              f"repository", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        if args.cmd == "train":  # the user's model and data: no poisoning, no harness
            from .train_cli import cmd_train
            return cmd_train(args)
        return args.func(args)
    except (ValueError, RuntimeError, OSError) as e:
        # includes the harness's TriggerError, PoisoningFailed, CorruptCacheError,
        # FileNotFoundError and the OSError transformers raises for a model it cannot load
        # (one line, no traceback)
        msg = str(e)
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
            msg = msg.splitlines()[0] if msg else type(e).__name__
        print(f"rora-fast {args.cmd}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
