"""The benchmark's pure helpers: nearest-rank percentiles, summaries, rates, option lists and
the summary table's rows."""

from __future__ import annotations

import pytest

from eventdispatch.bench import parse_list, percentile, rate, rows, summary


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == 50
    assert percentile(values, 95) == 95
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile(values, 0) == 1


def test_percentile_ignores_input_order_and_handles_small_samples() -> None:
    assert percentile([30.0, 10.0, 20.0], 50) == 20
    assert percentile([30.0, 10.0, 20.0], 99) == 30
    assert percentile([7.0], 1) == 7


def test_percentile_of_nothing_is_none_and_out_of_range_is_refused() -> None:
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summary_counts_rounds_and_names_points() -> None:
    s = summary([1.04, 2.0, 3.0, 4.0], (50, 99))
    assert s == {"n": 4, "p50": 2.0, "p99": 4.0, "min": 1.0, "max": 4.0}
    assert summary([]) == {"n": 0, "p50": None, "p95": None, "p99": None, "min": None, "max": None}


def test_rate_of_an_empty_interval_is_zero() -> None:
    assert rate(100, 2.0) == 50
    assert rate(100, 0.0) == 0


def test_parse_list_refuses_unknown_parts() -> None:
    assert parse_list(" floor, e2e ,,", ("floor", "e2e")) == ["floor", "e2e"]
    with pytest.raises(ValueError, match="choose from"):
        parse_list("floor,nope", ("floor", "e2e"))


def test_rows_show_errors_and_measurements() -> None:
    result = {
        "parts": {
            "e2e": {
                "runs": [
                    {
                        "workers": 2,
                        "devices": 1000,
                        "executions_per_s": 500,
                        "decided_per_s": 600,
                        "ratio_to_floor": 0.5,
                    }
                ]
            },
            "timers": {"error": "RuntimeError: boom"},
        }
    }
    table = rows(result)
    assert ("timers", "error", "RuntimeError: boom", "p99 <= 250 ms, 0 early") in table
    assert any(r[0] == "e2e" and "500 exec/s" in r[2] for r in table)
