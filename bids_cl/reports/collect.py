"""Read what participant runs left in the output folder (the derivatives contract, nothing else).

Both the participant report and the group level go through these functions, so the two always agree on
which targets exist, which failed and where each file lives (docs/dev/architecture.md, "Derivatives
layout").
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

LOGGER = logging.getLogger("bids_cl.reports")

SUMMARY_SUFFIX = "_label-CL_desc-summary_stats.json"
LESIONS_SUFFIX = "_label-CL_desc-lesions_stats.tsv"
LESION_COLUMNS = [
    "lesion_id", "voxels", "volume_ul", "centroid_i", "centroid_j", "centroid_k",
    "centroid_x", "centroid_y", "centroid_z", "bbox_i0", "bbox_j0", "bbox_k0",
    "bbox_i1", "bbox_j1", "bbox_k1", "mean_prob", "max_prob", "uncertainty",
]


def participant_label(label: str) -> str:
    """``'sub-01'`` or ``'01'`` -> ``'01'`` (BIDS-Apps accept both on the command line)."""
    label = str(label).strip()
    return label[4:] if label.startswith("sub-") else label


def natural_key(text: str | None) -> tuple[Any, ...]:
    """Sort ``ses-2`` before ``ses-10`` (labels are often unpadded numbers)."""
    if text is None:
        return ()
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(text)))


@dataclass
class TargetOutputs:
    """The derivatives of one segmentation target (participant x session x target image)."""

    participant: str
    session: str | None
    prefix: str
    anat_dir: Path
    summary: dict[str, Any]

    def path(self, suffix: str) -> Path:
        """``<anat_dir>/<prefix>_<suffix>`` (suffix without the leading underscore)."""
        return self.anat_dir / f"{self.prefix}_{suffix}"

    @property
    def summary_path(self) -> Path:
        return self.anat_dir / f"{self.prefix}{SUMMARY_SUFFIX}"

    @property
    def lesions_path(self) -> Path:
        return self.anat_dir / f"{self.prefix}{LESIONS_SUFFIX}"

    @property
    def inputs(self) -> dict[str, Any]:
        value = self.summary.get("Inputs")
        return value if isinstance(value, dict) else {}

    @property
    def spaces(self) -> list[str]:
        """Template spaces with a lesion mask on disk (the summary's ``Space`` plus what the glob finds)."""
        declared = self.summary.get("Space") or []
        if isinstance(declared, str):
            declared = [declared]
        found = []
        for path in sorted(self.anat_dir.glob(f"{self.prefix}_space-*_label-CL_mask.nii.gz")):
            match = re.match(re.escape(self.prefix) + r"_space-([A-Za-z0-9]+)_label-CL_mask",
                             path.name)
            if match:
                found.append(match.group(1))
        return [s for s in dict.fromkeys([*declared, *found]) if self.space_mask(s).exists()]

    def space_mask(self, space: str) -> Path:
        return self.path(f"space-{space}_label-CL_mask.nii.gz")

    def lesions(self) -> pd.DataFrame:
        """The per-lesion table; an empty frame with the contract columns when absent or empty."""
        return read_tsv(self.lesions_path, LESION_COLUMNS)


def read_tsv(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a BIDS TSV (``n/a`` = missing); missing or empty files give an empty frame."""
    try:
        frame = pd.read_csv(path, sep="\t", na_values=["n/a", ""], keep_default_na=False)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        frame = pd.DataFrame(columns=columns or [])
    return frame


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        LOGGER.warning("cannot read %s: %s", path, exc)
        return None


def collect_targets(out_dir: Path, participant: str) -> list[TargetOutputs]:
    """Every target of one participant that has a summary JSON, sorted by session then prefix."""
    label = participant_label(participant)
    sub_dir = Path(out_dir) / f"sub-{label}"
    targets = []
    for path in list(sub_dir.glob(f"anat/*{SUMMARY_SUFFIX}")) + list(
            sub_dir.glob(f"ses-*/anat/*{SUMMARY_SUFFIX}")):
        summary = read_json(path)
        if not isinstance(summary, dict):
            continue
        prefix = path.name[: -len(SUMMARY_SUFFIX)]
        session = path.parent.parent.name[4:] if path.parent.parent.name.startswith("ses-") \
            else None
        targets.append(TargetOutputs(label, session, prefix, path.parent, summary))
    targets.sort(key=lambda t: (natural_key(t.session), t.prefix))
    return targets


@dataclass
class Crash:
    """One crash file left by a participant run."""

    run: str
    path: Path
    mtime: float
    text: str

    @property
    def reason(self) -> str:
        """First non-empty line: crash files hold a one-line reason first.

        The workflow writes it as ``<prefix>\texit <code>\t<reason>``; that is shown as
        ``<prefix>: <reason> (exit <code>)``; any other first line is shown as it is.
        """
        for line in self.text.splitlines():
            if line.strip():
                parts = line.strip().split("\t")
                if len(parts) == 3 and parts[1].startswith("exit "):
                    return f"{parts[0]}: {parts[2]} ({parts[1]})"
                return " ".join(p for p in parts if p)
        return "(empty crash file)"


def collect_crashes(out_dir: Path, participant: str, *, max_chars: int = 20000) -> list[Crash]:
    """Crash files of every logged run, newest first (large tracebacks are truncated)."""
    sub_dir = Path(out_dir) / f"sub-{participant_label(participant)}"
    crashes = []
    for path in sub_dir.glob("log/*/crash-*.txt"):
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
            mtime = path.stat().st_mtime
        except OSError as exc:
            text, mtime = f"(cannot read: {exc})", 0.0
        if len(text) > max_chars:
            text = text[:max_chars] + f"\n... ({len(text) - max_chars} more characters)"
        crashes.append(Crash(path.parent.name, path, mtime, text))
    crashes.sort(key=lambda c: (-c.mtime, c.path.name))
    return crashes


def latest_run_dir(out_dir: Path, participant: str) -> Path | None:
    """The most recent ``sub-X/log/<run_uuid>/`` (by modification time), if any."""
    runs = [p for p in (Path(out_dir) / f"sub-{participant_label(participant)}" / "log").glob("*")
            if p.is_dir()]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def run_timings(out_dir: Path, participant: str, prefix: str) -> dict[str, Any]:
    """Stage timings of a target from the newest ``sub-X/log/*/timings.json`` that has it.

    The workflow keeps timings in the log rather than in the summary JSON (they differ per run);
    the summary's ``Timings`` key, when present, wins over this.
    """
    logs = [p for p in (Path(out_dir) / f"sub-{participant_label(participant)}" / "log")
            .glob("*/timings.json")]
    for path in sorted(logs, key=lambda p: p.stat().st_mtime, reverse=True):
        data = read_json(path)
        if isinstance(data, dict) and isinstance(data.get(prefix), dict):
            return data[prefix]
    return {}


def expected_prefixes(out_dir: Path, participant: str) -> list[str]:
    """Prefixes the latest run set out to process, from its ``discovery.json`` (empty if unknown)."""
    run = latest_run_dir(out_dir, participant)
    if run is None or not (run / "discovery.json").exists():
        return []
    data = read_json(run / "discovery.json")
    items: list[Any] = []
    if isinstance(data, list):
        items = data
    elif isinstance(data, dict):
        # Tolerate a wrapper object: any list of WorkItem-like dicts.
        for value in data.values():
            if isinstance(value, list) and value and isinstance(value[0], dict):
                items.extend(value)
    prefixes = [str(i["prefix"]) for i in items if isinstance(i, dict) and i.get("prefix")]
    label = participant_label(participant)
    return [p for p in dict.fromkeys(prefixes) if p.startswith(f"sub-{label}_") or
            p == f"sub-{label}"]


@dataclass
class ParticipantStatus:
    """How far a participant got: ``ok``, ``partial``, ``failed`` or ``missing``."""

    participant: str
    status: str
    n_targets: int
    missing_targets: list[str] = field(default_factory=list)
    reason: str = ""
    crash_files: list[str] = field(default_factory=list)


def participant_status(out_dir: Path, participant: str,
                       targets: list[TargetOutputs] | None = None) -> ParticipantStatus:
    """Classify a participant from its outputs alone.

    * ``failed``: no summaries but crash files; ``missing``: neither (never run, or still running);
    * ``partial``: some summaries, but targets named in the latest ``discovery.json`` lack one, or a
      crash file is newer than every summary (so it cannot be a stale crash of an earlier run);
    * ``ok`` otherwise.
    """
    label = participant_label(participant)
    out_dir = Path(out_dir)
    if targets is None:
        targets = collect_targets(out_dir, label)
    crashes = collect_crashes(out_dir, label)
    crash_names = [str(c.path.relative_to(out_dir)) for c in crashes]
    # Every distinct reason (a few at most), newest first: one line per failed target.
    reasons = list(dict.fromkeys(c.reason for c in crashes))
    reason = "; ".join(reasons[:3]) + (f"; ... ({len(reasons) - 3} more)" if len(reasons) > 3
                                       else "")
    if not targets:
        if crashes:
            return ParticipantStatus(label, "failed", 0, [], reason, crash_names)
        why = "no outputs" if (out_dir / f"sub-{label}").exists() else "no output folder"
        return ParticipantStatus(label, "missing", 0, [], why, [])
    found = {t.prefix for t in targets}
    missing = [p for p in expected_prefixes(out_dir, label) if p not in found]
    newest_summary = max(t.summary_path.stat().st_mtime for t in targets)
    fresh_crash = [c for c in crashes if c.mtime > newest_summary]
    if missing or fresh_crash:
        if not reason:
            reason = "no outputs for " + ", ".join(missing)
        return ParticipantStatus(label, "partial", len(targets), missing, reason, crash_names)
    return ParticipantStatus(label, "ok", len(targets), [], "", crash_names)


def output_participants(out_dir: Path) -> list[str]:
    """Participant labels with a ``sub-<label>/`` folder in the output folder."""
    return sorted((p.name[4:] for p in Path(out_dir).glob("sub-*") if p.is_dir()), key=natural_key)


def model_name(model: Any) -> str | None:
    """A short name for the Model provenance dict (its exact keys belong to the engine)."""
    if isinstance(model, str):
        return model
    if not isinstance(model, dict):
        return None
    for key in ("name", "Name", "model_name", "ModelName", "id", "model"):
        if model.get(key):
            return str(model[key])
    return None


def model_warning(model: Any) -> str | None:
    if isinstance(model, dict):
        for key in ("warning", "Warning"):
            if model.get(key):
                return str(model[key])
    return None
