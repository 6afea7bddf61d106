"""Tests for bench/__main__.py: the command line, run for real on SQLite files."""

from __future__ import annotations

import json
import sys

import pytest

from bench.__main__ import main


def _figures(out: str) -> dict[str, float]:
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {row["metric"]: row["value"] for row in rows}


def test_a_soak_at_a_given_rate_skips_the_throughput_run_it_would_take_half_of(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(sys, "argv", ["bench", "--scenario", "soak", "--backend", "sqlite",
                                      "--soak-seconds", "0.5", "--soak-rate", "200", "--json"])

    main()

    figures = _figures(capsys.readouterr().out)
    assert figures["soak_rate_jobs_per_s"] == 200
    assert 0 < figures["soak_jobs"] <= 120  # 20 every tenth of a second for 0.5 s
    assert "end_to_end_jobs_per_s" not in figures


@pytest.mark.parametrize("rate", ["0", "-5", "0.5", "nan", "inf", "2e6", "fast"])
def test_a_soak_rate_out_of_range_or_not_a_number_is_refused_by_name(
    rate: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(sys, "argv", ["bench", "--scenario", "soak", "--soak-rate", rate])

    with pytest.raises(SystemExit) as stopped:
        main()

    assert stopped.value.code == 2
    assert "--soak-rate" in capsys.readouterr().err
