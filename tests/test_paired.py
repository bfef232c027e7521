"""Paired tests of two models on the same images: McNemar (accuracy), DeLong (AUC)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from medlens.errors import DataError
from medlens.evaluation.paired import EXACT_BELOW, delong, mcnemar, paired_auc
from medlens.reporting.compare import promotion_line, promotion_verdict


def _paired(both: int, only_a: int, only_b: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-image correctness of models A and B from the cells of their paired 2x2 table."""
    a = np.r_[np.ones(both), np.ones(only_a), np.zeros(only_b), np.zeros(neither)].astype(bool)
    b = np.r_[np.ones(both), np.zeros(only_a), np.ones(only_b), np.zeros(neither)].astype(bool)
    return a, b


# --------------------------------------------------------------------------- McNemar


def test_mcnemar_on_agrestis_table_uses_the_continuity_corrected_chi_square():
    # Agresti, Categorical Data Analysis: approval of the prime minister in two surveys of
    # the same 1600 people, [[794, 150], [86, 570]]. The textbook's McNemar statistic
    # (without correction) is z^2 = 17.36; the corrected one is (|b-c|-1)^2/(b+c).
    r = mcnemar(*_paired(794, 150, 86, 570))
    b, c = 150, 86
    assert (r["n"], r["b"], r["c"]) == (1600, b, c)
    assert (b - c) ** 2 / (b + c) == pytest.approx(17.36, abs=0.005)
    assert r["method"] == "chi-square with continuity correction"
    assert r["statistic"] == pytest.approx((abs(b - c) - 1) ** 2 / (b + c))  # 16.818
    assert r["statistic"] == pytest.approx(16.818, abs=1e-3)
    assert r["p"] == pytest.approx(stats.chi2.sf(r["statistic"], 1))
    assert r["p"] == pytest.approx(4.11e-5, rel=0.01)
    assert r["accuracy_a"] == pytest.approx(944 / 1600)
    assert r["accuracy_b"] == pytest.approx(880 / 1600)
    assert r["difference"] == pytest.approx(-0.04)  # B - A = (c - b) / n
    lo, hi = r["ci"]
    assert lo < -0.04 < hi < 0


def test_mcnemar_few_discordant_pairs_is_exact_and_matches_newcombes_published_interval():
    # Cavo et al. (2012) as analysed in Fagerland, Lydersen & Laake, "Statistical Analysis of
    # Contingency Tables" (2017), ch. 8: [[59, 6], [16, 80]]; the Newcombe square-and-add
    # interval of p1+ - p+1 is -0.0621 (-0.1186 to -0.0046). With A the rows and B the
    # columns, B - A is +0.0621 (0.0046 to 0.1186).
    r = mcnemar(*_paired(59, 6, 16, 80))
    assert (r["b"], r["c"]) == (6, 16) and 6 + 16 < EXACT_BELOW
    assert r["method"] == "exact binomial"
    assert r["p"] == pytest.approx(stats.binomtest(6, 22, 0.5).pvalue)
    assert r["statistic"] == 6
    assert r["difference"] == pytest.approx(10 / 161)
    assert r["ci"] == pytest.approx([0.0046, 0.1186], abs=5e-5)
    assert "Newcombe" in r["ci_method"]
    swapped = mcnemar(*_paired(59, 16, 6, 80))  # A and B exchanged: the interval mirrors
    assert swapped["ci"] == pytest.approx([-0.1186, -0.0046], abs=5e-5)
    assert swapped["p"] == pytest.approx(r["p"])


