"""Report figures (matplotlib): brain-mask contours, registration check, lesion mosaic.

Figures are drawn on ``matplotlib.figure.Figure`` objects, never through pyplot: saving renders with
Agg whatever the global backend is, so nothing needs a display, nothing changes the backend of the
calling process, and several reports can be drawn in one process. Images are shown in
RAS+ orientation (``nib.as_closest_canonical``): left of the subject on the left, anterior/superior up.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import nibabel as nib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import ndimage

from bids_cl.utils.components import label_components
from bids_cl.utils.io import atomic_write

AXES = ("axial", "coronal", "sagittal")
_AXIS_INDEX = {"sagittal": 0, "coronal": 1, "axial": 2}
MASK_COLOR = "#ff4040"
OTHER_LESION_COLOR = "#ffd21f"
EDGE_COLOR = "#00e5ff"
DPI = 80  # modest: the HTML must stay small, and these are screening figures


# --------------------------------------------------------------------------------------------- io
def save_figure(fig: Figure, path: Path, *, dpi: int = DPI, palette: bool = False) -> Path:
    """Save atomically (temp file + ``os.replace``); deterministic metadata so reruns diff cleanly.

    ``palette`` stores a PNG with 256 colours: MRI mosaics (grey levels plus a few contour colours)
    look the same and take about a third of the space.
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()

    def _write(tmp: Path) -> None:
        if fmt == "svg":
            # Text as text (small files, browser fonts), stable ids, no timestamp.
            with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "bids_cl"}):
                fig.savefig(tmp, format="svg", metadata={"Date": None})
        elif fmt == "png" and palette:
            from PIL import Image  # matplotlib's own dependency

            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
            buffer.seek(0)
            with Image.open(buffer) as img:
                img.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(
                    tmp, format="png", optimize=True)
        else:
            fig.savefig(tmp, format=fmt, dpi=dpi, metadata={"Software": None})

    return atomic_write(path, _write)


def load_canonical(img: Any) -> nib.Nifti1Image:
    """A 3D image (path or nibabel) in the closest RAS+ orientation; 4D singletons squeezed."""
    if not isinstance(img, nib.spatialimages.SpatialImage):
        img = nib.load(str(img))
    if len(img.shape) > 3:
        img = nib.Nifti1Image(np.asarray(img.dataobj).reshape(img.shape[:3]), img.affine)
    return nib.as_closest_canonical(img)


def resample_like(img: nib.Nifti1Image, ref: nib.Nifti1Image, *,
                  order: int = 1, world: np.ndarray | None = None) -> nib.Nifti1Image:
    """``img`` on ``ref``'s grid (when a background and a mask disagree, or another session).

    ``world`` (4x4) maps a point of ``ref``'s scanner space to the same anatomy in ``img``'s (e.g. the
    inverse of an earlier -> later session alignment); identity when None.
    """
    if world is None and img.shape[:3] == ref.shape[:3] and np.allclose(img.affine, ref.affine,
                                                                        atol=1e-3):
        return img
    vox = np.linalg.inv(img.affine) @ (np.eye(4) if world is None else world) @ ref.affine
    data = ndimage.affine_transform(np.asarray(img.dataobj, dtype=np.float32), vox[:3, :3],
                                    offset=vox[:3, 3], output_shape=ref.shape[:3], order=order,
                                    mode="constant", cval=0.0)
    return nib.Nifti1Image(data, ref.affine)


# ---------------------------------------------------------------------------------------- helpers
def intensity_window(data: np.ndarray, region: np.ndarray | None = None) -> tuple[float, float]:
    """Robust display range from the brain (or non-zero) voxels: outliers do not wash the image out."""
    values = data[region] if region is not None and region.any() else data[data != 0]
    if values.size == 0:
        values = data.ravel()
    lo, hi = np.percentile(values, [0.5, 99.5]) if values.size else (0.0, 1.0)
    return float(lo), float(hi if hi > lo else lo + 1.0)


def cut_indices(region: np.ndarray, axis: str, n: int) -> list[int]:
    """``n`` slice indices spread over the inner 80 % of the region's extent along ``axis``."""
    ax = _AXIS_INDEX[axis]
    size = region.shape[ax]
    other = tuple(i for i in range(3) if i != ax)
    present = np.flatnonzero(region.any(axis=other)) if region.any() else np.arange(size)
    lo, hi = int(present[0]), int(present[-1])
    span = hi - lo
    return sorted({int(round(v)) for v in np.linspace(lo + 0.1 * span, hi - 0.1 * span, n)})


