"""`nestling serve | ask`: the runtime's subcommands (torch-free)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Owner: serve stage (issue 5)."""