def test_mcnemar_identical_models_and_extremes():
    a, _ = _paired(180, 0, 0, 20)
    r = mcnemar(a, a)
    assert (r["b"], r["c"], r["p"], r["difference"]) == (0, 0, 1.0, 0.0)
    lo, hi = r["ci"]
    assert lo == pytest.approx(-hi) and -0.02 < lo < 0  # 200 images: tighter than 2 points
    small = mcnemar(a[:40], a[:40])["ci"]
    assert small[0] < lo  # fewer images, a wider interval, even with no discordant pair
    worst = mcnemar(*_paired(0, 30, 0, 0))  # A right on every image, B on none
    assert worst["difference"] == -1.0 and worst["ci"][0] >= -1.0 and worst["ci"][1] < -0.8
    assert worst["method"].startswith("chi-square") and worst["p"] < 1e-6
    with pytest.raises(ValueError, match="1-D"):
        mcnemar([True, False], [True])


# --------------------------------------------------------------------------- DeLong


def test_delong_single_auc_variance_matches_the_hand_computed_closed_form():
    # Positives 0.9, 0.6, 0.4 and negatives 0.7, 0.4, 0.2 (one tie). By hand, with
    # psi(x, y) = 1 if x > y, 1/2 if x == y, 0 otherwise:
    #   V10 (per positive) = 1, 2/3, 1/2;  V01 (per negative) = 1/3, 5/6, 1
    #   AUC = 13/18;  S10 = var(V10) = 7/108, S01 = var(V01) = 13/108 (n - 1 denominators)
    #   var(AUC) = S10/3 + S01/3 = 5/81.
    y = [1, 1, 1, 0, 0, 0]
    s = [0.9, 0.6, 0.4, 0.7, 0.4, 0.2]
    r = delong(y, s, s)
    assert r["auc_a"] == pytest.approx(13 / 18)
    assert r["auc_a"] == pytest.approx(roc_auc_score(y, s))
    assert r["se_a"] == pytest.approx(math.sqrt(5 / 81))
    assert (r["difference"], r["se"], r["p"]) == (0.0, 0.0, 1.0)


def test_delong_auc_is_sklearns_with_ties_and_the_test_is_symmetric():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 120)
    a = np.round(y + rng.normal(0, 1.2, 120), 1)  # rounded: many ties
    b = np.round(y + rng.normal(0, 0.9, 120), 1)
    r = delong(y, a, b)
    assert r["auc_a"] == pytest.approx(roc_auc_score(y, a))
    assert r["auc_b"] == pytest.approx(roc_auc_score(y, b))
    assert r["difference"] == pytest.approx(r["auc_b"] - r["auc_a"])
    assert r["z"] == pytest.approx(r["difference"] / r["se"])
    assert r["p"] == pytest.approx(2 * stats.norm.sf(abs(r["z"])))
    assert r["ci"] == pytest.approx([r["difference"] - 1.959964 * r["se"],
                                     r["difference"] + 1.959964 * r["se"]], abs=1e-6)  # fmt: skip
    back = delong(y, b, a)
    assert back["difference"] == pytest.approx(-r["difference"])
    assert back["se"] == pytest.approx(r["se"]) and back["p"] == pytest.approx(r["p"])
    assert delong(y.astype(bool), a, b)["p"] == pytest.approx(r["p"])


@pytest.mark.slow
def test_delong_se_of_the_difference_agrees_with_a_paired_bootstrap():
    rng = np.random.default_rng(7)
    n = 300
    y = rng.integers(0, 2, n)
    shared = rng.normal(0, 1, n)  # correlated scores, as two models on the same images
    a = y + shared + rng.normal(0, 0.8, n)
    b = 1.3 * y + shared + rng.normal(0, 0.8, n)
    r = delong(y, a, b)
    diffs = []
    for _ in range(600):
        i = rng.integers(0, n, n)
        if 0 < y[i].sum() < n:
            diffs.append(roc_auc_score(y[i], b[i]) - roc_auc_score(y[i], a[i]))
    boot_se = float(np.std(diffs, ddof=1))
    assert r["se"] == pytest.approx(boot_se, rel=0.15)
    # Pairing matters: the SE of the difference is far below the unpaired sqrt(se_a^2+se_b^2).
    assert r["se"] < 0.8 * math.hypot(r["se_a"], r["se_b"])


