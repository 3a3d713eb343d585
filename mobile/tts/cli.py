"""`tessera mobile tts ...` (filled in below)."""

from __future__ import annotations

import argparse


def add_tts_parser(sub: argparse._SubParsersAction) -> None:
    pass
