"""Aggregate per-image results: means and pooled counts with bootstrap CIs, and breakdowns.

* mean: the average of the per-image scores;
* pooled: the score computed once from counts summed over images (each lesion weighs the same);
* CI: percentile interval of `n_boot` bootstrap resamples of the images (with replacement, same
  size, seeded), plus the bootstrap standard error of the mean.

Means average the per-image scores, computed with the run's 0/0 convention (``zero_division``);
pooled scores, and their resamples, follow the same convention on the summed counts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from bids_cl.evaluation.metrics import (
    DEFAULT_NDSC_R,
    DEFAULT_ZERO_DIVISION,
    DETECTED,
    FP,
    TP,
    USL,
    LesionCounts,
    VoxelCounts,
    safe_ratio,
    scores,
)

SCORE_NAMES = (
    "f1", "recall", "precision", "usl_rate",
    "dice", "ndsc", "voxel_tpr", "voxel_fpr", "voxel_fdr",
)
COUNT_NAMES = ("n_gt", "n_pred", "tp", "fp", "usl", "fn")
# Columns summed to pool the scores above.
POOLING_COLUMNS = ("tp", "fp", "usl", "fn", "n_gt", "voxel_tp", "voxel_fp", "voxel_fn", "n_voxels")
WML_NAMES = ("wml_called_cl_rate", "wml_lesions", "wml_called_cl", "pred_on_wml")
DEFAULT_SIZE_BINS_UL = (10.0, 25.0, 50.0, 100.0, 250.0)
AGGREGATE_COLUMNS = (
    "metric", "n_images", "mean", "mean_se", "mean_ci_low", "mean_ci_high",
    "pooled", "pooled_ci_low", "pooled_ci_high",
)
# Bound the (resamples x images x metrics) arrays of one bootstrap chunk.
_BOOTSTRAP_CHUNK_VALUES = 4_000_000

PooledFunction = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def pooled_scores(
    sums: dict[str, np.ndarray],
    r: float = DEFAULT_NDSC_R,
    zero_division: str = DEFAULT_ZERO_DIVISION,
) -> dict[str, np.ndarray]:
    """Scores and counts from counts summed over images (arrays: one value per resample)."""
    lesions = LesionCounts(sums["tp"], sums["fp"], sums["usl"], sums["fn"], sums["n_gt"])
    voxels = VoxelCounts(sums["voxel_tp"], sums["voxel_fp"], sums["voxel_fn"], sums["n_voxels"])
    out = scores(lesions, voxels, r=r, zero_division=zero_division)
    out["n_pred"] = lesions.n_pred
    out.update({name: sums[name] for name in ("n_gt", "tp", "fp", "usl", "fn")})
    return out


def pooled_wml(sums: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """WML lesions touched by a prediction / WML lesions, over all images; plus the totals."""
    out = {"wml_called_cl_rate": safe_ratio(sums["wml_called_cl"], sums["wml_lesions"], 0.0)}
    out.update({name: sums[name] for name in ("wml_lesions", "wml_called_cl", "pred_on_wml")})
    return out


def bootstrap_indices(n_items: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n_items) indices of resamples with replacement."""
    return rng.integers(0, n_items, size=(n_boot, n_items))


