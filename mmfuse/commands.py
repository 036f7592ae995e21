"""How a package adds its subcommands to ``mmfuse``: every command takes the options all commands share.

A command is added with :meth:`Commands.add`; a command with subcommands of its own (``bench extract``) with
:meth:`Commands.group`, whose subcommands take the shared options in turn. Only argparse's public API is used
(``add_subparsers``, ``add_parser`` and ``parents``).
"""

from __future__ import annotations

import argparse
from typing import Any


class Commands:
    """The subcommands of one parser. ``subparsers`` is what ``ArgumentParser.add_subparsers`` returned and
    ``common`` a parser (``add_help=False``) holding the options every command shares."""

    def __init__(self, subparsers: Any, common: argparse.ArgumentParser) -> None:
        self._subparsers = subparsers
        self._common = common

    @property
    def choices(self) -> dict[str, argparse.ArgumentParser]:
        """The commands added so far, by name."""
        return dict(self._subparsers.choices)

    def add(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        """A command taking the shared options; ``kwargs`` go to ``add_parser`` (help, description, ...)."""
        return self._subparsers.add_parser(name, parents=[self._common], **kwargs)

    def group(self, name: str, dest: str, metavar: str, **kwargs: Any) -> Commands:
        """A command whose subcommands (required, their name stored in ``dest``) take the shared options."""
        parser = self._subparsers.add_parser(name, **kwargs)
        return Commands(parser.add_subparsers(dest=dest, required=True, metavar=metavar), self._common)
