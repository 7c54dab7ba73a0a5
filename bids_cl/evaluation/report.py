"""Self-contained HTML summary of an evaluation (inline CSS and SVG; no scripts, no CDN)."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import pandas as pd

GROUP_METRICS = ("f1", "recall", "precision", "usl_rate", "dice", "ndsc", "wml_called_cl_rate")

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
.note { color: #555; font-size: 0.9em; } .warn { color: #a05a00; }
"""


def format_value(value: object, digits: int = 3) -> str:
    """A table cell: floats rounded, missing values as n/a."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        # small rates (voxel FPR) would round to 0.000: show them in scientific notation
        return f"{value:.2e}" if 0 < abs(value) < 0.01 else f"{value:.{digits}f}"
    return str(value)


def with_ci(value: object, low: object, high: object) -> str:
    """'0.640 [0.550, 0.710]', or just the value when there is no interval."""
    text = format_value(value)
    if isinstance(low, float) and not math.isnan(low):
        text += f" [{format_value(low)}, {format_value(high)}]"
    return text


def aggregate_display(aggregate: pd.DataFrame) -> pd.DataFrame:
    """The aggregate table with 'value [CI]' cells, for printing and the HTML page."""
    return pd.DataFrame({
        "metric": aggregate["metric"],
        "n_images": aggregate["n_images"],
        "mean [95% CI]": [
            with_ci(v, lo, hi) for v, lo, hi in
            zip(aggregate["mean"], aggregate["mean_ci_low"], aggregate["mean_ci_high"], strict=True)
        ],
        "pooled [95% CI]": [
            with_ci(v, lo, hi) for v, lo, hi in zip(
                aggregate["pooled"], aggregate["pooled_ci_low"], aggregate["pooled_ci_high"],
                strict=True,
            )
        ],
    })


def group_display(groups: pd.DataFrame, metrics: Sequence[str] = GROUP_METRICS) -> pd.DataFrame:
    """One row per group, one 'mean [CI]' column per metric (rows of one `by` column)."""
    rows = []
    for group, table in groups.groupby("group", sort=False):
        by_metric = table.set_index("metric")
        row: dict[str, object] = {"group": group, "n_images": by_metric["n_images"].iloc[0]}
        for metric in metrics:
            if metric in by_metric.index:
                m = by_metric.loc[metric]
                row[metric] = with_ci(m["mean"], m["mean_ci_low"], m["mean_ci_high"])
        rows.append(row)
    return pd.DataFrame(rows)


def html_table(table: pd.DataFrame) -> str:
    """An escaped HTML table of a DataFrame (no index)."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(format_value(v))}</td>" for v in row) + "</tr>"
        for row in table.itertuples(index=False)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def bar_chart_svg(labels: Sequence[str], values: Sequence[float], title: str) -> str:
    """Horizontal bars of values in [0, 1] (e.g. per-image F1), as inline SVG."""
    row_height, label_width, bar_width = 18, 260, 300
    height = row_height * len(labels) + 24
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_width + bar_width + 60}" '
        f'height="{height}" role="img" aria-label="{html.escape(title)}">'
    ]
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        y = 20 + i * row_height
        width = 0.0 if math.isnan(value) else max(0.0, min(1.0, value)) * bar_width
        parts.append(
            f'<text x="{label_width - 6}" y="{y + 12}" font-size="11" text-anchor="end">'
            f"{html.escape(label)}</text>"
            f'<rect x="{label_width}" y="{y + 2}" width="{width:.1f}" height="{row_height - 5}" '
            f'fill="#4c78a8"/><text x="{label_width + width + 4:.1f}" y="{y + 12}" '
            f'font-size="11">{format_value(value, 2)}</text>'
        )
    parts.append(f'<text x="{label_width}" y="12" font-size="11">{html.escape(title)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_html(
    *,
    settings: dict[str, object],
    aggregate: pd.DataFrame,
    images: pd.DataFrame,
    groups: pd.DataFrame | None,
    sizes: pd.DataFrame,
    types: pd.DataFrame | None,
    missing: pd.DataFrame,
    warnings: Sequence[str],
) -> str:
    """The whole summary page."""
    sections = [
        "<h1>bids_cl evaluation</h1>",
        '<p class="note">' + html.escape(
            "; ".join(f"{k}: {v}" for k, v in settings.items() if not isinstance(v, dict | list))
        ) + "</p>",
        "<h2>Aggregate</h2>",
        '<p class="note">mean = average of per-image scores; pooled = computed from counts '
        "summed over images; intervals are bootstrap percentiles over images.</p>",
        html_table(aggregate_display(aggregate)),
    ]
    if groups is not None and len(groups):
        sections.append("<h2>By group</h2>")
        sections.append('<p class="note">mean over the group\'s images [95% CI]; all metrics and '
                        "pooled values are in by_group.tsv.</p>")
        for by, table in groups.groupby("by", sort=False):
            sections.append(f"<h3>{html.escape(str(by))}</h3>")
            sections.append(html_table(group_display(table)))
    sections += ["<h2>By lesion size (µL)</h2>", html_table(sizes)]
    if types is not None:
        sections += ["<h2>By lesion type (phantom truth)</h2>", html_table(types)]
    image_columns = [c for c in (
        "prefix", "n_gt", "n_pred", "tp", "fp", "usl", "fn", "f1", "recall", "precision",
        "dice", "ndsc", "wml_called_cl", "resampled",
    ) if c in images]
    sections += [
        "<h2>Per image</h2>",
        bar_chart_svg(list(images["prefix"]), list(images["f1"].astype(float)), "lesion-wise F1"),
        html_table(images[image_columns]),
        "<h2>Missing pairs</h2>",
        html_table(missing) if len(missing) else "<p>None.</p>",
    ]
    if warnings:
        sections.append("<h2>Warnings</h2><ul>" + "".join(
            f'<li class="warn">{html.escape(w)}</li>' for w in warnings) + "</ul>")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>bids_cl evaluation</title><style>{_CSS}</style></head><body>"
        + "\n".join(sections) + "</body></html>\n"
    )
