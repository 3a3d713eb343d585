"""Log format for the gateway: one line per event, request id in every request line."""

from __future__ import annotations

import logging


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    # httpx logs every health probe at INFO; the gateway logs what matters itself.
    logging.getLogger("httpx").setLevel(logging.WARNING)
