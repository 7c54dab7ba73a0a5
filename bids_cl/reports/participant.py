"""The participant report: ``out_dir/sub-<label>.html`` with figures in ``sub-<label>/figures/``.

In the spirit of fMRIPrep's reports, built only from the derivatives (so ``--reports-only`` can rebuild
it at any time): one section per target image with the brain-mask check, the registration check, a
mosaic of the detected lesions and the lesion table, then what was run and the errors of failed
targets. Every figure is drawn inside its own ``try``: a figure that cannot be drawn becomes a message
in the page, never a missing report.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from bids_cl import __version__
from bids_cl.derivatives import spec
from bids_cl.derivatives.reader import (
    ChangeOutputs,
    Crash,
    TargetOutputs,
    collect_changes,
    collect_crashes,
    collect_targets,
    latest_run_dir,
    model_name,
    model_warning,
    output_participants,
    participant_label,
    participant_status,
    read_json,
    run_timings,
)
from bids_cl.reports import figures as figs
from bids_cl.reports.html import box, esc, fmt, kv_table, now_iso, page, table_html
from bids_cl.reports.html import figure as figure_html
from bids_cl.reports.templates import Template, resolve_template
from bids_cl.utils.io import atomic_write_text

LOGGER = logging.getLogger("bids_cl.reports")
MAX_LESIONS = 30
LESION_DIGITS = {"volume_ul": 2, "mean_prob": 3, "max_prob": 3, "uncertainty": 3,
                 "centroid_i": 1, "centroid_j": 1, "centroid_k": 1, "centroid_x": 1,
                 "centroid_y": 1, "centroid_z": 1, "template_x": 1, "template_y": 1,
                 "template_z": 1}


# Where the lesion threshold and minimum size came from (engine summary "...Source").
_THRESHOLD_SOURCES = {"user": "--threshold", "model": "the model's, tuned on its validation split",
                      "default": "nnU-Net's argmax"}
_MIN_SIZE_SOURCES = {"user": "--min-lesion-size", "model": "the model's, tuned on its validation split",
                     "default": "every lesion kept"}


def _with_source(value: Any, source: str | None, sources: Mapping[str, str]) -> Any:
    if not source:  # derivatives written before the source was recorded
        return value
    return f"{value} ({sources.get(source, source)})"


def _threshold_text(summary: Mapping[str, Any]) -> Any:
    return _with_source(summary.get("Threshold"), summary.get("ThresholdSource"), _THRESHOLD_SOURCES)


def _min_size_text(summary: Mapping[str, Any]) -> Any:
    size = summary.get("MinLesionSize")
    voxels = summary.get("MinLesionSizeVoxels")
    if size is not None and voxels is not None and str(size) != str(voxels):
        size = f"{size} = {voxels} voxels"
    return _with_source("none" if size is None else size, summary.get("MinLesionSizeSource"),
                        _MIN_SIZE_SOURCES)


def generate_participant_report(out_dir: str | Path, participant_label: str, *,
                                templates: Mapping[str, Any] | None = None,
                                template_lookup: bool = True,
                                max_lesions: int = MAX_LESIONS) -> Path:
    """Write ``out_dir/sub-<label>.html`` (and its figures) from the derivatives; return its path.

    ``templates`` maps a template space to its T1w (path, ``(t1w, mask)`` or ``TemplateFiles``) for
    the registration figure; spaces not given are looked up with ``bids_cl.preproc.get_template``
    unless ``template_lookup`` is false. Without a template the figure is replaced by a note.
    """
    out_dir = Path(out_dir)
    label = _label(participant_label)
    fig_dir = out_dir / f"sub-{label}" / "figures"
    targets = collect_targets(out_dir, label)
    status = participant_status(out_dir, label, targets)
    crashes = collect_crashes(out_dir, label)
    cache: dict[str, Template | None] = {}

    nav = [("summary", "Summary")]
    sections = [_summary_section(label, targets, status)]
    for target in targets:
        anchor = target.prefix
        nav.append((anchor, _short(target)))
        sections.append(_target_section(out_dir, target, fig_dir, templates, template_lookup,
                                        cache, max_lesions))
    changes = collect_changes(out_dir, label)
    if changes:
        nav.append(("changes", "Change"))
        sections.append(_changes_section(out_dir, changes, targets, fig_dir, max_lesions))
    nav.append(("errors", "Errors"))
    sections.append(_errors_section(out_dir, crashes, status))
    nav.append(("about", "About"))
    sections.append(_about_section(out_dir, label))

    meta = (f"bids_cl {esc(__version__)} &middot; report generated {esc(now_iso())} &middot; "
            f"{len(targets)} target image(s)")
    text = page(f"bids_cl: sub-{label}", "\n".join(sections), nav=nav, meta=meta)
    return atomic_write_text(out_dir / spec.report_name(label), text)


def generate_reports(out_dir: str | Path, participant_labels: list[str] | None = None, *,
                     templates: Mapping[str, Any] | None = None,
                     template_lookup: bool = True) -> list[Path]:
    """Reports for the given participants (default: every ``sub-*`` in ``out_dir``).

    For ``--reports-only``: a participant whose report cannot be written is logged and skipped so the
    others still get theirs; the returned list holds the reports written.
    """
    out_dir = Path(out_dir)
    labels = [_label(p) for p in participant_labels] if participant_labels else \
        output_participants(out_dir)
    written = []
    for label in labels:
        try:
            written.append(generate_participant_report(out_dir, label, templates=templates,
                                                       template_lookup=template_lookup))
        except Exception:  # one broken participant must not stop the others
            LOGGER.exception("report for sub-%s failed", label)
    return written


# ------------------------------------------------------------------------------------ sections
def _label(value: str) -> str:
    return participant_label(value)


def _short(target: TargetOutputs) -> str:
    """Navigation label: the prefix without the ``sub-X_`` part."""
    rest = target.prefix.split("_", 1)
    return rest[1] if len(rest) > 1 else target.prefix


def _summary_section(label: str, targets: list[TargetOutputs], status: Any) -> str:
    parts = ['<section id="summary"><h2>Summary</h2>',
             f'<p>Participant <b>sub-{esc(label)}</b>: status '
             f'<span class="status-{esc(status.status)}">{esc(status.status)}</span>'
             + (f" &mdash; {esc(status.reason)}" if status.reason else "") + "</p>"]
    if status.missing_targets:
        parts.append(box("Targets of the latest run without outputs: "
                         + ", ".join(status.missing_targets), "error"))
    if targets:
        rows = []
        for t in targets:
            s = t.summary
            rows.append({
                "session": t.session or "n/a", "prefix": t.prefix,
                "sequence": s.get("Sequence"), "field strength (T)": s.get("FieldStrength"),
                "skull strip": s.get("SkullStripStrategy"), "model": model_name(s.get("Model")),
                "lesions": s.get("LesionCount"), "total volume (µL)": s.get("TotalVolume_uL"),
                # The summary writes 0 without lesions; no lesion has no median (n/a, as the group's).
                "median volume (µL)": s.get("MedianVolume_uL") if s.get("LesionCount") else None,
                "warnings": len(_warnings(t)),
            })
        frame = pd.DataFrame(rows)
        parts.append(table_html(frame, rows_key="summary", digits={
            "total volume (µL)": 1, "median volume (µL)": 1},
            cell_html={"prefix": lambda v, _r: f'<a href="#{esc(v)}">{esc(v)}</a>'}))
    else:
        parts.append(box("No segmentation outputs for this participant.", "error"))
    parts.append("</section>")
    return "\n".join(parts)


def _warnings(target: TargetOutputs) -> list[tuple[str, str]]:
    """(kind, text) of everything a reader must see before trusting the numbers."""
    s = target.summary
    out = []
    warning = model_warning(s.get("Model"))
    if warning:
        out.append(("Model", warning))
    if s.get("OODWarning"):
        out.append(("Out of distribution", str(s["OODWarning"])))
    for w in s.get("Warnings") or []:
        # The summary's Warnings repeat the model's own warning and the OOD warning (the writer lists
        # every warning there); the boxes above already show them.
        if str(w) not in (warning, s.get("OODWarning")):
            out.append(("Warning", str(w)))
    return out


def _try_figure(what: str, draw: Callable[[], str]) -> str:
    try:
        return draw()
    except Exception as exc:  # a figure is never worth losing the report
        LOGGER.warning("report figure '%s' failed: %s", what, exc)
        LOGGER.debug("%s", traceback.format_exc())
        return box(f"The {what} figure could not be drawn: {type(exc).__name__}: {exc}", "error")


def _rel(out_dir: Path, path: Path) -> str:
    return path.relative_to(out_dir).as_posix()


def _background(target: TargetOutputs) -> tuple[Path | None, str]:
    """The raw target when it can still be read (what the user gave), else the skull-stripped T1w."""
    raw = target.inputs.get("target")
    if raw and Path(raw).exists():
        try:
            nib.load(str(raw))
            return Path(raw), f"input image ({Path(raw).name})"
        except Exception:  # unreadable raw image: the derivative is the next best
            pass
    preproc = target.path("preproc")
    if preproc.exists():
        return preproc, f"skull-stripped image ({preproc.name})"
    return None, ""


def _target_section(out_dir: Path, target: TargetOutputs, fig_dir: Path,
                    templates: Mapping[str, Any] | None, lookup: bool,
                    cache: dict[str, Template | None], max_lesions: int) -> str:
    s = target.summary
    parts = [f'<section id="{esc(target.prefix)}"><h2>{esc(target.prefix)}</h2>',
             f'<p class="note">Session: {esc(target.session or "n/a")} &middot; sequence '
             f'{esc(fmt(s.get("Sequence")))} &middot; {esc(fmt(s.get("FieldStrength")))} T '
             f'&middot; {esc(fmt(s.get("LesionCount")))} lesion(s), total '
             f'{esc(fmt(s.get("TotalVolume_uL"), 1))} µL</p>']
    for kind, text in _warnings(target):
        parts.append(box(f"<b>{esc(kind)}:</b> {esc(text)}", "warning", raw=True))

    background, bg_text = _background(target)

    # 1. Brain mask.
    parts.append("<h3>Brain mask</h3>")
    mask_path = target.path("brain_mask")
    mask_json = mask_path.with_name(mask_path.name.replace(".nii.gz", ".json"))
    strategy = s.get("SkullStripStrategy") or (
        (read_json(mask_json) or {}).get("SkullStripStrategy") if mask_json.exists() else None)
    if background is not None and mask_path.exists():
        def _brain() -> str:
            png = figs.plot_brainmask(background, mask_path,
                                      fig_dir / f"{target.prefix}_desc-brainmask_T1w.png")
            return figure_html(_rel(out_dir, png), (
                f"Brain mask (red) on the {esc(bg_text)}; skull-strip strategy "
                f"<b>{esc(fmt(strategy))}</b>. The contour should follow the outer brain surface "
                "without cutting cortex (cortical lesions sit there) or including dura/skull."),
                alt=f"brain mask of {target.prefix}")
        parts.append(_try_figure("brain mask", _brain))
    else:
        parts.append(box("No brain mask or image to show.", "warning"))

    # 2. Registration (only when template-space outputs exist).
    for space in target.spaces:
        parts.append(f"<h3>Registration to {esc(space)}</h3>")
        tpl = resolve_template(space, templates, lookup=lookup, cache=cache)
        if tpl is None:
            parts.append(box(f"Template {space} is not available here, so the registration figure "
                             "is not drawn (the template-space outputs exist).", "warning"))
            continue
        moving = target.path("space_preproc", space=space)
        moving = moving if moving.exists() else None

        def _reg(space: str = space, tpl: Template = tpl, moving: Path | None = moving) -> str:
            png = figs.plot_registration(
                tpl.t1w, fig_dir / f"{target.prefix}_space-{space}_desc-reg_T1w.png",
                moving=moving, template_mask=tpl.mask, lesion_mask=target.space_mask(space))
            if moving is not None:
                cap = (f"Subject image warped to {esc(space)} with the template's brain outline and "
                       "GM/WM edges (cyan) and the lesion mask (red). Edges should follow the "
                       "subject's anatomy.")
            else:
                cap = (f"Lesion mask warped to {esc(space)} (red) on the template. Lesions should "
                       "land in cortex/white matter, not outside the brain (the warped T1w is not "
                       "among the outputs, so template edges cannot be drawn over it).")
            return figure_html(_rel(out_dir, png), cap, alt=f"registration of {target.prefix}")
        parts.append(_try_figure("registration", _reg))

    # 3. Lesions.
    parts.append("<h3>Lesions</h3>")
    lesions = target.lesions()
    lesion_png = fig_dir / f"{target.prefix}_desc-lesions_T1w.png"
    cl_mask = target.path("lesion_mask")
    if lesions.empty:
        lesion_png.unlink(missing_ok=True)  # no stale mosaic from an earlier run
        parts.append('<p class="note">No lesion detected.</p>')
    elif background is None or not cl_mask.exists():
        parts.append(box("Lesion mask or image missing: no lesion figure.", "warning"))
    else:
        def _les() -> str:
            png, shown = figs.plot_lesions(background, cl_mask, lesions, lesion_png,
                                           max_lesions=max_lesions,
                                           connectivity=int(s.get("Connectivity") or 26))
            capped = (f"Showing the {shown} largest of {len(lesions)} lesions (at most "
                      f"{max_lesions} per image; all are in the table below)."
                      if shown < len(lesions) else f"All {shown} lesion(s), largest first.")
            return figure_html(_rel(out_dir, png), (
                f"{capped} Each lesion: axial, coronal and sagittal slices through it on the "
                f"{esc(bg_text)}, outlined in red (other lesions in view in yellow); "
                "caption: lesion id, volume, mean probability (p) and uncertainty (u)."),
                alt=f"lesions of {target.prefix}")
        parts.append(_try_figure("lesion", _les))

    parts.append(f"<h3>Lesion table ({len(lesions)} lesion(s))</h3>")
    parts.append(table_html(lesions, rows_key=f"lesions:{target.prefix}", cls="lesion-table",
                            digits=LESION_DIGITS))
    parts.append(f'<p class="note">From <code>{esc(_rel(out_dir, target.lesions_path))}</code>.'
                 "</p>")

    # 4. What was run.
    parts.append("<h3>What was run</h3>")
    parts.append(_provenance_html(out_dir, target, strategy))
    parts.append("</section>")
    return "\n".join(parts)


CHANGE_DIGITS = {"volume_before_ul": 1, "volume_after_ul": 1, "change_ul": 1, "change_pct": 1,
                 "centroid_x": 1, "centroid_y": 1, "centroid_z": 1, "template_x": 1,
                 "template_y": 1, "template_z": 1, "mean_prob_before": 3, "mean_prob_after": 3,
                 "prior_max_prob": 3}
SHOWN_CHANGES = ("new", "enlarging")


def _changes_section(out_dir: Path, changes: list[ChangeOutputs], targets: list[TargetOutputs],
                     fig_dir: Path, max_lesions: int) -> str:
    """Lesion change between sessions: per pair the counts, then the earlier and later session side
    by side around each new or enlarging lesion, then the change table."""
    by_prefix = {t.prefix: t for t in targets}
    parts = ['<section id="changes"><h2>Change between sessions</h2>',
             '<p class="note">Each pair of sessions of one target line (consecutive, and baseline to '
             "last with three or more) is aligned rigidly and its lesions are matched: new, "
             "enlarging, stable, shrinking and disappeared lesions (docs/longitudinal.md).</p>"]
    for change in changes:
        parts.append(_change_pair_html(out_dir, change, by_prefix, fig_dir, max_lesions))
    parts.append("</section>")
    return "\n".join(parts)


def _change_pair_html(out_dir: Path, change: ChangeOutputs, by_prefix: dict[str, TargetOutputs],
                      fig_dir: Path, max_lesions: int) -> str:
    s = change.summary
    earlier = change.earlier_prefix or f"ses-{change.earlier_session}"
    anchor = f"change-{change.prefix}-from-{change.earlier_session}"
    parts = [f'<h3 id="{esc(anchor)}">{esc(earlier)} &rarr; {esc(change.prefix)}</h3>']
    if change.refused:
        parts.append(box(f"<b>No change classified:</b> {esc(change.refused)}", "warning", raw=True))
    rows: list[tuple[str, Any]] = [(key, s.get(key)) for key in
                                   ("New", "Enlarging", "Stable", "Shrinking", "Disappeared")]
    rows += [("Net volume change (µL)", s.get("NetVolumeChange_uL")),
             ("Alignment quality", s.get("AlignmentQuality")),
             ("Alignment quality without alignment", s.get("AlignmentQualityUnaligned")),
             ("Alignment accepted", s.get("AlignmentAccepted"))]
    parts.append(kv_table(rows))
    if change.refused:
        return "\n".join(parts)
    table = change.table()
    shown = table[table["change"].isin(SHOWN_CHANGES)]
    if "lesion_id_after" in shown:
        shown = shown.drop_duplicates("lesion_id_after")
    png = fig_dir / f"{change.prefix}_desc-changeFrom{change.earlier_session}_T1w.png"
    before, after = by_prefix.get(earlier), by_prefix.get(change.prefix)
    matrix = (s.get("Alignment") or {}).get("BeforeToAfter")
    if shown.empty:
        png.unlink(missing_ok=True)  # no stale figure from an earlier run
        parts.append('<p class="note">No new or enlarging lesion.</p>')
    elif before is None or after is None or matrix is None:
        parts.append(box("The outputs of both sessions and the alignment are needed for the "
                         "side-by-side figure.", "warning"))
    else:
        bg_before, text_before = _background(before)
        bg_after, text_after = _background(after)
        if bg_before is None or bg_after is None:
            parts.append(box("No image of one of the sessions to show.", "warning"))
        else:
            def _draw() -> str:
                path, n = figs.plot_changes(
                    bg_before, bg_after, change.path("change_dseg"), shown,
                    np.asarray(matrix, dtype=float), png,
                    earlier_mask=before.path("lesion_mask"),
                    labels=(f"ses-{change.earlier_session} (aligned)", f"ses-{change.session}"),
                    max_lesions=max_lesions,
                    connectivity=int(after.summary.get("Connectivity") or 26))
                capped = (f"the {n} largest of {len(shown)}" if n < len(shown)
                          else f"all {n}")
                return figure_html(_rel(out_dir, path), (
                    f"New and enlarging lesions ({capped}): left the earlier session "
                    f"({esc(text_before)}) aligned onto the later one, right the later session "
                    f"({esc(text_after)}); axial, coronal and sagittal slices through each lesion. "
                    "Red: the later lesion (drawn on both); yellow: other later lesions; blue: the "
                    "earlier session's lesions."), alt=f"change of {change.prefix}")
            parts.append(_try_figure("change", _draw))
    parts.append(table_html(table, rows_key=f"changes:{change.prefix}:{change.earlier_session}",
                            cls="lesion-table", digits=CHANGE_DIGITS))
    parts.append(f'<p class="note">From <code>{esc(_rel(out_dir, change.path("change_table")))}'
                 "</code>.</p>")
    return "\n".join(parts)


def _provenance_html(out_dir: Path, target: TargetOutputs, strategy: Any) -> str:
    s = target.summary
    inputs = target.inputs
    rows: list[tuple[str, Any]] = [
        ("Target image", inputs.get("target")),
        ("Target suffix", inputs.get("target_suffix")),
        ("Sequence", s.get("Sequence")),
        ("Sequence evidence", inputs.get("evidence")),
        ("Field strength (T)", s.get("FieldStrength")),
        ("INV1", inputs.get("inv1")), ("INV2", inputs.get("inv2")),
        ("T1 map", inputs.get("t1map")),
        ("Skull-strip strategy", strategy),
        ("Threshold", _threshold_text(s)), ("Connectivity", s.get("Connectivity")),
        ("Minimum lesion size", _min_size_text(s)),
        ("Template spaces", s.get("Space") or []),
    ]
    html_parts = ["<h4>Inputs and parameters</h4>", kv_table(rows)]
    model = s.get("Model")
    html_parts.append("<h4>Model</h4>")
    html_parts.append(kv_table(model) if isinstance(model, Mapping) else esc(fmt(model)))
    generated = dict(s.get("GeneratedBy") or {})
    description = read_json(out_dir / "dataset_description.json") \
        if (out_dir / "dataset_description.json").exists() else None
    if isinstance(description, dict):
        for entry in description.get("GeneratedBy") or []:
            if isinstance(entry, dict) and entry.get("Container"):
                generated.setdefault("Container", entry["Container"])
    generated.setdefault("Report", f"bids_cl {__version__}")
    html_parts += ["<h4>Versions</h4>", kv_table(generated)]
    timings = run_timings(out_dir, target.participant, target.prefix)
    if isinstance(timings, Mapping) and timings:
        frame = pd.DataFrame({"stage": list(timings), "seconds": [_num(v) for v in
                                                                   timings.values()]})
        frame = pd.concat([frame, pd.DataFrame({"stage": ["total"],
                                                "seconds": [frame["seconds"].sum()]})])
        html_parts += ["<h4>Timings</h4>",
                       table_html(frame, rows_key=f"timings:{target.prefix}", digits=1,
                                  scroll=False)]
    html_parts.append(f'<p class="note">Summary: <code>{esc(_rel(out_dir, target.summary_path))}'
                      "</code></p>")
    return "\n".join(html_parts)


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _errors_section(out_dir: Path, crashes: list[Crash], status: Any) -> str:
    parts = ['<section id="errors"><h2>Errors</h2>']
    if not crashes:
        parts.append('<p class="note">No crash file.</p>')
    else:
        if status.status == "ok":
            parts.append('<p class="note">Crash files of earlier runs (every target now has '
                         "outputs):</p>")
        for crash in crashes:
            parts.append(
                box(f"<b>{esc(crash.reason)}</b><br><span class=\"note\">run {esc(crash.run)} "
                    f"&middot; <code>{esc(_rel(out_dir, crash.path))}</code></span>"
                    f"<details><summary>full text</summary><pre>{esc(crash.text)}</pre></details>",
                    "error", raw=True))
    parts.append("</section>")
    return "\n".join(parts)


def _about_section(out_dir: Path, label: str) -> str:
    parts = ['<section id="about"><h2>About</h2>',
             "<p>Built by bids_cl from the derivatives in this folder only; figures are in "
             f"<code>sub-{esc(label)}/figures/</code>. Rebuild with <code>--reports-only</code>.</p>"]
    run = latest_run_dir(out_dir, label)
    if run is not None:
        config = run / spec.CONFIG_NAME
        if config.exists():
            text = config.read_text(encoding="utf-8", errors="replace")[:20000]
            parts.append(f"<details><summary>Configuration of the latest run ({esc(run.name)})"
                         f"</summary><pre>{esc(text)}</pre></details>")
    parts.append("</section>")
    return "\n".join(parts)
