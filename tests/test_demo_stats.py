"""Small-sample statistics of the demo's comparisons, against textbook values."""

import pytest

from ihgrpo.demo.stats import mean_ci, paired_t, sign_flip_p, t_quantile, t_sf2


@pytest.mark.parametrize("df, q975", [(1, 12.7062), (4, 2.7764), (9, 2.2622), (30, 2.0423)])
def test_t_quantiles_match_the_table(df, q975):
    assert t_quantile(0.975, df) == pytest.approx(q975, abs=1e-4)
    assert t_sf2(q975, df) == pytest.approx(0.05, abs=1e-4)


def test_mean_ci():
    m, lo, hi = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])  # sd 1.5811, se 0.7071, t 2.7764
    assert m == 3.0 and lo == pytest.approx(3 - 1.9632, abs=1e-4) and hi == pytest.approx(3 + 1.9632, abs=1e-4)
    assert mean_ci([0.5]) == (0.5, 0.5, 0.5) and mean_ci([0.2, 0.2]) == (0.2, 0.2, 0.2)


def test_paired_t():
    # differences 1, 2, 3, 4, 6: mean 3.2, sd 1.9235, t = 3.7199, p = 0.02048 (df 4, integrating the density)
    t, p = paired_t([2, 4, 6, 8, 11], [1, 2, 3, 4, 5])
    assert t == pytest.approx(3.7199, abs=1e-4) and p == pytest.approx(0.02048, abs=1e-5)
    assert paired_t([0.5, 0.7], [0.5, 0.7]) == (0.0, 1.0)  # identical on every seed: no evidence at all
    assert paired_t([0.6, 0.7], [0.5, 0.6])[1] == 0.0  # the same nonzero difference on every seed
    with pytest.raises(ValueError, match="paired"):
        paired_t([1.0], [2.0])


def test_sign_flip_is_exact():
    assert sign_flip_p([1, 1, 1, 1, 1], [0, 0, 0, 0, 0]) == 2 / 32  # the smallest p with 5 pairs
    assert sign_flip_p([0.5] * 5, [0.5] * 5) == 1.0
    # differences 3, 1, -1 (sum 3): signed sums +-5, +-3, +-3, +-1, so 6 of the 8 reach |3|
    assert sign_flip_p([3, 1, 0], [0, 0, 1]) == 6 / 8
