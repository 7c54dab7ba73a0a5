"""``group.html``: the group outputs on one offline page, linking to the participant reports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from bids_cl import __version__
from bids_cl.reports.html import box, esc, figure, fmt, now_iso, page, table_html

STAT_DIGITS = {"mean": 2, "sd": 2, "median": 2, "q1": 2, "q3": 2, "min": 2, "max": 2,
               "rho": 3, "p_value": 4, "total_volume_ul": 1, "median_volume_ul": 1,
               "field_strength": 1, "total_volume_ul_from": 1, "total_volume_ul_to": 1,
               "total_volume_ul_delta": 1, "total_volume_ul_pct_change": 1}

CHANGE_DIGITS = {"net_volume_change_ul": 1, "alignment_quality": 3, "years": 2,
                 "new_cl_per_year": 2}

# In the TSV, not on the page: constant per run or shown in the overview already.
HIDDEN_IMAGE_COLUMNS = ("model_version", "model_warning", "threshold", "connectivity",
                        "min_lesion_size", "min_lesion_size_voxels", "spaces", "n_warnings",
                        "bids_cl_version")


def _rel(out_dir: Path, path: Path) -> str:
    return Path(path).relative_to(out_dir).as_posix()


def _report_link(out_dir: Path) -> Any:
    def _cell(value: Any, row: pd.Series) -> str:
        report = out_dir / f"{value}.html"
        if report.exists():
            return f'<a href="{esc(report.name)}">{esc(value)}</a>'
        return esc(value)
    return _cell


def _prefix_link(out_dir: Path) -> Any:
    def _cell(value: Any, row: pd.Series) -> str:
        report = out_dir / f"{row['participant_id']}.html"
        if report.exists():
            return f'<a href="{esc(report.name)}#{esc(value)}">{esc(value)}</a>'
        return esc(value)
    return _cell


def _file_link(value: Any, row: pd.Series) -> str:
    if not isinstance(value, str):
        return "n/a"
    return f'<a href="{esc(value)}">{esc(value)}</a>'


def _status_cell(value: Any, row: pd.Series) -> str:
    return f'<span class="status-{esc(value)}">{esc(value)}</span>'


def _figure_block(out_dir: Path, paths: list[Path] | Path, caption: str, alt: str) -> str:
    paths = paths if isinstance(paths, list) else [paths]
    png = next((p for p in paths if p.suffix == ".png"), None)
    svg = next((p for p in paths if p.suffix == ".svg"), None)
    if png is None:
        return ""
    if svg is not None:
        caption += f' (<a href="{esc(_rel(out_dir, svg))}">SVG</a>)'
    return figure(_rel(out_dir, png), caption, alt=alt)


def render_group_html(*, out_dir: Path, table: pd.DataFrame, lesions: pd.DataFrame,
                      status: pd.DataFrame, descriptive: pd.DataFrame,
                      correlations: pd.DataFrame, longitudinal: pd.DataFrame,
                      figures: dict[str, Any], frequency: list[tuple[Any, Any]],
                      files: dict[str, Path], categorical: list[str], numeric: list[str],
                      warnings: list[str], changes: pd.DataFrame | None = None) -> str:
    counts = status["status"].value_counts()
    n_ok = int(counts.get("ok", 0))
    n_partial = int(counts.get("partial", 0))
    n_failed = int(counts.get("failed", 0))
    n_missing = int(counts.get("missing", 0))
    parts = ['<section id="overview"><h2>Overview</h2>',
             f"<p>{len(status)} participant(s) considered: <span class=\"status-ok\">{n_ok} ok"
             f"</span>, <span class=\"status-partial\">{n_partial} partial</span>, "
             f"<span class=\"status-failed\">{n_failed} failed</span>, "
             f"<span class=\"status-missing\">{n_missing} missing</span>. "
             f"{len(table)} image(s) segmented, {len(lesions)} lesion(s) in total.</p>"]
    if not table.empty:
        models = table[["model_name", "model_version"]].drop_duplicates()
        names = ", ".join(f"{fmt(m)} {fmt(v) if pd.notna(v) else ''}".strip()
                          for m, v in models.itertuples(index=False))
        parts.append(f"<p>Model(s): {esc(names)}.</p>")
        for warning in table["model_warning"].dropna().unique():
            parts.append(box(f"<b>Model:</b> {esc(warning)}", "warning", raw=True))
        ood = table[table["ood_warning"].notna()]
        if not ood.empty:
            parts.append(box("<b>Out-of-distribution warnings</b> for " + ", ".join(
                esc(p) for p in ood["prefix"]) + ": treat these images' numbers with care.",
                "warning", raw=True))
    if n_failed or n_partial or n_missing:
        bad = status[status["status"] != "ok"]
        parts.append(box("Not every participant has complete outputs: " + ", ".join(
            f"{esc(r.participant_id)} ({esc(r.status)})" for r in bad.itertuples())
            + f". See <a href=\"#participants\">Participants</a> and "
            f"<code>{esc(files['status'].name)}</code>.", "error", raw=True))
    for warning in warnings:
        parts.append(box(warning, "error"))
    parts.append("</section>")

    parts += ['<section id="participants"><h2>Participants</h2>',
              table_html(status, rows_key="status", cell_html={
                  "participant_id": _report_link(out_dir), "status": _status_cell,
                  "report": _file_link}),
              "</section>"]

    parts += ['<section id="images"><h2>Lesions per image</h2>',
              f'<p class="note">{esc(files["images"].name)}: one row per target image, '
              "participants.tsv columns joined; each prefix links to its section of the "
              "participant report. Every lesion is in "
              f"<code>{esc(files['lesions'].name)}</code>.</p>",
              table_html(table.drop(columns=[c for c in HIDDEN_IMAGE_COLUMNS if c in table]),
                         rows_key="images", digits=STAT_DIGITS,
                         cell_html={"prefix": _prefix_link(out_dir),
                                    "participant_id": _report_link(out_dir)}),
              "</section>"]

    parts += ['<section id="statistics"><h2>Statistics</h2>',
              "<h3>Descriptive statistics</h3>",
              '<p class="note">One observation per image (n_images), with the number of distinct '
              "participants; by session, sequence, field strength and every categorical column of "
              f"participants.tsv ({esc(', '.join(categorical) or 'none')}).</p>",
              table_html(descriptive, rows_key="descriptive", digits=STAT_DIGITS),
              "<h3>Correlations (Spearman)</h3>",
              '<p class="note">Per session and sequence, one observation per participant; numeric '
              f"participants.tsv columns: {esc(', '.join(numeric) or 'none')}. p values are "
              "uncorrected.</p>"]
    parts.append(table_html(correlations, rows_key="correlations", digits=STAT_DIGITS)
                 if not correlations.empty else '<p class="note">No numeric covariate.</p>')
    parts.append("<h3>Change between sessions</h3>")
    parts.append(table_html(longitudinal, rows_key="longitudinal", digits=STAT_DIGITS)
                 if not longitudinal.empty else
                 '<p class="note">No participant with two or more sessions.</p>')
    parts.append("</section>")
    if changes is not None and not changes.empty:
        parts += ['<section id="changes"><h2>New and enlarging lesions</h2>',
                  f'<p class="note">{esc(files["change"].name)}: one row per participant and pair '
                  "of sessions (consecutive, and baseline to last with three or more), from the "
                  "lesion-level change outputs; <code>new_cl_per_year</code> divides the new "
                  "lesions by the years between the visits' <code>acq_time</code> in "
                  "<code>sessions.tsv</code> (n/a without both dates). A refused pair (poor "
                  "alignment) has its reason and no counts.</p>",
                  table_html(changes, rows_key="changes", digits=CHANGE_DIGITS,
                             cell_html={"participant_id": _report_link(out_dir)}),
                  "</section>"]

    parts.append('<section id="plots"><h2>Plots</h2>')
    if "distributions" in figures:
        parts.append(_figure_block(out_dir, figures["distributions"],
                                   "Distributions: lesions per image, total lesion volume per "
                                   "image and the volume of every lesion.", "distributions"))
    for key, paths in figures.items():
        if key.startswith("by:"):
            col = key[3:]
            parts.append(_figure_block(out_dir, paths, f"By {esc(col)}: one point per image.",
                                       f"by {col}"))
    if "trajectories" in figures:
        parts.append(_figure_block(out_dir, figures["trajectories"],
                                   "Per-session trajectories: one line per participant and "
                                   "target.", "trajectories"))
    if not figures:
        parts.append('<p class="note">No plot (no segmented image).</p>')
    parts.append("</section>")

    parts.append('<section id="frequency"><h2>Lesion frequency map</h2>')
    if not frequency:
        parts.append('<p class="note">No template-space lesion mask among the outputs.</p>')
    for fmap, tpl in frequency:
        key = f"frequency:{fmap.space}"
        background = (f"over the {esc(fmap.space)} template" if tpl is not None else
                      "on a black background (template not available here)")
        caption = (f"{esc(fmap.space)}: fraction of participant-sessions with a lesion at each "
                   f"voxel ({fmap.n_votes} participant-session(s) of {fmap.n_participants} "
                   f"participant(s); maximum {fmap.max_frequency:.2f}), {background}. One vote "
                   "per participant per session: the session's targets are merged first. Map: "
                   f'<a href="{esc(_rel(out_dir, fmap.path))}">{esc(fmap.path.name)}</a>.')
        if key in figures:
            parts.append(_figure_block(out_dir, figures[key], caption, f"frequency {fmap.space}"))
        else:
            parts.append(f"<p>{caption}</p>")
        if fmap.skipped:
            parts.append(box("Skipped masks: " + "; ".join(fmap.skipped), "warning"))
    parts.append("</section>")

    links = "".join(f'<li><a href="{esc(p.name)}">{esc(p.name)}</a></li>'
                    for key, p in files.items() if key != "html" and p.exists())
    links += "".join(f'<li><a href="{esc(_rel(out_dir, f.path))}">{esc(f.path.name)}</a></li>'
                     for f, _ in frequency)
    parts += ['<section id="files"><h2>Files</h2>', f"<ul>{links}</ul>",
              '<p class="note">Rebuilt from the participant outputs each time the group level '
              "runs; participants that failed or were not processed are listed above and in "
              f"<code>{esc(files['status'].name)}</code>.</p></section>"]

    nav = [("overview", "Overview"), ("participants", "Participants"), ("images", "Images"),
           ("statistics", "Statistics"),
           *([("changes", "New lesions")] if changes is not None and not changes.empty else []),
           ("plots", "Plots"), ("frequency", "Frequency map"), ("files", "Files")]
    meta = f"bids_cl {esc(__version__)} &middot; group report generated {esc(now_iso())}"
    return page("bids_cl: group report", "\n".join(parts), nav=nav, meta=meta)
