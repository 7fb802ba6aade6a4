"""Sample data shipped with the package (GPL-3.0 data, see ``README.md`` here): the demo's and tests' defaults."""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
CITYPULSE_DIR = DATA_DIR / "citypulse-aarhus"
TRACES_DIR = DATA_DIR / "traces"
DEFAULT_UPLINK = TRACES_DIR / "mahimahi" / "ATT-LTE-driving-2016.up"
DEFAULT_DOWNLINK = TRACES_DIR / "mahimahi" / "ATT-LTE-driving-2016.down"
NORWAY_BUS = TRACES_DIR / "norway-fcc" / "bus.ljansbakken-oslo-report.2010-09-28_1407CEST.log"