def take_slice(data: np.ndarray, axis: str, index: int) -> np.ndarray:
    """2D slice, transposed so ``imshow(origin='lower')`` shows it in neurological (RAS) view."""
    ax = _AXIS_INDEX[axis]
    index = int(np.clip(index, 0, data.shape[ax] - 1))
    return np.take(data, index, axis=ax).T


def pixel_size(zooms: Sequence[float], axis: str) -> tuple[float, float]:
    """(width, height) in mm of one pixel of a slice, so anisotropic voxels are not distorted."""
    horizontal, vertical = {"axial": (0, 1), "coronal": (0, 2), "sagittal": (1, 2)}[axis]
    return float(zooms[horizontal]), float(zooms[vertical])


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold (numpy only): splits GM from WM intensities to draw template edges."""
    hist, edges = np.histogram(values, bins=128)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(np.argmax(between))])


class Canvas:
    """A grid of image panels drawn in *one* matplotlib axes.

    A mosaic of many small axes is slow (matplotlib spends ~40 ms building each axes); placing every
    slice with ``imshow(extent=...)`` in a single axes is an order of magnitude faster and keeps the
    contours vector-sharp. Cell ``(r, c)`` spans ``[c, c+1] x [nrows-r-1, nrows-r]`` in data units; a
    slice is scaled to fit its cell in physical (mm) proportions. ``caption`` reserves the top part
    of each cell for a text line.
    """

    def __init__(self, nrows: int, ncols: float, *, panel: float = 1.45, caption: float = 0.0,
                 extra_width: float = 0.0) -> None:
        self.nrows, self.ncols, self.caption = nrows, ncols, caption
        width = panel * ncols + extra_width
        self.fig = Figure(figsize=(width, panel * nrows), facecolor="black")
        self.ax = self.fig.add_axes((0, 0, panel * ncols / width, 1))
        self.ax.set_xlim(0, ncols)
        self.ax.set_ylim(0, nrows)
        self.ax.set_aspect("equal")
        self.ax.set_axis_off()

    def _box(self, r: int, c: float, shape: tuple[int, int], pix: tuple[float, float],
             pad: float) -> tuple[float, float, float, float]:
        h_mm, w_mm = shape[0] * pix[1], shape[1] * pix[0]
        avail = 1.0 - self.caption
        scale = min((1 - 2 * pad) / w_mm, (avail - 2 * pad) / h_mm)
        w, h = w_mm * scale, h_mm * scale
        x0 = c + (1 - w) / 2
        y0 = self.nrows - r - 1 + (avail - h) / 2
        return x0, x0 + w, y0, y0 + h

    def image(self, r: int, c: float, data2d: np.ndarray, pix: tuple[float, float], *,
              pad: float = 0.02, **kwargs: Any) -> tuple[float, float, float, float]:
        extent = self._box(r, c, data2d.shape, pix, pad)
        kwargs.setdefault("interpolation", "bilinear")
        self.ax.imshow(data2d, origin="lower", extent=extent, **kwargs)
        return extent

    def contour(self, extent: tuple[float, float, float, float], region2d: np.ndarray,
                color: str, width: float = 1.0) -> None:
        # An empty or full slice has no iso-line (matplotlib would warn): skip it.
        if not region2d.any() or region2d.all():
            return
        ny, nx = region2d.shape
        xs = extent[0] + (np.arange(nx) + 0.5) * (extent[1] - extent[0]) / nx
        ys = extent[2] + (np.arange(ny) + 0.5) * (extent[3] - extent[2]) / ny
        self.ax.contour(xs, ys, region2d.astype(np.float32), levels=[0.5], colors=color,
                        linewidths=width)

    def text(self, r: int, c: float, text: str, **kwargs: Any) -> None:
        kwargs = {"color": "white", "fontsize": 7, "ha": "center", "va": "center", **kwargs}
        self.ax.text(c, self.nrows - r - self.caption / 2, text, **kwargs)


# ---------------------------------------------------------------------------------------- figures
def plot_brainmask(background: Any, mask: Any, out_png: Path, *, ncuts: int = 7) -> Path:
    """Brain-mask contour over the input image: 3 rows (axial, coronal, sagittal) x ``ncuts``."""
    mask_img = load_canonical(mask)
    bg_img = resample_like(load_canonical(background), mask_img)
    data = np.asarray(bg_img.dataobj, dtype=np.float32)
    region = np.asarray(mask_img.dataobj) > 0
    zooms = mask_img.header.get_zooms()[:3]
    lo, hi = intensity_window(data, region)
    rows = [(axis, cut_indices(region, axis, ncuts)) for axis in AXES]
    canvas = Canvas(len(rows), max(len(c) for _, c in rows))
    for r, (axis, cuts) in enumerate(rows):
        pix = pixel_size(zooms, axis)
        for c, idx in enumerate(cuts):
            extent = canvas.image(r, c, take_slice(data, axis, idx), pix, cmap="gray",
                                  vmin=lo, vmax=hi)
            canvas.contour(extent, take_slice(region, axis, idx), MASK_COLOR, 1.0)
    return save_figure(canvas.fig, out_png, palette=True)


def template_edges(template: nib.Nifti1Image, template_mask: nib.Nifti1Image | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(brain outline region, WM region) of a template, both booleans, for contour drawing."""
    data = ndimage.gaussian_filter(np.asarray(template.dataobj, dtype=np.float32), 0.7)
    if template_mask is not None:
        brain = np.asarray(resample_like(template_mask, template, order=0).dataobj) > 0.5
    else:
        # No mask: the brain is what is brighter than half Otsu over non-zero voxels, largest blob.
        nz = data[data > 0]
        brain = data > (otsu_threshold(nz) * 0.5 if nz.size else 0)
        labels, n = ndimage.label(brain)
        if n > 1:
            brain = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    inside = data[brain]
    wm = brain & (data > otsu_threshold(inside)) if inside.size else np.zeros_like(brain)
    return brain, wm


