"""Change classes on constructed masks (bids_cl.longitudinal.change): every class, merges, splits, the
tolerance, the probability rescue of a faint earlier lesion, and the change map."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bids_cl.derivatives.spec import CHANGE_CODES, CHANGE_COLUMNS
from bids_cl.longitudinal.change import (
    ChangeRules,
    change_counts,
    change_map,
    classify_change,
    complete_table,
)

SHAPE = (40, 40, 40)
SPACING = (1.0, 1.0, 1.0)


def _box(labels: np.ndarray, lesion: int, corner: tuple[int, int, int], size: tuple[int, int, int]) -> None:
    i, j, k = corner
    a, b, c = size
    labels[i:i + a, j:j + b, k:k + c] = lesion


def _empty() -> np.ndarray:
    return np.zeros(SHAPE, dtype=np.int32)


def _rows(result) -> list[tuple]:
    t = result.table
    return [(None if pd.isna(r.lesion_id_before) else int(r.lesion_id_before),
             None if pd.isna(r.lesion_id_after) else int(r.lesion_id_after), r.change, r.merge_split)
            for r in t.itertuples()]


def test_each_class_on_one_pair_of_visits() -> None:
    before, after = _empty(), _empty()
    _box(before, 1, (2, 2, 2), (3, 3, 3))        # stable: 27 -> 27 voxels
    _box(after, 1, (2, 2, 2), (3, 3, 3))
    _box(before, 2, (10, 2, 2), (3, 3, 3))       # enlarging: 27 -> 64 (+137 %, +37 uL)
    _box(after, 2, (10, 2, 2), (4, 4, 4))
    _box(before, 3, (20, 2, 2), (4, 4, 4))       # shrinking: 64 -> 27 (-58 %, -37 uL)
    _box(after, 3, (20, 2, 2), (3, 3, 3))
    _box(before, 4, (30, 2, 2), (3, 3, 3))       # disappeared
    _box(after, 4, (30, 20, 20), (3, 3, 3))      # new, far from every earlier lesion
    result = classify_change(before, after, spacing=SPACING)
    assert _rows(result) == [(1, 1, "stable", "none"), (2, 2, "enlarging", "none"),
                             (3, 3, "shrinking", "none"), (None, 4, "new", "none"),
                             (4, None, "disappeared", "none")]
    t = result.table
    assert t["volume_before_ul"].tolist() == [27, 27, 64, 0, 27]
    assert t["volume_after_ul"].tolist() == [27, 64, 27, 27, 0]
    assert t["change_ul"].tolist() == [0, 37, -37, 27, -27]
    assert t["change_pct"].iloc[1] == pytest.approx(100 * 37 / 27)
    assert np.isnan(t["change_pct"].iloc[3]) and t["change_pct"].iloc[4] == -100
    assert change_counts(result) == {"new": 1, "enlarging": 1, "stable": 1, "shrinking": 1,
                                     "disappeared": 1}


def test_growth_needs_both_the_relative_and_the_absolute_threshold() -> None:
    # A 2-voxel lesion tripling is +200 % but only +4 uL: noise-sized, stable by the absolute rule.
    before, after = _empty(), _empty()
    _box(before, 1, (5, 5, 5), (2, 1, 1))
    _box(after, 1, (5, 5, 5), (3, 2, 1))
    # A large lesion growing by 30 uL is only +3 %: stable by the relative rule.
    _box(before, 2, (20, 5, 5), (10, 10, 10))
    _box(after, 2, (20, 5, 5), (10, 10, 10))
    _box(after, 2, (30, 5, 5), (1, 10, 3))
    result = classify_change(before, after, spacing=SPACING)
    assert [r[2] for r in _rows(result)] == ["stable", "stable"]
    loose = classify_change(before, after, spacing=SPACING, rules=ChangeRules(min_change_ul=1.0))
    assert [r[2] for r in _rows(loose)] == ["enlarging", "stable"]


def test_merge_gives_one_row_per_earlier_lesion() -> None:
    before, after = _empty(), _empty()
    _box(before, 1, (5, 5, 5), (3, 3, 3))
    _box(before, 2, (10, 5, 5), (3, 3, 3))
    _box(after, 1, (5, 5, 5), (8, 4, 4))          # both earlier lesions inside one later lesion
    result = classify_change(before, after, spacing=SPACING)
    assert _rows(result) == [(1, 1, "enlarging", "merge"), (2, 1, "enlarging", "merge")]
    # change of the group: 128 - 54 voxels on every row
    assert result.table["change_ul"].tolist() == [74, 74]
    assert result.table["volume_before_ul"].tolist() == [27, 27]
    assert change_counts(result)["enlarging"] == 1


def test_split_gives_one_row_per_later_lesion() -> None:
    before, after = _empty(), _empty()
    _box(before, 1, (5, 5, 5), (9, 3, 3))
    _box(after, 1, (5, 5, 5), (4, 3, 3))
    _box(after, 2, (10, 5, 5), (4, 3, 3))
    result = classify_change(before, after, spacing=SPACING)
    assert _rows(result) == [(1, 1, "stable", "split"), (1, 2, "stable", "split")]
    assert change_counts(result) == {"new": 0, "enlarging": 0, "stable": 2, "shrinking": 0,
                                     "disappeared": 0}


def test_tolerance_decides_whether_a_nearby_lesion_is_new() -> None:
    before, after = _empty(), _empty()
    _box(before, 1, (5, 5, 5), (3, 3, 3))
    _box(after, 1, (9, 5, 5), (3, 3, 3))          # one empty voxel between them: 2 mm apart
    assert _rows(classify_change(before, after, spacing=SPACING))[0][2] == "new"
    near = classify_change(before, after, spacing=SPACING, rules=ChangeRules(tolerance_mm=2.0))
    assert _rows(near) == [(1, 1, "stable", "none")]


def test_faint_earlier_lesion_below_threshold_is_not_new() -> None:
    before, after = _empty(), _empty()
    _box(after, 1, (5, 5, 5), (4, 4, 4))
    _box(after, 2, (25, 25, 25), (3, 3, 3))
    prob = np.zeros(SHAPE, dtype=np.float32)
    prob[5:8, 5:8, 5:8] = 0.4                     # below the 0.5 threshold: no earlier lesion, but there
    prob[25:28, 25:28, 25:28] = 0.05              # background noise: lesion 2 stays new
    result = classify_change(before, after, spacing=SPACING, prob_before=prob)
    assert _rows(result) == [(None, 1, "enlarging", "none"), (None, 2, "new", "none")]
    t = result.table
    assert t["probability_rescued"].tolist() == [True, False]
    assert t["prior_max_prob"].tolist() == pytest.approx([0.4, 0.05])
    assert t["volume_before_ul"].iloc[0] == 27 and t["change_ul"].iloc[0] == 64 - 27
    assert result.rescued == [1]
    # without the probability map the same lesion is new
    assert _rows(classify_change(before, after, spacing=SPACING))[0][2] == "new"


def test_volumes_come_from_the_lesion_tables_when_given() -> None:
    before, after = _empty(), _empty()
    _box(before, 1, (5, 5, 5), (3, 3, 3))
    _box(after, 1, (5, 5, 5), (3, 3, 3))
    # a lesion of the earlier table that resampling left without a voxel is still reported
    result = classify_change(before, after, spacing=SPACING, volumes_before={1: 30.0, 2: 8.0},
                             volumes_after={1: 31.0})
    assert _rows(result) == [(1, 1, "stable", "none"), (2, None, "disappeared", "none")]
    assert result.table["volume_after_ul"].tolist() == [31.0, 0.0]


def test_change_map_codes_and_disappeared_footprint() -> None:
    before, after = _empty(), _empty()
    _box(before, 1, (2, 2, 2), (3, 3, 3))
    _box(after, 1, (2, 2, 2), (3, 3, 3))
    _box(before, 2, (20, 2, 2), (3, 3, 3))
    _box(after, 2, (30, 30, 30), (2, 2, 2))
    result = classify_change(before, after, spacing=SPACING)
    out = change_map(after, before, result.after_class, result.before_class)
    assert out.dtype == np.uint8
    assert set(np.unique(out)) == {0, CHANGE_CODES["stable"], CHANGE_CODES["new"],
                                   CHANGE_CODES["disappeared"]}
    assert (out == CHANGE_CODES["disappeared"]).sum() == 27
    assert (out[30:32, 30:32, 30:32] == CHANGE_CODES["new"]).all()


def test_complete_table_has_the_contract_columns_and_positions() -> None:
    before, after = _empty(), _empty()
    _box(before, 1, (2, 2, 2), (3, 3, 3))
    _box(after, 1, (2, 2, 2), (3, 3, 3))
    _box(before, 2, (20, 2, 2), (3, 3, 3))
    result = classify_change(before, after, spacing=SPACING)
    before_table = pd.DataFrame({"lesion_id": [1, 2], "centroid_x": [1.0, 2.0], "centroid_y": [0.0, 0.0],
                                 "centroid_z": [0.0, 0.0], "mean_prob": [0.7, 0.8],
                                 "template_x": [5.0, 6.0], "template_y": [0.0, 0.0],
                                 "template_z": [0.0, 0.0]})
    after_table = pd.DataFrame({"lesion_id": [1], "centroid_x": [1.5], "centroid_y": [0.0],
                                "centroid_z": [0.0], "mean_prob": [0.9]})
    mapped = np.array([[10.0, 0, 0], [20.0, 0, 0]])
    table = complete_table(result.table, before_table, after_table, mapped)
    assert list(table.columns) == CHANGE_COLUMNS
    assert table["centroid_x"].tolist() == [1.5, 20.0]        # disappeared: E's centroid mapped
    assert np.isnan(table["template_x"].iloc[0]) and table["template_x"].iloc[1] == 6.0
    assert table["mean_prob_before"].tolist() == [0.7, 0.8]
    assert table["mean_prob_after"].iloc[0] == 0.9 and np.isnan(table["mean_prob_after"].iloc[1])


def test_rules_are_validated() -> None:
    with pytest.raises(ValueError, match="shrink_relative"):
        ChangeRules(shrink_relative=1.5)
