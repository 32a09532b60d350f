"""Seed statistics for reports: 95% t-intervals and paired comparisons.

Runs that differ only in their seed are samples of a distribution; a table
that reports one number per arm hides how much the seed alone moves it. These
are the two summaries the benchmarks and the ablation driver report.
"""

import math
import warnings

import numpy as np
from scipy import stats as scipy_stats


def mean_and_ci95(values) -> tuple[float, float]:
  """The mean of `values` and the half-width of its 95% t-interval.

  Args:
    values: n >= 1 numbers (e.g. one final metric per seed).

  Returns:
    (mean, half-width); the half-width is 0 for a single value, which has no
    spread to estimate.
  """
  values = np.asarray(values, np.float64)
  mean = float(values.mean())
  if len(values) < 2:
    return mean, 0.0
  sem = float(values.std(ddof=1)) / math.sqrt(len(values))
  return mean, float(scipy_stats.t.ppf(0.975, len(values) - 1)) * sem


def paired_comparison(values, baseline) -> dict[str, float]:
  """How `values` differ from `baseline`, paired element by element.

  Pairs share everything but the arm (e.g. the same seed, so the same init
  draw and data order), so the seed's effect cancels in each difference.

  Args:
    values, baseline: equal-length sequences, element i of both from pair i.

  Returns:
    {'mean_difference': mean of values - baseline, 'ci95': the half-width of
    its 95% t-interval, 'p_value': two-sided paired t-test (scipy's
    `ttest_rel`; NaN for fewer than 2 pairs or when every difference is 0),
    'n': the number of pairs}.
  """
  values = np.asarray(values, np.float64)
  baseline = np.asarray(baseline, np.float64)
  if values.shape != baseline.shape or values.ndim != 1 or not len(values):
    raise ValueError(f'need two equal-length, non-empty sequences; got '
                     f'shapes {values.shape} and {baseline.shape}')
  mean, ci95 = mean_and_ci95(values - baseline)
  p_value = math.nan
  if len(values) >= 2 and np.any(values != baseline):
    # Near-constant differences make scipy warn about cancellation; the
    # p-value is then ~0, which is the right answer.
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', RuntimeWarning)
      p_value = float(scipy_stats.ttest_rel(values, baseline).pvalue)
  return {'mean_difference': mean, 'ci95': ci95, 'p_value': p_value,
          'n': len(values)}