def plot_registration(template: Any, out_png: Path, *, moving: Any | None = None,
                      template_mask: Any | None = None, lesion_mask: Any | None = None,
                      ncuts: int = 6) -> Path:
    """Registration check in template space.

    With ``moving`` (the subject's T1w resampled into the template) the template's brain outline and
    GM/WM edges are drawn over it: misregistration shows as edges that do not follow the anatomy.
    Without it, the template is shown with the subject's template-space lesion mask, which still shows
    whether lesions land in plausible (cortical) places.
    """
    tpl = load_canonical(template)
    tmask = load_canonical(template_mask) if template_mask is not None else None
    brain, wm = template_edges(tpl, tmask)
    zooms = tpl.header.get_zooms()[:3]
    if moving is not None:
        bg = np.asarray(resample_like(load_canonical(moving), tpl).dataobj, dtype=np.float32)
    else:
        bg = np.asarray(tpl.dataobj, dtype=np.float32)
    lesions = None
    if lesion_mask is not None:
        lesions = np.asarray(resample_like(load_canonical(lesion_mask), tpl, order=0).dataobj) > 0
    lo, hi = intensity_window(bg, brain)
    rows = [(axis, cut_indices(brain, axis, ncuts)) for axis in AXES]
    canvas = Canvas(len(rows), max(len(c) for _, c in rows))
    for r, (axis, cuts) in enumerate(rows):
        pix = pixel_size(zooms, axis)
        for c, idx in enumerate(cuts):
            extent = canvas.image(r, c, take_slice(bg, axis, idx), pix, cmap="gray", vmin=lo,
                                  vmax=hi)
            if moving is not None:
                canvas.contour(extent, take_slice(brain, axis, idx), EDGE_COLOR, 0.8)
                canvas.contour(extent, take_slice(wm, axis, idx), EDGE_COLOR, 0.5)
            if lesions is not None:
                canvas.contour(extent, take_slice(lesions, axis, idx), MASK_COLOR, 0.9)
    return save_figure(canvas.fig, out_png, palette=True)


