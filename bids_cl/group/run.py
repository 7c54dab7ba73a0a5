"""The group level: ``run_group_level(bids_dir, out_dir)`` aggregates what participant runs left.

Reads only ``out_dir`` (summaries, lesion tables, template-space masks, logs) and
``bids_dir/participants.tsv`` (+ JSON); no image is reprocessed, no GPU is needed. Participants that
failed or were never processed are listed (``group_status.tsv`` and the page), never fatal. Every file
is written to a temporary name and renamed (``os.replace``), so a rerun or an interrupted run never
leaves half-written outputs; rerunning overwrites the previous group outputs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from bids_cl.group import frequency as freqmod
from bids_cl.group import plots
from bids_cl.group.changes import CHANGE_COLUMNS, CHANGE_MEASURES, change_table, with_change_columns
from bids_cl.group.page import render_group_html
from bids_cl.group.stats import (
    classify_columns,
    correlation_stats,
    descriptive_stats,
    longitudinal_changes,
)
from bids_cl.group.tables import (
    IMAGE_COLUMNS,
    LESION_DICTIONARY,
    collect,
    data_dictionary,
    join_participants,
    participant_universe,
    read_participants,
)
from bids_cl.reports.templates import Template, resolve_template
from bids_cl.utils.io import atomic_write, atomic_write_json, atomic_write_text

LOGGER = logging.getLogger("bids_cl.group")

FILES = {
    "images": "group_lesions.tsv",
    "images_json": "group_lesions.json",
    "lesions": "group_lesions_per-lesion.tsv",
    "lesions_json": "group_lesions_per-lesion.json",
    "status": "group_status.tsv",
    "descriptive": "group_desc-descriptive_stats.tsv",
    "correlations": "group_desc-correlations_stats.tsv",
    "longitudinal": "group_desc-longitudinal_stats.tsv",
    "change": "group_desc-change_stats.tsv",
    "change_json": "group_desc-change_stats.json",
    "html": "group.html",
}
FIGURE_DIR = "figures"


@dataclass
class GroupResult:
    """What the group level wrote and the tables behind it."""

    out_dir: Path
    html: Path
    images: pd.DataFrame          # group_lesions.tsv (participants.tsv columns joined)
    lesions: pd.DataFrame         # group_lesions_per-lesion.tsv
    status: pd.DataFrame          # group_status.tsv: one row per participant considered
    descriptive: pd.DataFrame
    correlations: pd.DataFrame
    longitudinal: pd.DataFrame
    files: dict[str, Path] = field(default_factory=dict)
    figures: list[Path] = field(default_factory=list)
    frequency_maps: dict[str, Path] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # group_desc-change_stats.tsv: lesion change per participant and pair of sessions
    changes: pd.DataFrame = field(default_factory=pd.DataFrame)

    def participants_with(self, status: str) -> list[str]:
        return self.status.loc[self.status["status"] == status, "participant_id"].tolist()

    @property
    def failed(self) -> list[str]:
        return self.participants_with("failed")

    @property
    def missing(self) -> list[str]:
        return self.participants_with("missing")

    @property
    def n_images(self) -> int:
        return len(self.images)

    @property
    def summary(self) -> str:
        """One line for the command line."""
        counts = self.status["status"].value_counts()
        states = ", ".join(f"{int(counts.get(s, 0))} {s}" for s in
                           ("ok", "partial", "failed", "missing"))
        return (f"{self.n_images} image(s) of {len(self.status)} participant(s) ({states}); "
                f"{len(self.lesions)} lesion(s); report {self.html}")


def write_tsv(frame: pd.DataFrame, path: Path) -> Path:
    return atomic_write(Path(path), lambda tmp: frame.to_csv(
        tmp, sep="\t", index=False, na_rep="n/a", float_format="%.8g", lineterminator="\n"))


def run_group_level(bids_dir: str | Path | None, out_dir: str | Path, *,
                    participant_labels: Iterable[str] | None = None,
                    templates: Mapping[str, Any] | None = None,
                    template_lookup: bool = True) -> GroupResult:
    """Aggregate the participant outputs in ``out_dir`` into tables, statistics, plots, frequency
    maps and ``group.html``. ``templates``/``template_lookup`` only choose the frequency map's
    background (see ``bids_cl.reports.generate_participant_report``)."""
    out_dir = Path(out_dir)
    bids_path = Path(bids_dir) if bids_dir is not None else None
    participants, sidecar = read_participants(bids_path)
    labels = participant_universe(bids_path, out_dir, participants, participant_labels)
    images, lesions, status, targets = collect(out_dir, labels)
    table, renames = join_participants(images, participants)
    warnings: list[str] = []

    # Participant columns: categorical -> descriptive stats and plots; numeric -> correlations.
    categorical: list[str] = []
    numeric: list[str] = []
    if participants is not None:
        considered = participants[participants["participant_id"].isin(
            [f"sub-{label}" for label in labels])]
        cat, num = classify_columns(considered, sidecar)
        categorical = [renames.get(c, c) for c in cat]
        numeric = [renames.get(c, c) for c in num]
    image_groupings = [c for c in ("session_id", "sequence", "field_strength")
                       if table[c].dropna().nunique() > 0]
    descriptive = descriptive_stats(table, [*image_groupings, *categorical])
    correlations = correlation_stats(table, numeric)
    changes = change_table(out_dir, labels, bids_path)
    longitudinal = with_change_columns(longitudinal_changes(table), changes)
    if not changes.empty:  # one observation per pair of sessions
        descriptive = pd.concat([descriptive, descriptive_stats(
            changes, ["session_to"], measures=CHANGE_MEASURES)], ignore_index=True)

    files = {key: out_dir / name for key, name in FILES.items()}
    write_tsv(table, files["images"])
    atomic_write_json(files["images_json"], data_dictionary(table.columns, IMAGE_COLUMNS,
                                                            sidecar, renames))
    write_tsv(lesions, files["lesions"])
    atomic_write_json(files["lesions_json"], data_dictionary(lesions.columns, LESION_DICTIONARY))
    write_tsv(status, files["status"])
    write_tsv(descriptive, files["descriptive"])
    write_tsv(correlations, files["correlations"])
    write_tsv(longitudinal, files["longitudinal"])
    write_tsv(changes, files["change"])
    atomic_write_json(files["change_json"], data_dictionary(changes.columns, CHANGE_COLUMNS))

    # Plots: each in its own try, a plot is never worth the group outputs.
    fig_dir = out_dir / FIGURE_DIR
    figures: dict[str, list[Path]] = {}

    def _plot(key: str, draw: Any, *args: Any) -> None:
        try:
            figures[key] = draw(*args)
        except Exception as exc:
            LOGGER.warning("group plot %s failed: %s", key, exc)
            warnings.append(f"plot '{key}' could not be drawn: {type(exc).__name__}: {exc}")

    if not table.empty:
        _plot("distributions", plots.plot_distributions, table, lesions, fig_dir)
        # A by-group plot needs two groups to compare (the statistics table lists single ones).
        for col in ["sequence", "field_strength", *categorical]:
            if table[col].dropna().astype(str).nunique() > 1:
                _plot(f"by:{col}", plots.plot_by_group, table, col, fig_dir)
        if not longitudinal.empty:
            _plot("trajectories", plots.plot_trajectories, table, fig_dir)

    # Frequency maps (+ figure over the template when one is available).
    frequency_maps: dict[str, Path] = {}
    frequency_info = []
    try:
        maps = freqmod.compute_frequency_maps(targets, out_dir)
    except Exception as exc:
        LOGGER.warning("frequency maps failed: %s", exc)
        warnings.append(f"frequency maps could not be computed: {type(exc).__name__}: {exc}")
        maps = []
    cache: dict[str, Template | None] = {}
    for fmap in maps:
        frequency_maps[fmap.space] = fmap.path
        tpl = resolve_template(fmap.space, templates, lookup=template_lookup, cache=cache)
        png = fig_dir / f"group_space-{fmap.space}_desc-frequency_plot.png"
        _plot(f"frequency:{fmap.space}", plots.plot_frequency, fmap.path, tpl, png)
        frequency_info.append((fmap, tpl))

    all_figures = [p for paths in figures.values() for p in
                   (paths if isinstance(paths, list) else [paths])]
    # Drop group figures of an earlier run that this run did not redraw (e.g. a grouping that
    # lost its second level), so figures/ always matches group.html.
    for stale in set(fig_dir.glob("group_*")) - set(all_figures):
        stale.unlink(missing_ok=True)
    html = render_group_html(
        out_dir=out_dir, table=table, lesions=lesions, status=status, descriptive=descriptive,
        correlations=correlations, longitudinal=longitudinal, figures=figures,
        frequency=frequency_info, files=files, categorical=categorical, numeric=numeric,
        warnings=warnings, changes=changes)
    atomic_write_text(files["html"], html)
    LOGGER.info("group level: %d image(s) of %d participant(s); %d failed, %d missing",
                len(table), len(labels), (status["status"] == "failed").sum(),
                (status["status"] == "missing").sum())
    return GroupResult(out_dir, files["html"], table, lesions, status, descriptive, correlations,
                       longitudinal, files, all_figures, frequency_maps, warnings, changes=changes)
