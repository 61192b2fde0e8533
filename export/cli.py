"""`nestling export`: export's subcommand. Heavy imports stay inside the handler."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Owner: export stage (issue 4)."""
