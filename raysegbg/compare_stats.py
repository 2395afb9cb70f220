"""The statistics of `raysegbg compare` (issue #20): is a method better than the baseline, and
is that due to its mechanism, over a few seeds?

Each method runs at the same seeds as the baseline and as its mechanism-off control, so the
comparisons are paired by seed: the per-seed differences of a metric, their mean, a Student-t
95 % confidence interval, the t-test's two-sided p-value and the exact sign-flip
(permutation) p-value. With n seeds the sign-flip test cannot go below 2 / 2^n (0.25 at 3
seeds), so the verdicts use the t interval; the report prints both.
"""

from __future__ import annotations

import csv
import itertools
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

METRICS = ("miou", "fg_dice", "precision", "fpr")  # fpr: lower is better
LOWER_IS_BETTER = {"fpr"}
BASELINE = "baseline"


def t_cdf(x: float, df: int) -> float:
    """Student-t CDF for an integer df, in closed form (Abramowitz & Stegun 26.7.3-4: a finite
    series in cos(θ), θ = atan(|x| / √df)), exact for any |x|, however large."""
    theta = math.atan(abs(x) / math.sqrt(df))
    sin, cos2 = math.sin(theta), math.cos(theta) ** 2
    series, term = 1.0, 1.0
    if df % 2:  # odd: (2/π)(θ + sinθ cosθ (1 + 2/3 cos²θ + 2·4/(3·5) cos⁴θ + ...))
        for k in range(1, (df - 1) // 2):
            term *= 2 * k / (2 * k + 1) * cos2
            series += term
        inside = 2 / math.pi * (theta + (sin * math.cos(theta) * series if df > 1 else 0.0))
    else:  # even: sinθ (1 + 1/2 cos²θ + 1·3/(2·4) cos⁴θ + ...)
        for k in range(1, df // 2):
            term *= (2 * k - 1) / (2 * k) * cos2
            series += term
        inside = sin * series
    return 0.5 + inside / 2 if x >= 0 else 0.5 - inside / 2


def t_quantile(p: float, df: int) -> float:
    """The x with t_cdf(x, df) = p (bisection), e.g. 4.303 for (0.975, 2)."""
    low, high = -1000.0, 1000.0
    for _ in range(80):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


@dataclass(frozen=True)
class Paired:
    """a − b over paired seeds."""

    n: int
    mean: float
    low: float  # 95 % t interval (nan with one pair)
    high: float
    p_t: float  # two-sided paired t-test
    p_sign: float  # exact two-sided sign-flip test


def paired(a: list[float], b: list[float]) -> Paired:
    if len(a) != len(b) or not a:
        raise ValueError(f"paired values need equal, non-empty lists (got {len(a)} and {len(b)})")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    n, mean = len(diffs), statistics.fmean(diffs)
    if n < 2:
        return Paired(n, mean, math.nan, math.nan, math.nan, 1.0)
    sd = statistics.stdev(diffs)
    if sd == 0:  # every seed moved by the same amount
        p = 0.0 if mean != 0 else 1.0
        return Paired(n, mean, mean, mean, p, _sign_flip(diffs))
    se = sd / math.sqrt(n)
    half = t_quantile(0.975, n - 1) * se
    p_t = 2 * (1 - t_cdf(abs(mean) / se, n - 1))
    return Paired(n, mean, mean - half, mean + half, p_t, _sign_flip(diffs))


def _sign_flip(diffs: list[float]) -> float:
    """Share of the 2^n sign patterns whose |mean| reaches the observed one."""
    observed = abs(sum(diffs)) - 1e-12
    flips = list(itertools.product((1, -1), repeat=len(diffs)))
    reach = [
        abs(sum(s * d for s, d in zip(signs, diffs, strict=True))) >= observed for signs in flips
    ]
    return sum(reach) / len(flips)


def verdict(d: Paired, lower_is_better: bool = False) -> str:
    """helps / hurts when the 95 % interval excludes 0, else no evidence."""
    if math.isnan(d.low):
        return "no evidence"
    good, bad = (d.high < 0, d.low > 0) if lower_is_better else (d.low > 0, d.high < 0)
    return "helps" if good else "hurts" if bad else "no evidence"


def mechanism_verdict(method_vs_control: Paired, vs_baseline: str = "no evidence") -> str:
    """Whether the method's own mechanism (not only its extra architecture) helps: above its
    control, "mechanism matters"; level with it, "architecture only" when the method beats
    the baseline (its control does too), else no evidence either way."""
    found = verdict(method_vs_control)
    if found == "helps":
        return "mechanism matters"
    if found == "hurts":
        return "mechanism hurts"
    if vs_baseline == "helps":
        return "architecture only (the control is as good)"
    return "no evidence (method level with its control)"


@dataclass
class Row:
    method: str
    variant: str  # "method" or "control" (the mechanism switched off)
    seed: int
    metrics: dict[str, float]


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """(mean, std, how many were undefined) over the defined values: a run that predicts no
    foreground has no precision (nan); it is left out and counted, not allowed to blank the
    mean. (nan, nan, n) when none is defined."""
    defined = [v for v in values if math.isfinite(v)]
    if not defined:
        return math.nan, math.nan, len(values)
    std = statistics.stdev(defined) if len(defined) > 1 else 0.0
    return statistics.fmean(defined), std, len(values) - len(defined)


def summarize(rows: list[Row], metric: str = "miou") -> list[dict[str, object]]:
    """One line per method: mean ± std of every metric, the paired difference of `metric` to
    the baseline and to the method's control, and the verdicts."""
    by: dict[tuple[str, str], dict[int, dict[str, float]]] = {}
    for r in rows:
        by.setdefault((r.method, r.variant), {})[r.seed] = r.metrics
    base = by.get((BASELINE, "method"))
    if base is None:
        raise ValueError("no baseline runs: compare needs the baseline method")
    out = []
    for (method, variant), seeds in sorted(by.items()):
        if variant != "method":
            continue
        line: dict[str, object] = {"method": method, "seeds": len(seeds)}
        for m in METRICS:
            line[m] = mean_std([s[m] for s in seeds.values() if m in s])
        if method != BASELINE:
            common = sorted(set(seeds) & set(base))
            vs_base = paired([seeds[s][metric] for s in common], [base[s][metric] for s in common])
            line["vs_baseline"] = vs_base
            line["verdict"] = verdict(vs_base, metric in LOWER_IS_BETTER)
            control = by.get((method, "control"))
            if control:
                both = sorted(set(seeds) & set(control))
                vs_control = paired(
                    [seeds[s][metric] for s in both], [control[s][metric] for s in both]
                )
                line["vs_control"] = vs_control
                line["mechanism"] = mechanism_verdict(vs_control, str(line["verdict"]))
        out.append(line)
    return out


def _pct(x: float) -> str:
    return f"{100 * x:+.2f}" if not math.isnan(x) else "n/a"


def _mean_std(mean: float, std: float, undefined: int) -> str:
    if math.isnan(mean):
        return "n/a"
    text = f"{100 * mean:.2f} ± {100 * std:.2f}"
    return text + (f" ({undefined} n/a)" if undefined else "")


def _diff(d: Paired | None) -> str:
    if d is None:
        return "-"
    return (f"{_pct(d.mean)} [{_pct(d.low)}, {_pct(d.high)}] p_t={d.p_t:.3f} "
            f"p_sign={d.p_sign:.3f}")  # fmt: skip


def write_report(lines: list[dict[str, object]], folder: Path, metric: str = "miou") -> None:
    """`compare.md` (a table a person reads) and `compare.csv` (one row per method)."""
    folder.mkdir(parents=True, exist_ok=True)
    head = ["method", "trained from", "seeds", *METRICS, f"{metric} vs baseline", "verdict",
            f"{metric} vs control", "mechanism"]  # fmt: skip
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    with (folder / "compare.csv.tmp").open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["method", "supervision", "seeds",
                      *(f"{m}_{s}" for m in METRICS for s in ("mean", "std")),
                      "diff_baseline", "ci_low", "ci_high", "p_t", "p_sign", "verdict",
                      "diff_control", "control_ci_low", "control_ci_high", "control_p_t",
                      "mechanism"])  # fmt: skip
        for line in lines:
            base, ctrl = line.get("vs_baseline"), line.get("vs_control")
            cells = [_mean_std(*line[m]) for m in METRICS]
            md.append("| " + " | ".join([str(line["method"]), str(line.get("supervision", "masks")),
                      str(line["seeds"]), *cells,
                      _diff(base), str(line.get("verdict", "-")), _diff(ctrl),
                      str(line.get("mechanism", "-"))]) + " |")  # fmt: skip
            stats = [v for m in METRICS for v in line[m][:2]]
            b = [base.mean, base.low, base.high, base.p_t, base.p_sign] if base else [""] * 5
            c = [ctrl.mean, ctrl.low, ctrl.high, ctrl.p_t] if ctrl else [""] * 4
            out.writerow([line["method"], line.get("supervision", "masks"), line["seeds"], *stats,
                          *b, line.get("verdict", ""),
                          *c, line.get("mechanism", "")])  # fmt: skip
    (folder / "compare.csv.tmp").replace(folder / "compare.csv")
    (folder / "compare.md.tmp").write_text("\n".join(md) + "\n")
    (folder / "compare.md.tmp").replace(folder / "compare.md")
