import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ewc.metrics import compute_metrics, summarize

R = [
    [0.9, 0.1, 0.2],
    [0.7, 0.8, 0.3],
    [0.6, 0.5, 0.95],
]
B = [0.1, 0.1, 0.1]


def test_metrics_by_hand():
    m = compute_metrics(R, B)
    assert m["acc"] == pytest.approx((0.6 + 0.5 + 0.95) / 3)
    assert m["bwt"] == pytest.approx(((0.6 - 0.9) + (0.5 - 0.8)) / 2)
    assert m["fwt"] == pytest.approx(((0.1 - 0.1) + (0.3 - 0.1)) / 2)
    assert m["forgetting"] == pytest.approx(((0.9 - 0.6) + (0.8 - 0.5)) / 2)


def test_single_task_has_no_transfer():
    assert compute_metrics([[0.8]], [0.1]) == {
        "acc": 0.8,
        "bwt": None,
        "fwt": None,
        "forgetting": None,
    }


@pytest.mark.parametrize(
    "matrix, match",
    [([[0.5, 0.5]], "square"), ([[50.0]], "percentages"), ([], "square")],
)
def test_bad_matrix(matrix, match):
    with pytest.raises(ValueError, match=match):
        compute_metrics(matrix, [0.1] * max(len(matrix), 1))


def test_random_init_length_checked():
    with pytest.raises(ValueError, match="3 entries"):
        compute_metrics(R, [0.1])


@given(
    arrays(
        np.float64,
        st.tuples(st.integers(2, 6)).map(lambda t: (t[0], t[0])),
        elements=st.floats(0, 1),
    )
)
def test_forgetting_bounds_backward_transfer(r):
    """Forgetting uses the best accuracy so far, which is at least the just-learned one."""
    m = compute_metrics(r, [0.0] * len(r))
    assert m["forgetting"] >= -m["bwt"] - 1e-12
    assert 0 <= m["acc"] <= 1


def test_summarize_mean_std_over_seeds():
    runs = [
        {"strategy": "ewc", "metrics": {"acc": 0.8, "bwt": -0.1, "fwt": 0.0, "forgetting": 0.1}},
        {"strategy": "ewc", "metrics": {"acc": 0.9, "bwt": -0.2, "fwt": 0.0, "forgetting": 0.2}},
        {
            "strategy": "naive",
            "metrics": {"acc": 0.5, "bwt": None, "fwt": None, "forgetting": None},
        },
    ]
    rows = summarize(runs)
    assert [r["strategy"] for r in rows] == ["ewc", "naive"]
    assert rows[0]["n"] == 2
    assert rows[0]["acc"]["mean"] == pytest.approx(0.85)
    assert rows[0]["acc"]["std"] == pytest.approx(math.sqrt(0.005))
    assert rows[1]["acc"] == {"mean": 0.5, "std": None}
    assert rows[1]["bwt"] == {"mean": None, "std": None}
