"""`nestling traces | train | eval | distill`: distill's subcommands. Heavy imports stay inside handlers."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    _register_traces(sub)
    _register_train(sub)


def _register_traces(sub: argparse._SubParsersAction) -> None:
    """Owner: traces stage (issue 2)."""


def _register_train(sub: argparse._SubParsersAction) -> None:
    """Owner: student stage (issue 3): `train`, `eval`, `distill`."""
