"""noise.spectrum: levels and octave bands of generated PCM with known answers."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from agent.errors import InvalidPayload
from agent.tasks.noise_spectrum import check_options, noise_spectrum

from support import pcm, sine

ALL_BANDS = ["31.5", "63", "125", "250", "500", "1000", "2000", "4000", "8000"]


def assert_finite_result(result: dict[str, Any]) -> None:
    assert set(result) == {"leq_db", "lmax_db", "lmin_db", "duration_s", "samples", "sample_rate", "bands_db"}
    for key in ("leq_db", "lmax_db", "lmin_db", "duration_s"):
        assert type(result[key]) is float
        assert math.isfinite(result[key])
    for level in result["bands_db"].values():
        assert type(level) is float
        assert math.isfinite(level)
        assert round(level, 2) == level
    json.dumps(result, allow_nan=False)


def test_one_kilohertz_sine() -> None:
    amplitude = 0.5
    result = noise_spectrum(pcm(sine(1000, amplitude, 1.0, 16000)), {"topic": "city/x/noise/1/pcm"})

    assert_finite_result(result)
    expected = 20 * math.log10(amplitude / math.sqrt(2))  # -9.03 dBFS
    assert result["leq_db"] == pytest.approx(expected, abs=0.05)
    assert result["lmax_db"] == pytest.approx(expected, abs=0.05)  # steady: every 125 ms frame is the same
    assert result["lmin_db"] == pytest.approx(expected, abs=0.05)
    assert result["samples"] == 16000
    assert result["sample_rate"] == 16000
    assert result["duration_s"] == 1.0
    bands = result["bands_db"]
    assert list(bands) == ALL_BANDS  # the 8 kHz band starts at 5.7 kHz, below the 8 kHz Nyquist limit
    assert bands["1000"] == pytest.approx(result["leq_db"], abs=0.2)
    for label, level in bands.items():
        if label != "1000":
            assert level <= result["leq_db"] - 30, label


def test_band_powers_add_up_to_the_total_power() -> None:
    # White noise: all but the few bins below the 31.5 Hz band's lower edge (22 Hz) fall in some band, and
    # the bands are normalised so their powers sum to the mean square of the samples (Parseval).
    rng = np.random.default_rng(3)
    result = noise_spectrum(pcm(rng.normal(0, 0.1, 16000)), {})
    band_power = sum(10 ** (level / 10) for level in result["bands_db"].values())
    total = 10 ** (result["leq_db"] / 10)
    assert band_power == pytest.approx(total * (1 - 22.1 / 8000), rel=0.02)
    assert band_power <= total


def test_loud_then_quiet_gives_lmax_and_lmin() -> None:
    loud = sine(500, 0.8, 0.5, 16000)
    quiet = sine(500, 0.008, 0.5, 16000)  # 40 dB lower
    result = noise_spectrum(pcm(np.concatenate([loud, quiet])), {})

    assert result["lmax_db"] == pytest.approx(20 * math.log10(0.8 / math.sqrt(2)), abs=0.05)
    assert result["lmin_db"] == pytest.approx(20 * math.log10(0.008 / math.sqrt(2)), abs=0.1)
    assert result["lmin_db"] < result["leq_db"] < result["lmax_db"]


def test_offset_calibrates_every_level() -> None:
    payload = pcm(sine(250, 0.1, 0.5, 16000))
    raw = noise_spectrum(payload, {})
    calibrated = noise_spectrum(payload, {"offset_db": 94.0})
    for key in ("leq_db", "lmax_db", "lmin_db"):
        assert calibrated[key] == pytest.approx(raw[key] + 94.0, abs=0.011)
    for label in raw["bands_db"]:
        assert calibrated["bands_db"][label] == pytest.approx(raw["bands_db"][label] + 94.0, abs=0.011)


def test_silence_is_finite() -> None:
    result = noise_spectrum(bytes(16000), {"offset_db": 30})
    assert_finite_result(result)
    assert result["leq_db"] == -170.0
    assert result["lmax_db"] == result["lmin_db"] == -170.0
    assert set(result["bands_db"].values()) == {-170.0}


def test_full_scale() -> None:
    result = noise_spectrum(pcm(np.full(800, -1.0)), {})
    assert result["leq_db"] == 0.0


def test_single_sample() -> None:
    result = noise_spectrum((16384).to_bytes(2, "little", signed=True), {})
    assert_finite_result(result)
    assert result["samples"] == 1
    assert result["duration_s"] == 1 / 16000
    assert result["leq_db"] == pytest.approx(20 * math.log10(0.5), abs=0.01)
    assert result["lmax_db"] == result["lmin_db"] == result["leq_db"]  # shorter than one 125 ms frame


def test_other_sample_rate() -> None:
    result = noise_spectrum(pcm(sine(1000, 0.25, 2.0, 8000)), {"sample_rate": 8000})
    assert_finite_result(result)
    assert result["samples"] == 16000
    assert result["duration_s"] == 2.0
    assert result["sample_rate"] == 8000
    # Nyquist is 4 kHz: the 8 kHz band (5.7–11.3 kHz) cannot be measured and is left out.
    assert list(result["bands_db"]) == ALL_BANDS[:-1]
    assert result["bands_db"]["1000"] == pytest.approx(20 * math.log10(0.25 / math.sqrt(2)), abs=0.2)


def test_high_frequency_lands_in_its_band_at_48_khz() -> None:
    result = noise_spectrum(pcm(sine(8000, 0.5, 0.25, 48000)), {"sample_rate": 48000})
    assert result["bands_db"]["8000"] == pytest.approx(result["leq_db"], abs=0.2)
    assert result["bands_db"]["4000"] < result["leq_db"] - 30


@pytest.mark.parametrize(
    ("payload", "detail"),
    [
        (b"", "the payload is empty"),
        (b"\x00\x01\x02", "3 bytes, an odd number"),
    ],
)
def test_invalid_pcm(payload: bytes, detail: str) -> None:
    with pytest.raises(InvalidPayload, match=detail):
        noise_spectrum(payload, {})


@pytest.mark.parametrize(
    ("options", "detail"),
    [
        ({"sample_rate": 0}, "'sample_rate' must be a positive whole number"),
        ({"sample_rate": "16000"}, "'sample_rate'"),
        ({"sample_rate": True}, "'sample_rate'"),
        ({"sample_rate": 44100.0}, "'sample_rate'"),
        ({"offset_db": float("nan")}, "'offset_db' must be a finite number"),
        ({"offset_db": "94"}, "'offset_db'"),
        ({"offset_db": False}, "'offset_db'"),
    ],
)
def test_bad_options_are_value_errors(options: dict[str, Any], detail: str) -> None:
    with pytest.raises(ValueError, match=detail):
        check_options(options)
    with pytest.raises(ValueError, match=detail):
        noise_spectrum(bytes(4), options)