def _lesion_voxel(row: pd.Series, orig_affine: np.ndarray, canon_affine: np.ndarray
                  ) -> np.ndarray | None:
    """Canonical-grid voxel of a lesion centroid (world coordinates first, voxel indices second)."""
    xyz = [row.get(c) for c in ("centroid_x", "centroid_y", "centroid_z")]
    if not all(v is not None and np.isfinite(v) for v in xyz):
        ijk = [row.get(c) for c in ("centroid_i", "centroid_j", "centroid_k")]
        if not all(v is not None and np.isfinite(v) for v in ijk):
            return None
        xyz = (orig_affine @ np.array([*ijk, 1.0]))[:3]
    return (np.linalg.inv(canon_affine) @ np.array([*xyz, 1.0]))[:3]


def select_lesions(lesions: pd.DataFrame, max_lesions: int) -> pd.DataFrame:
    """Largest lesions first (ties by id), at most ``max_lesions``."""
    if lesions.empty:
        return lesions
    order = lesions.sort_values(["volume_ul", "lesion_id"], ascending=[False, True],
                                kind="mergesort")
    return order.head(max_lesions)


@dataclass
class LesionCrop:
    """Crops (canonical orientation) around one lesion of the table."""

    row: pd.Series
    label: int                 # component in bids_cl's own labelling (0: not found in the mask)
    background: np.ndarray
    lesion: np.ndarray         # this lesion
    others: np.ndarray         # other lesions in the crop
    zooms: np.ndarray


