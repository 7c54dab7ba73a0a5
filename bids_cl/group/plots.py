"""Group plots (matplotlib Figure objects, Agg): each saved as PNG (for the page) and SVG (for print)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter, ScalarFormatter

from bids_cl.reports.figures import (
    AXES,
    Canvas,
    cut_indices,
    intensity_window,
    load_canonical,
    pixel_size,
    resample_like,
    save_figure,
    take_slice,
)
from bids_cl.reports.templates import Template

MEASURE_LABELS = {"lesion_count": "lesions per image", "total_volume_ul": "total volume (µL)",
                  "median_volume_ul": "median lesion volume (µL)"}
COLORS = ["#1f5fa8", "#d9822b", "#2e7d32", "#c62828", "#6a3d9a", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf"]


def bids_label(text: str) -> str:
    """An alphanumeric BIDS-like label from a column name (``diagnosis`` -> ``Diagnosis``)."""
    label = re.sub(r"[^A-Za-z0-9]", "", str(text).title())
    return label or "X"


def _save_both(fig: Figure, fig_dir: Path, stem: str) -> list[Path]:
    # Lay out once and freeze: constrained layout would otherwise run again for every format.
    engine = fig.get_layout_engine()
    if engine is not None:
        engine.execute(fig)
        fig.set_layout_engine("none")
    return [save_figure(fig, fig_dir / f"{stem}.png", dpi=90),
            save_figure(fig, fig_dir / f"{stem}.svg")]


def _style(ax: Any) -> None:
    ax.spines["top"].set_visible(False)
    ax.spines["right"].set_visible(False)
    ax.tick_params(labelsize=8)


def plot_distributions(images: pd.DataFrame, lesions: pd.DataFrame, fig_dir: Path) -> list[Path]:
    """Histograms: lesions per image, total volume per image, volume of every lesion (log)."""
    fig = Figure(figsize=(10.5, 3.0), layout="constrained")
    axes = fig.subplots(1, 3)
    counts = pd.to_numeric(images["lesion_count"], errors="coerce").dropna().to_numpy(float)
    if counts.size:
        top = int(counts.max())
        axes[0].hist(counts, bins=np.arange(-0.5, top + 1.5, max(1, (top + 1) // 20)),
                     color=COLORS[0], edgecolor="white")
    axes[0].set_xlabel("lesions per image", fontsize=9)
    totals = pd.to_numeric(images["total_volume_ul"], errors="coerce").dropna()
    if totals.size:
        axes[1].hist(totals, bins=min(20, max(5, totals.size)), color=COLORS[1],
                     edgecolor="white")
    axes[1].set_xlabel("total lesion volume per image (µL)", fontsize=9)
    volumes = pd.to_numeric(lesions.get("volume_ul", pd.Series(dtype=float)), errors="coerce")
    volumes = volumes[volumes > 0].to_numpy(float)
    if volumes.size:
        bins = np.logspace(np.log10(volumes.min()) - 0.05, np.log10(volumes.max()) + 0.05, 20)
        axes[2].hist(volumes, bins=bins, color=COLORS[2], edgecolor="white")
        axes[2].set_xscale("log")
        # Plain numbers on the log axis; minor labels would overlap.
        axes[2].xaxis.set_major_formatter(ScalarFormatter())
        axes[2].xaxis.set_minor_formatter(NullFormatter())
    axes[2].set_xlabel("volume of each lesion (µL, log scale)", fontsize=9)
    for ax in axes:
        ax.set_ylabel("count", fontsize=9)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        _style(ax)
    return _save_both(fig, fig_dir, "group_desc-distributions_plot")


def plot_by_group(images: pd.DataFrame, column: str, fig_dir: Path,
                  measures: Sequence[str] = ("lesion_count", "total_volume_ul")) -> list[Path]:
    """Box plot + jittered points of each measure per level of ``column`` (one point per image)."""
    data = images[images[column].notna()]
    levels = sorted(data[column].astype(str).unique(),
                    key=lambda v: tuple(int(t) if t.isdigit() else t
                                        for t in re.split(r"(\d+)", v)))
    fig = Figure(figsize=(max(4.0, 1.1 * len(levels)) * len(measures), 3.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(measures)))
    rng = np.random.default_rng(0)  # fixed jitter: reruns give identical figures
    for ax, measure in zip(axes, measures, strict=True):
        groups = [pd.to_numeric(data.loc[data[column].astype(str) == lvl, measure],
                                errors="coerce").dropna().to_numpy(float) for lvl in levels]
        positions = np.arange(1, len(levels) + 1)
        nonempty = [(p, g) for p, g in zip(positions, groups, strict=True) if g.size]
        if nonempty:
            ax.boxplot([g for _, g in nonempty], positions=[p for p, _ in nonempty], widths=0.5,
                       showfliers=False, medianprops={"color": "black"})
        for i, (pos, values) in enumerate(zip(positions, groups, strict=True)):
            ax.scatter(pos + rng.uniform(-0.12, 0.12, values.size), values, s=14, alpha=0.8,
                       color=COLORS[i % len(COLORS)], zorder=3)
        ax.set_xticks(positions, [f"{lvl}\n(n={g.size})" for lvl, g in
                                  zip(levels, groups, strict=True)], fontsize=8)
        ax.set_xlabel(column, fontsize=9)
        ax.set_ylabel(MEASURE_LABELS.get(measure, measure), fontsize=9)
        _style(ax)
    return _save_both(fig, fig_dir, f"group_desc-by{bids_label(column)}_plot")


def plot_trajectories(images: pd.DataFrame, fig_dir: Path,
                      measures: Sequence[str] = ("lesion_count", "total_volume_ul")
                      ) -> list[Path]:
    """One line per participant (and target line) across its sessions."""
    from bids_cl.group.stats import target_line

    data = images[images["session_id"].notna()].copy()
    data["line"] = data["prefix"].map(target_line)

    def _key(v: str) -> tuple[Any, ...]:
        return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", v))

    sessions = sorted(data["session_id"].astype(str).unique(), key=_key)
    position = {s: i for i, s in enumerate(sessions)}
    fig = Figure(figsize=(5.0 * len(measures), 3.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(measures)))
    lines = sorted(data.groupby(["participant_id", "line"]).groups)
    for ax, measure in zip(axes, measures, strict=True):
        for i, (participant, line) in enumerate(lines):
            part = data[(data["participant_id"] == participant) & (data["line"] == line)]
            part = part.iloc[np.argsort([position[s] for s in part["session_id"].astype(str)])]
            x = [position[s] for s in part["session_id"].astype(str)]
            y = pd.to_numeric(part[measure], errors="coerce").to_numpy(float)
            label = line if line != participant else participant
            ax.plot(x, y, marker="o", ms=4, lw=1.2, color=COLORS[i % len(COLORS)], label=label)
        ax.set_xticks(range(len(sessions)), sessions, fontsize=8)
        ax.set_ylabel(MEASURE_LABELS.get(measure, measure), fontsize=9)
        ax.set_xlabel("session", fontsize=9)
        _style(ax)
    if lines and len(lines) <= 20:  # a legend for hundreds of participants helps nobody
        axes[-1].legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save_both(fig, fig_dir, "group_desc-trajectories_plot")


def plot_frequency(freq_path: Path, template: Template | None, out_png: Path, *,
                   ncuts: int = 6) -> Path:
    """Frequency map (hot colours, zero transparent) over the template, 3 rows x ``ncuts``."""
    freq_img = load_canonical(freq_path)
    freq = np.asarray(freq_img.dataobj, dtype=np.float32)
    zooms = freq_img.header.get_zooms()[:3]
    if template is not None:
        bg = np.asarray(resample_like(load_canonical(template.t1w), freq_img).dataobj,
                        dtype=np.float32)
        brain = np.asarray(resample_like(load_canonical(template.mask), freq_img, order=0)
                           .dataobj) > 0.5 if template.mask else bg > 0
        lo, hi = intensity_window(bg, brain)
    else:
        bg, lo, hi = np.zeros_like(freq), 0.0, 1.0
    region = freq > 0 if (freq > 0).any() else np.ones(freq.shape, bool)
    vmax = max(float(freq.max()), 1e-6)
    rows = [(axis, cut_indices(region, axis, ncuts)) for axis in AXES]
    # Room on the right for the colour bar and its label.
    canvas = Canvas(len(rows), max(len(c) for _, c in rows), extra_width=1.2)
    image = None
    for r, (axis, cuts) in enumerate(rows):
        pix = pixel_size(zooms, axis)
        for c, idx in enumerate(cuts):
            extent = canvas.image(r, c, take_slice(bg, axis, idx), pix, cmap="gray", vmin=lo,
                                  vmax=hi)
            values = take_slice(freq, axis, idx)
            image = canvas.ax.imshow(np.ma.masked_less_equal(values, 0), cmap="hot", vmin=0,
                                     vmax=vmax, origin="lower", extent=extent,
                                     interpolation="nearest", alpha=0.9)
    if image is not None:
        fig = canvas.fig
        width = fig.get_figwidth()
        cax = fig.add_axes(((width - 1.0) / width, 0.1, 0.15 / width, 0.8))
        bar = fig.colorbar(image, cax=cax)
        bar.set_label("fraction of participant-sessions", color="white", fontsize=8)
        bar.ax.tick_params(colors="white", labelsize=7)
    return save_figure(canvas.fig, out_png, dpi=90)
