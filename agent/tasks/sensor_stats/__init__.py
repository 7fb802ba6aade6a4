"""``sensor.stats``: rolling-window statistics and z-score anomalies per topic and field (docs/design.md#tasks).

A message is a JSON object of readings (a CityPulse row) or a SenML pack (RFC 8428). Each numeric reading is
judged against the previous readings of the same field on the same topic, then joins that window. The task
runs inline on the event loop for every message, so the arithmetic is plain Python on running sums (numpy's
per-call overhead would exceed the whole budget of ~20 µs per row).

In three parts: ``_readings`` (the message's readings), ``_window`` (one field's statistics) and ``_task``
(the task, its options, its caps and its saved state).
"""

from agent.tasks.sensor_stats._readings import (
    MAX_READINGS,
    Reading,
    parse_readings,
    readings_of_object,
    readings_of_pack,
)
from agent.tasks.sensor_stats._task import DEFAULT_WINDOW, MAX_WINDOW, OPTIONS, SensorStats, check_options

__all__ = [
    "DEFAULT_WINDOW",
    "MAX_READINGS",
    "MAX_WINDOW",
    "OPTIONS",
    "Reading",
    "SensorStats",
    "check_options",
    "parse_readings",
    "readings_of_object",
    "readings_of_pack",
]