def _crop_geometry(img: Any, half_width_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """``img``'s voxel sizes, and half the side of a lesion close-up in its voxels (at least 4)."""
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    return zooms, np.maximum(np.ceil(half_width_mm / zooms), 4).astype(int)


def _voxel_in(point: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The nearest voxel index to ``point`` inside a grid of ``shape``."""
    return np.clip(np.round(point).astype(int), 0, np.array(shape) - 1)


def lesion_crops(background: Any, mask: Any, lesions: pd.DataFrame, *, connectivity: int = 26,
                 half_width_mm: float = 15.0) -> list[LesionCrop]:
    """Find each table row's lesion in the mask and crop ``+-half_width_mm`` around it.

    The table's ``lesion_id`` belongs to the engine's labelling, whose order may differ from
    scipy's, so lesions are matched by position: the component under the centroid (world
    coordinates, else voxel indices), or the most common one next to it for non-convex lesions.
    """
    raw_mask = mask if isinstance(mask, nib.spatialimages.SpatialImage) else nib.load(str(mask))
    mask_img = load_canonical(raw_mask)
    bg = np.asarray(resample_like(load_canonical(background), mask_img).dataobj,
                    dtype=np.float32)
    binary = np.asarray(mask_img.dataobj) > 0
    labels, _ = label_components(binary, connectivity)  # the engine's labelling
    boxes = ndimage.find_objects(labels)  # per-label bounding slices, computed once
    zooms, half = _crop_geometry(mask_img, half_width_mm)

    crops = []
    for _, row in lesions.iterrows():
        centre = _lesion_voxel(row, raw_mask.affine, mask_img.affine)
        label = 0
        if centre is not None:
            centre = _voxel_in(centre, binary.shape)
            label = int(labels[tuple(centre)])
            if label == 0:
                # Non-convex lesion: the centroid falls outside it; take the nearest labelled voxel.
                box = tuple(slice(max(0, x - 3), x + 4) for x in centre)
                values = labels[box][labels[box] > 0]
                label = int(np.bincount(values).argmax()) if values.size else 0
            if label:
                # Centre the crop on the lesion's own extent (robust to odd centroids).
                centre = np.array([(sl.start + sl.stop - 1) // 2 for sl in boxes[label - 1]])
        else:
            centre = np.array(binary.shape) // 2
        bg_c = _crop(bg, centre, half)
        this_c = _crop(labels, centre, half) == label if label else np.zeros(bg_c.shape, bool)
        others_c = _crop(binary, centre, half) & ~this_c
        crops.append(LesionCrop(row, label, bg_c, this_c, others_c, zooms))
    return crops


def plot_lesions(background: Any, mask: Any, lesions: pd.DataFrame, out_png: Path, *,
                 max_lesions: int = 30, connectivity: int = 26, per_row: int = 2,
                 half_width_mm: float = 15.0) -> tuple[Path | None, int]:
    """Mosaic of slices through each lesion, largest first: axial, coronal, sagittal crops centred on
    the lesion, this lesion outlined in red, neighbouring lesions in yellow.

    Returns ``(path, number shown)``; ``(None, 0)`` when there is no lesion to show.
    """
    shown = select_lesions(lesions, max_lesions)
    if shown.empty:
        return None, 0
    crops = lesion_crops(background, mask, shown, connectivity=connectivity,
                         half_width_mm=half_width_mm)
    # One display window for all crops, from the crops themselves (cheap on 0.5 mm volumes).
    lo, hi = intensity_window(np.concatenate([c.background.ravel() for c in crops]))
    nrows = math.ceil(len(crops) / per_row)
    # 3 views per lesion and a small gap between lesions so the triplets read as units.
    step = 3.25
    canvas = Canvas(nrows, step * per_row - 0.25, panel=1.5, caption=0.18)
    for pos, crop in enumerate(crops):
        r, group = divmod(pos, per_row)
        for v, axis in enumerate(AXES):
            k = (crop.background.shape[_AXIS_INDEX[axis]] - 1) // 2
            extent = canvas.image(r, group * step + v, take_slice(crop.background, axis, k),
                                  pixel_size(crop.zooms, axis), cmap="gray", vmin=lo, vmax=hi)
            canvas.contour(extent, take_slice(crop.others, axis, k), OTHER_LESION_COLOR, 0.6)
            canvas.contour(extent, take_slice(crop.lesion, axis, k), MASK_COLOR, 1.1)
        row = crop.row
        canvas.text(r, group * step + 1.5, (
            f"#{int(row['lesion_id'])}   {_fmt(row.get('volume_ul'), 1)} µL   "
            f"p {_fmt(row.get('mean_prob'), 2)}   u {_fmt(row.get('uncertainty'), 2)}"))
    return save_figure(canvas.fig, out_png, palette=True), len(crops)


def _crop(data: np.ndarray, centre: np.ndarray, half: np.ndarray) -> np.ndarray:
    """The box ``centre +- half`` of ``data``, zero-padded where it leaves the image, so every crop
    has the same size and is centred on its lesion (no full-volume copy)."""
    out = np.zeros(tuple(int(2 * h + 1) for h in half), dtype=data.dtype)
    src, dst = [], []
    for x, h, n in zip(centre, half, data.shape, strict=True):
        lo, hi = int(x - h), int(x + h + 1)
        src.append(slice(max(lo, 0), min(hi, n)))
        dst.append(slice(max(lo, 0) - lo, min(hi, n) - lo))
    out[tuple(dst)] = data[tuple(src)]
    return out


def _fmt(value: Any, digits: int) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if not np.isfinite(value) else f"{value:.{digits}f}"


# ------------------------------------------------------------------------------- change between sessions
EARLIER_LESION_COLOR = "#3ec1ff"


@dataclass
class ChangeCrop:
    """Crops (canonical orientation of the later session) around one new or enlarging lesion."""

    row: pd.Series
    later: np.ndarray          # later background
    earlier: np.ndarray        # earlier background, aligned onto the later grid
    lesion: np.ndarray         # this later lesion
    others: np.ndarray         # other later lesions
    earlier_lesions: np.ndarray  # the earlier session's lesions, aligned
    zooms: np.ndarray


def change_crops(earlier_background: Any, later_background: Any, change_dseg: Any,
                 lesions: pd.DataFrame, before_to_after: np.ndarray, *,
                 earlier_mask: Any | None = None, connectivity: int = 26,
                 half_width_mm: float = 15.0) -> list[ChangeCrop]:
    """Crops of both sessions around each row's later lesion (found as in :func:`lesion_crops`).

    Everything is drawn on the later session's grid (the change map's, RAS-reoriented); the earlier
    images are resampled through the inverse of ``before_to_after`` (earlier -> later scanner mm).
    """
    raw = change_dseg if isinstance(change_dseg, nib.spatialimages.SpatialImage) \
        else nib.load(str(change_dseg))
    grid = load_canonical(raw)
    codes = np.rint(np.asarray(grid.dataobj)).astype(np.int16)
    later_mask = (codes >= 1) & (codes <= 4)  # lesions of the later session (5: disappeared)
    after_to_before = np.linalg.inv(np.asarray(before_to_after, dtype=float))
    later_bg = np.asarray(resample_like(load_canonical(later_background), grid).dataobj, np.float32)
    earlier_bg = np.asarray(resample_like(load_canonical(earlier_background), grid,
                                          world=after_to_before).dataobj, np.float32)
    if earlier_mask is not None:
        earlier_les = np.asarray(resample_like(load_canonical(earlier_mask), grid, order=0,
                                               world=after_to_before).dataobj) > 0
    else:
        earlier_les = np.zeros(codes.shape, bool)
    labels, _ = label_components(later_mask, connectivity)
    zooms, half = _crop_geometry(grid, half_width_mm)
    crops = []
    for _, row in lesions.iterrows():
        centre = _lesion_voxel(row, raw.affine, grid.affine)
        label = 0
        if centre is not None:
            centre = _voxel_in(centre, codes.shape)
            box = tuple(slice(max(0, x - 2), x + 3) for x in centre)
            values = labels[box][labels[box] > 0]
            label = int(labels[tuple(centre)]) or (int(np.bincount(values).argmax())
                                                   if values.size else 0)
        else:
            centre = np.array(codes.shape) // 2
        this = _crop(labels, centre, half) == label if label else np.zeros(
            tuple(int(2 * h + 1) for h in half), bool)
        crops.append(ChangeCrop(row, _crop(later_bg, centre, half), _crop(earlier_bg, centre, half),
                                this, _crop(later_mask, centre, half) & ~this,
                                _crop(earlier_les, centre, half), zooms))
    return crops


def plot_changes(earlier_background: Any, later_background: Any, change_dseg: Any,
                 lesions: pd.DataFrame, before_to_after: np.ndarray, out_png: Path, *,
                 earlier_mask: Any | None = None, labels: tuple[str, str] = ("earlier", "later"),
                 max_lesions: int = 30, connectivity: int = 26,
                 half_width_mm: float = 15.0) -> tuple[Path | None, int]:
    """Each new or enlarging lesion (rows of the change table, largest first): the earlier session
    (aligned) and the later one side by side, axial/coronal/sagittal through the lesion; the later
    lesion outlined in red on both, other later lesions in yellow, the earlier session's lesions in
    blue. Returns ``(path, number shown)``; ``(None, 0)`` without a lesion to show."""
    if lesions.empty:
        return None, 0
    order = lesions.assign(_v=pd.to_numeric(lesions.get("volume_after_ul"), errors="coerce"))
    shown = order.sort_values("_v", ascending=False, kind="mergesort").head(max_lesions)
    crops = change_crops(earlier_background, later_background, change_dseg, shown,
                         before_to_after, earlier_mask=earlier_mask, connectivity=connectivity,
                         half_width_mm=half_width_mm)
    windows = [intensity_window(np.concatenate([getattr(c, k).ravel() for c in crops]))
               for k in ("earlier", "later")]
    step = 3.25
    canvas = Canvas(len(crops), 2 * step - 0.25, panel=1.4, caption=0.2)
    for r, crop in enumerate(crops):
        for side, (kind, (lo, hi)) in enumerate(zip(("earlier", "later"), windows, strict=True)):
            background = getattr(crop, kind)
            for v, axis in enumerate(AXES):
                k = (background.shape[_AXIS_INDEX[axis]] - 1) // 2
                extent = canvas.image(r, side * step + v, take_slice(background, axis, k),
                                      pixel_size(crop.zooms, axis), cmap="gray", vmin=lo, vmax=hi)
                if kind == "earlier":
                    canvas.contour(extent, take_slice(crop.earlier_lesions, axis, k),
                                   EARLIER_LESION_COLOR, 0.8)
                else:
                    canvas.contour(extent, take_slice(crop.others, axis, k), OTHER_LESION_COLOR,
                                   0.6)
                canvas.contour(extent, take_slice(crop.lesion, axis, k), MASK_COLOR, 1.0)
            row = crop.row
            text = labels[side] if kind == "earlier" else (
                f"{labels[side]}: #{_fmt(row.get('lesion_id_after'), 0)} {row.get('change')}   "
                f"{_fmt(row.get('volume_before_ul'), 1)} -> {_fmt(row.get('volume_after_ul'), 1)} µL")
            canvas.text(r, side * step + 1.5, text)
    return save_figure(canvas.fig, out_png, palette=True), len(crops)
