"""The ``mmfuse`` command: one parser, subcommands from the packages that implement them.

Exit codes: 0 ok, 1 failed (a clear message on stderr), 2 usage error, 130 interrupted (Ctrl-C).
Every command gets ``-q``, ``--log-level`` and ``--no-progress``, and ``args.progress`` to draw its bars with
(``mmfuse.terminal``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from bench.cli import add_bench
from extract.cli import add_extract, add_import_mmsa, add_inspect, add_report
from mmfuse import __version__
from mmfuse.commands import Commands
from mmfuse.errors import MmfuseError
from mmfuse.procs import reap_children
from mmfuse.terminal import ProgressFactory, bars_wanted, native_logs_filtered
from train.commands import add_eval, add_predict, add_train

log = logging.getLogger("mmfuse")


def build_parser() -> argparse.ArgumentParser:
    return build_commands()[0]


def build_commands() -> tuple[argparse.ArgumentParser, Commands]:
    """The ``mmfuse`` parser and its commands (``commands.choices["predict"]`` is predict's parser)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    common.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    common.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser = argparse.ArgumentParser(
        prog="mmfuse",
        description="Raw talking-face video -> WebDataset shards -> multimodal fusion models.",
        epilog="Run `mmfuse COMMAND --help` for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"mmfuse {__version__}")
    commands = Commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"), common)
    for add in (add_extract, add_inspect, add_report, add_import_mmsa, add_train, add_eval, add_predict, add_bench):
        add(commands)
    return parser, commands


def setup_logging(level: str, quiet: bool) -> None:
    logging.basicConfig(
        level=logging.ERROR if quiet else getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("transformers", "huggingface_hub", "absl", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


# What an interrupted command leaves behind, in one line (Ctrl-C exits 130 with it, no traceback).
INTERRUPTED = {
    "extract": "complete shards are kept; rerun the same command to resume",
    "train": "rerun the same command with --resume to continue from the last checkpoint",
}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GLOG_minloglevel", "2")  # MediaPipe's C++ logging
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    args = parse(build_parser(), argv)
    debug = args.log_level == "DEBUG" and not args.quiet
    if debug:  # decode workers keep their native log lines too
        os.environ["MMFUSE_NATIVE_LOGS"] = "show"
    try:
        with native_logs_filtered(enabled=not debug):
            setup_logging(args.log_level, args.quiet)
            args.progress = ProgressFactory(bars_wanted(args.no_progress, args.quiet))
            return _run(args)
    except KeyboardInterrupt:  # also when it lands outside the command (while the filter is taken down)
        return _interrupted(args)
    finally:
        reap_children()  # no worker or helper process outlives the command


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args``, except that a command taking ``KEY=VALUE`` settings (``overrides``) takes them
    anywhere on its line: argparse gives a positional list only the tokens right after the positionals before
    it, so ``--out DIR fps=25`` would leave ``fps=25`` unrecognised. Anything else unrecognised is the usual
    usage error (exit 2)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        takes = hasattr(args, "overrides")
        stray = [t for t in extra if not takes or "=" not in t or t.startswith("-")]
        if stray:
            parser.error(f"unrecognized arguments: {' '.join(stray)}")
        args.overrides = [*args.overrides, *extra]
    return args


def _run(args: argparse.Namespace) -> int:
    try:
        return args.run(args)
    except MmfuseError as exc:  # every error raised on purpose: its message says what to do
        print(f"mmfuse {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return _interrupted(args)


def _interrupted(args: argparse.Namespace) -> int:
    hint = INTERRUPTED.get(args.command, "rerun the same command")
    print(f"\nmmfuse {args.command}: interrupted; {hint}", file=sys.stderr, flush=True)
    return 130


if __name__ == "__main__":
    sys.exit(main())
