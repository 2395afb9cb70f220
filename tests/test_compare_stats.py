"""The paired statistics behind `raysegbg compare` (issue #20)."""

from __future__ import annotations

import csv
import math

import pytest

from raysegbg.compare_stats import (
    Row,
    paired,
    summarize,
    t_cdf,
    t_quantile,
    verdict,
    write_report,
)


def test_student_t_matches_tables():
    assert t_quantile(0.975, 2) == pytest.approx(4.303, abs=1e-3)
    assert t_quantile(0.975, 10) == pytest.approx(2.228, abs=1e-3)
    assert t_quantile(0.975, 1000) == pytest.approx(1.962, abs=1e-3)
    assert t_cdf(0.0, 5) == pytest.approx(0.5) and t_cdf(-2.0, 3) == pytest.approx(
        1 - t_cdf(2.0, 3)
    )


def test_paired_difference_interval_and_p_values():
    d = paired([2, 3, 4, 5, 6], [1, 1, 1, 1, 1])  # differences 1..5
    assert d.mean == pytest.approx(3.0)
    half = 2.776 * math.sqrt(2.5) / math.sqrt(5)  # t(0.975, 4) x se
    assert (d.low, d.high) == (pytest.approx(3 - half, abs=1e-3), pytest.approx(3 + half, abs=1e-3))
    assert d.p_t == pytest.approx(0.0132, abs=5e-4)  # t = 4.243 at 4 df
    assert d.p_sign == pytest.approx(2 / 32)  # only all-plus and all-minus reach it
    three = paired([0.6, 0.61, 0.62], [0.5, 0.5, 0.5])
    assert three.p_sign == pytest.approx(0.25)  # 3 seeds: the sign-flip floor
    assert three.p_t < 0.05 and verdict(three) == "helps"
    assert verdict(paired([0.5, 0.6, 0.4], [0.5, 0.5, 0.5])) == "no evidence"
    assert verdict(paired([0.1, 0.1, 0.2], [0.3, 0.3, 0.3]), lower_is_better=True) == "helps"
    with pytest.raises(ValueError):
        paired([1.0], [])


def rows() -> list[Row]:
    out = []
    for seed, noise in enumerate((0.0, 0.01, -0.01)):
        base = 0.60 + noise
        m = {"miou": base, "fg_dice": base, "precision": 0.7, "fpr": 0.02}
        out.append(Row("baseline", "method", seed, m))
        # good: +5 points everywhere, and its control is the baseline's level
        out.append(Row("good", "method", seed, {**m, "miou": base + 0.05 + noise / 10}))
        out.append(Row("good", "control", seed, {**m, "miou": base + noise / 5}))
        # same: better than the baseline, but its control is just as good
        out.append(Row("same", "method", seed, {**m, "miou": base + 0.04}))
        out.append(Row("same", "control", seed, {**m, "miou": base + 0.04 + noise / 3}))
        # flat: no better than the baseline, and level with its control
        out.append(Row("flat", "method", seed, {**m, "miou": base + (0.01, -0.01, 0.0)[seed]}))
        out.append(Row("flat", "control", seed, {**m, "miou": base + (0.0, 0.01, -0.01)[seed]}))
    return out


def test_summary_verdicts_and_report(tmp_path):
    lines = {line["method"]: line for line in summarize(rows())}
    assert "verdict" not in lines["baseline"]
    assert lines["good"]["verdict"] == "helps" and lines["good"]["mechanism"] == "mechanism matters"
    assert lines["same"]["verdict"] == "helps"
    assert lines["same"]["mechanism"].startswith("architecture only")
    assert lines["baseline"].get("mechanism") is None
    assert lines["flat"]["verdict"] == "no evidence"
    assert lines["flat"]["mechanism"].startswith("no evidence")
    assert lines["good"]["miou"][0] == pytest.approx(0.65, abs=1e-3)
    write_report(list(lines.values()), tmp_path)
    table = (tmp_path / "compare.md").read_text()
    assert (
        "| good | masks | 3 |" in table and "mechanism matters" in table and "p_sign=0.250" in table
    )
    with (tmp_path / "compare.csv").open() as f:
        read = {r["method"]: r for r in csv.DictReader(f)}
    assert read["good"]["verdict"] == "helps" and float(read["good"]["diff_baseline"]) > 0.04
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="baseline"):
        summarize([r for r in rows() if r.method != "baseline"])


def test_an_undefined_metric_is_left_out_and_counted(tmp_path):
    """A run that predicts no foreground has no precision (nan): the mean is over the others
    and the table says how many were undefined; a metric no run defines reads n/a."""
    out = [r for r in rows() if r.method in ("baseline", "good")]
    out[1] = Row("good", "method", 0, {**out[1].metrics, "precision": math.nan})
    out = [Row(r.method, r.variant, r.seed, {**r.metrics, "fpr": math.nan})
           if r.method == "baseline" else r for r in out]  # fmt: skip
    lines = {line["method"]: line for line in summarize(out)}
    assert lines["good"]["precision"] == (pytest.approx(0.7), 0.0, 1)
    assert all(math.isnan(v) for v in lines["baseline"]["fpr"][:2])
    write_report(list(lines.values()), tmp_path)
    table = (tmp_path / "compare.md").read_text()
    assert "70.00 ± 0.00 (1 n/a)" in table and "| n/a |" in table


def test_t_cdf_is_exact_far_in_the_tail():
    """Two seeds whose differences agree to 1e-5 give a huge t: the p-value is tiny, not
    negative (the earlier numerical integration returned p_t = -1.23 here)."""
    for df in (1, 2, 3, 4, 9):
        assert t_cdf(0.0, df) == pytest.approx(0.5)
        assert 0.0 <= 1 - t_cdf(1e6, df) < 1e-5
        assert t_cdf(-2.0, df) == pytest.approx(1 - t_cdf(2.0, df))
    assert t_cdf(1.0, 1) == pytest.approx(0.75)  # Cauchy
    d = paired([0.05, 0.0500001], [0.60, 0.6000002])
    assert 0.0 <= d.p_t < 1e-3