def test_delong_needs_both_classes():
    with pytest.raises(DataError, match="at least 2 positive and 2 negative"):
        delong([1, 1, 1, 0], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="one length"):
        delong([1, 0, 1, 0], [0.1, 0.2, 0.3], [0.1, 0.2, 0.3, 0.4])


# --------------------------------------------------------------------------- multiclass


def _three_class(n: int = 240, seed: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    onehot = np.eye(3)[y]
    logits_a = 1.0 * onehot + rng.normal(0, 1, (n, 3))
    logits_b = 2.0 * onehot + rng.normal(0, 1, (n, 3))
    soft = lambda z: np.exp(z) / np.exp(z).sum(1, keepdims=True)  # noqa: E731
    return y, soft(logits_a), soft(logits_b)


def test_paired_auc_multiclass_per_class_delong_and_macro_bootstrap():
    y, pa, pb = _three_class()
    r = paired_auc(y, pa, pb, ["x", "y", "z"], n_bootstrap=500)
    assert set(r["per_class"]) == {"x", "y", "z"}
    for c, name in enumerate("xyz"):
        assert r["per_class"][name]["auc_a"] == pytest.approx(roc_auc_score(y == c, pa[:, c]))
    assert r["auc_a"] == pytest.approx(roc_auc_score(y, pa, multi_class="ovr", average="macro"))
    assert r["auc_b"] == pytest.approx(roc_auc_score(y, pb, multi_class="ovr", average="macro"))
    assert r["difference"] > 0 and r["ci"][0] < r["difference"] < r["ci"][1]
    assert r["ci"][0] > 0 and r["p"] < 0.05  # B is clearly better
    assert "bootstrap" in r["method"] and "DeLong" in r["method"]
    assert paired_auc(y, pa, pb, n_bootstrap=500)["ci"] == r["ci"]  # seeded: reproducible
    same = paired_auc(y, pa, pa, n_bootstrap=200)
    assert (same["difference"], same["ci"], same["p"]) == (0.0, [0.0, 0.0], 1.0)


def test_paired_auc_binary_is_delong_on_the_positive_column():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 80)
    pa = np.column_stack([1 - (p := rng.random(80)), p])
    pb = np.column_stack([1 - (q := np.clip(p + 0.3 * y, 0, 1)), q])
    r = paired_auc(y, pa, pb)
    assert r == delong(y, pa[:, 1], pb[:, 1])
    assert "per_class" not in r


# --------------------------------------------------------------------------- promotion gate


def _comparison(acc_ci: list[float], auc_ci: list[float]) -> dict:
    return {"mcnemar": {"ci": acc_ci}, "delong": {"ci": auc_ci}}


def test_promotion_passes_only_when_both_lower_bounds_clear_the_margin():
    ok = promotion_verdict(_comparison([-0.015, 0.02], [-0.01, 0.03]), 0.02)
    assert ok["promote"] and ok["failed"] == []
    assert ok["accuracy_lower"] == -0.015 and ok["auc_lower"] == -0.01
    assert promotion_line(ok).startswith("promote: not worse at margin 0.02")
    edge = promotion_verdict(_comparison([-0.02, 0.0], [0.0, 0.0]), 0.02)
    assert edge["promote"]  # the bound may touch -margin
    bad = promotion_verdict(_comparison([-0.05, 0.01], [-0.01, 0.03]), 0.02)
    assert not bad["promote"]
    assert [f["figure"] for f in bad["failed"]] == ["accuracy"]
    assert bad["failed"][0]["short_by"] == pytest.approx(0.03)
    line = promotion_line(bad)
    assert line.startswith("do not promote: accuracy") and "by 0.0300" in line
    both = promotion_verdict(_comparison([-0.05, 0.01], [-0.04, 0.03]), 0.0)
    assert [f["figure"] for f in both["failed"]] == ["accuracy", "auc"]