def _summary_rows(
    table: pd.DataFrame,
    metric_names: Sequence[str],
    pooling_columns: Sequence[str],
    pooled: PooledFunction,
    *,
    n_boot: int,
    seed: int,
    level: float,
) -> list[dict[str, object]]:
    """One row per metric: mean (+SE, CI) over the rows of `table` and pooled value (+CI)."""
    n = len(table)
    values = table[list(metric_names)].to_numpy(dtype=float)  # (n, k)
    counts = table[list(pooling_columns)].to_numpy(dtype=float)  # (n, c)
    whole = pooled({c: counts[:, i].sum() for i, c in enumerate(pooling_columns)})
    rows = [
        {
            "metric": name,
            "n_images": n,
            "mean": float(values[:, j].mean()) if n else np.nan,
            "pooled": float(whole[name]) if n else np.nan,
        }
        for j, name in enumerate(metric_names)
    ]
    if n == 0 or n_boot <= 0:
        return rows
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CHUNK_VALUES // (n * max(values.shape[1], counts.shape[1])))
    means, pooled_parts = [], []
    for start in range(0, n_boot, chunk):
        idx = bootstrap_indices(n, min(chunk, n_boot - start), rng)
        means.append(values[idx].mean(axis=1))
        sums = counts[idx].sum(axis=1)
        resampled = pooled({c: sums[:, i] for i, c in enumerate(pooling_columns)})
        pooled_parts.append(np.column_stack([resampled[name] for name in metric_names]))
    boot_means = np.concatenate(means)
    boot_pooled = np.concatenate(pooled_parts)
    tails = [(1.0 - level) / 2.0, 1.0 - (1.0 - level) / 2.0]
    mean_ci = np.quantile(boot_means, tails, axis=0)
    pooled_ci = np.quantile(boot_pooled, tails, axis=0)
    mean_se = boot_means.std(axis=0, ddof=1) if boot_means.shape[0] > 1 else np.zeros(len(rows))
    mean_se[mean_se < 1e-12] = 0.0  # identical resamples: rounding noise, not spread
    for j, row in enumerate(rows):
        row.update({
            "mean_se": float(mean_se[j]),
            "mean_ci_low": float(mean_ci[0, j]), "mean_ci_high": float(mean_ci[1, j]),
            "pooled_ci_low": float(pooled_ci[0, j]), "pooled_ci_high": float(pooled_ci[1, j]),
        })
    return rows


def summarise(
    images: pd.DataFrame,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    r: float = DEFAULT_NDSC_R,
    zero_division: str = DEFAULT_ZERO_DIVISION,
) -> pd.DataFrame:
    """The aggregate table of a set of images (rows of images.tsv).

    The per-image scores must have been computed with the same ``zero_division``. WML rows use
    only the images that have a WML mask (wml_lesions not missing).
    """
    rows = _summary_rows(
        images, SCORE_NAMES + COUNT_NAMES, POOLING_COLUMNS,
        lambda s: pooled_scores(s, r, zero_division),
        n_boot=n_boot, seed=seed, level=level,
    )
    if "wml_lesions" in images and images["wml_lesions"].notna().any():
        with_wml = images[images["wml_lesions"].notna()]
        rows += _summary_rows(
            with_wml, WML_NAMES, ("wml_lesions", "wml_called_cl", "pred_on_wml"), pooled_wml,
            n_boot=n_boot, seed=seed, level=level,
        )
    return pd.DataFrame(rows).reindex(columns=list(AGGREGATE_COLUMNS))


