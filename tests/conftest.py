"""Fixtures that start real parts: Mosquitto on a free port and the agent as a process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from support import Mosquitto


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A fresh Mosquitto per test. Missing Mosquitto fails the test: CI must install it, not skip it."""
    try:
        mosquitto = Mosquitto(tmp_path / "broker")
    except RuntimeError as exc:
        pytest.fail(str(exc))
    mosquitto.start()
    yield mosquitto
    mosquitto.stop()
