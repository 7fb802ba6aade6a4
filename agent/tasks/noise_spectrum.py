"""``noise.spectrum``: sound levels and octave bands of a PCM clip (docs/design.md#tasks).

Input is raw 16-bit little-endian signed mono PCM. Levels are dB relative to digital full scale (a sample of
±32768) plus the route's calibration offset ``offset_db``, so a calibrated microphone yields dB SPL.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from agent.errors import InvalidPayload

DEFAULT_SAMPLE_RATE = 16_000
FULL_SCALE = 32768.0
FRAME_S = 0.125  # IEC 61672 "fast" time weighting, approximated by consecutive 125 ms frames
POWER_FLOOR = 1e-20  # -200 dB: digital silence still gives a finite level
# Nominal octave centres (IEC 61260 labels) and the exact base-2 centres 1000·2^k they stand for.
_NOMINAL = ("31.5", "63", "125", "250", "500", "1000", "2000", "4000", "8000")
OCTAVE_BANDS: tuple[tuple[str, float], ...] = tuple(
    (label, 1000.0 * 2.0**k) for label, k in zip(_NOMINAL, range(-5, 4), strict=True)
)
_HALF_OCTAVE = math.sqrt(2.0)


OPTIONS = frozenset({"sample_rate", "offset_db"})  # route options this task takes; any other key stops start-up


def read_options(options: Mapping[str, Any]) -> tuple[int, float]:
    """``sample_rate`` and ``offset_db``; a bad value is a configuration mistake, hence ValueError."""
    sample_rate = options.get("sample_rate", DEFAULT_SAMPLE_RATE)
    if type(sample_rate) is not int or sample_rate < 1:
        raise ValueError(
            f"route option 'sample_rate' must be a positive whole number of Hz, got {sample_rate!r}"
        )
    offset_db = options.get("offset_db", 0.0)
    if type(offset_db) not in (int, float) or not math.isfinite(offset_db):
        raise ValueError(f"route option 'offset_db' must be a finite number of dB, got {offset_db!r}")
    return sample_rate, float(offset_db)


def check_options(options: Mapping[str, Any]) -> None:
    read_options(options)


def _level(power: float, offset_db: float) -> float:
    return round(10.0 * math.log10(max(power, POWER_FLOOR)) + offset_db, 2)


def noise_spectrum(payload: bytes, options: Mapping[str, Any]) -> dict[str, Any]:
    # numpy is imported where the task runs (the worker pool), not by the daemon, which never needs its
    # ~12 MB; LocalExecutor.warm_up imports it in the workers ahead of the first clip.
    import numpy as np

    sample_rate, offset_db = read_options(options)
    size = len(payload)
    if size == 0:
        raise InvalidPayload("the payload is empty; expected 16-bit little-endian mono PCM samples")
    if size % 2:
        raise InvalidPayload(
            f"the payload has {size} bytes, an odd number; 16-bit PCM samples take 2 bytes each"
        )
    x = np.frombuffer(payload, dtype="<i2").astype(np.float64) / FULL_SCALE
    n = x.size
    squares = x * x
    total = float(squares.mean())

    frame = max(1, round(FRAME_S * sample_rate))
    frames = n // frame
    if frames:
        # A trailing partial frame is left out: its short average would skew Lmin.
        frame_power = squares[: frames * frame].reshape(frames, frame).mean(axis=1)
        p_max, p_min = float(frame_power.max()), float(frame_power.min())
    else:
        p_max = p_min = total

    # One-sided power spectrum scaled so its bins sum to mean(x²) (Parseval): |X_k|²/n², doubled for the
    # bins that stand for both +f and -f (all but DC and, for even n, Nyquist).
    spectrum = np.abs(np.fft.rfft(x)) ** 2 / (float(n) * n)
    doubled_end = spectrum.size - 1 if n % 2 == 0 else spectrum.size
    spectrum[1:doubled_end] *= 2.0
    freqs = np.fft.rfftfreq(n, d=1.0 / sample_rate)
    nyquist = sample_rate / 2.0

    bands: dict[str, float] = {}
    for label, centre in OCTAVE_BANDS:
        low, high = centre / _HALF_OCTAVE, centre * _HALF_OCTAVE
        if low >= nyquist:
            break
        start, stop = np.searchsorted(freqs, (low, high), side="left")
        bands[label] = _level(float(spectrum[start:stop].sum()), offset_db)

    return {
        "leq_db": _level(total, offset_db),
        "lmax_db": _level(p_max, offset_db),
        "lmin_db": _level(p_min, offset_db),
        "duration_s": n / sample_rate,
        "samples": n,
        "sample_rate": sample_rate,
        "bands_db": bands,
    }