def group_key(value: object) -> str:
    """A group label: numbers without spurious decimals ("3.0" and 3 → "3"), missing → "n/a"."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    text = str(value).strip()
    try:
        return f"{float(text):g}"
    except ValueError:
        return text or "n/a"


def summarise_by(
    images: pd.DataFrame,
    columns: Sequence[str],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    r: float = DEFAULT_NDSC_R,
    zero_division: str = DEFAULT_ZERO_DIVISION,
) -> pd.DataFrame:
    """Aggregate tables per value of each column (long format: by, group, metric, ...)."""
    parts = []
    for column in columns:
        keys = images[column].map(group_key)
        for group in sorted(keys.unique()):
            table = summarise(images[keys == group], n_boot=n_boot, seed=seed, level=level, r=r,
                              zero_division=zero_division)
            table.insert(0, "group", group)
            table.insert(0, "by", column)
            parts.append(table)
    if not parts:
        return pd.DataFrame(columns=["by", "group", *AGGREGATE_COLUMNS])
    return pd.concat(parts, ignore_index=True)


def size_bin_labels(edges_ul: Sequence[float]) -> list[str]:
    """Labels of the bins [0, e1), [e1, e2), ..., [ek, inf) in µL."""
    edges = [f"{e:g}" for e in edges_ul]
    if not edges:
        return ["all"]
    inner = [f"{a}-{b}" for a, b in zip(edges[:-1], edges[1:], strict=True)]
    return [f"<{edges[0]}", *inner, f">={edges[-1]}"]


def assign_size_bins(volume_ul: pd.Series, edges_ul: Sequence[float]) -> pd.Series:
    """Size-bin label of each volume (µL); bins are closed on the left."""
    bounds = [0.0, *edges_ul, np.inf]
    return pd.cut(volume_ul, bins=bounds, right=False, labels=size_bin_labels(edges_ul))


def _verdict_table(
    lesions: pd.DataFrame, key: str | pd.Series, index: Sequence[str] | None
) -> pd.DataFrame:
    """Per key: GT detection counts/rates and predicted verdict counts/precision."""
    gt = lesions[lesions["source"] == "reference"]
    pred = lesions[lesions["source"] == "prediction"]
    gt_keys = key[gt.index] if isinstance(key, pd.Series) else gt[key]
    pred_keys = key[pred.index] if isinstance(key, pd.Series) else pred[key]
    gt_side = pd.DataFrame({
        "n_gt": gt.groupby(gt_keys, observed=False).size(),
        "gt_detected": (gt["verdict"] == DETECTED).groupby(gt_keys, observed=False).sum(),
        "gt_matched_by_tp": gt["matched_by_tp"].astype(bool).groupby(gt_keys, observed=False).sum(),
    })
    pred_side = pd.DataFrame({
        "n_pred": pred.groupby(pred_keys, observed=False).size(),
        "pred_tp": (pred["verdict"] == TP).groupby(pred_keys, observed=False).sum(),
        "pred_usl": (pred["verdict"] == USL).groupby(pred_keys, observed=False).sum(),
        "pred_fp": (pred["verdict"] == FP).groupby(pred_keys, observed=False).sum(),
    })
    table = gt_side.join(pred_side, how="outer")
    if index is not None:
        table = table.reindex(list(index))
    table = table.fillna(0).astype(int)
    table["gt_fn"] = table["n_gt"] - table["gt_detected"]
    # Lesion-level rates within the bin; a bin without lesions of that side gets n/a (NaN).
    with np.errstate(divide="ignore", invalid="ignore"):
        table["detection_rate"] = table["gt_detected"] / table["n_gt"].replace(0, np.nan)
        table["tp_match_rate"] = table["gt_matched_by_tp"] / table["n_gt"].replace(0, np.nan)
        table["precision"] = table["pred_tp"] / table["n_pred"].replace(0, np.nan)
    order = ["n_gt", "gt_detected", "gt_fn", "detection_rate", "gt_matched_by_tp",
             "tp_match_rate", "n_pred", "pred_tp", "pred_usl", "pred_fp", "precision"]
    return table[order]


def by_size(lesions: pd.DataFrame, edges_ul: Sequence[float] = DEFAULT_SIZE_BINS_UL) -> pd.DataFrame:
    """Verdict counts per lesion-size bin (GT lesions by GT volume, predictions by their volume)."""
    bins = assign_size_bins(lesions["volume_ul"], edges_ul).astype(str)
    table = _verdict_table(lesions, bins, size_bin_labels(edges_ul))
    table.index.name = "size_bin_ul"
    return table.reset_index()


def by_type(lesions: pd.DataFrame) -> pd.DataFrame | None:
    """Verdict counts per truth lesion type, over images with phantom truth (else None)."""
    if "type" not in lesions or lesions["type"].isna().all():
        return None
    # Only images with phantom truth have a type column; the others' lesions are left out.
    typed = lesions[lesions["type"].notna()]
    table = _verdict_table(typed, typed["type"].astype(str), None)
    table.index.name = "type"
    return table.reset_index()
