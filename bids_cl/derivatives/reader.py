"""Read what participant runs left in the output folder: exactly what :mod:`.writer` writes, named by
:mod:`.spec`, and nothing else.

Both the participant report and the group level go through these functions, so the two always agree on
which targets exist, which failed and where each file lives (docs/dev/architecture.md, "Derivatives").
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from bids_cl.derivatives import spec

LOGGER = logging.getLogger("bids_cl.derivatives")


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

    def path(self, key: str, *, space: str | None = None) -> Path:
        """The file of derivative ``key`` (a key of ``spec.OUTPUTS``) of this target."""
        return self.anat_dir / spec.output_name(self.prefix, key, space=space)

    @property
    def summary_path(self) -> Path:
        return self.path("summary")

    @property
    def lesions_path(self) -> Path:
        return self.path("lesions")

    @property
    def inputs(self) -> dict[str, Any]:
        """The discovery record of the target (the summary's ``Inputs``)."""
        return self.summary["Inputs"]

    @property
    def spaces(self) -> list[str]:
        """Template spaces of the summary's ``Space`` whose lesion mask is on disk."""
        return [s for s in self.summary["Space"] if self.space_mask(s).exists()]

    def space_mask(self, space: str) -> Path:
        return self.path("space_mask", space=space)

    def lesions(self) -> pd.DataFrame:
        """The per-lesion table; an empty frame with the contract columns when absent or empty."""
        return read_tsv(self.lesions_path, spec.LESION_COLUMNS)


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
    pattern = spec.summary_glob()
    for path in list(sub_dir.glob(f"anat/{pattern}")) + list(sub_dir.glob(f"ses-*/anat/{pattern}")):
        summary = read_json(path)
        prefix = spec.prefix_of_summary(path.name)
        if not isinstance(summary, dict) or prefix is None:
            continue
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
        """``<prefix>: <reason> (exit <code>)`` from the crash note's first line (spec.format_crash_note)."""
        parsed = spec.parse_crash_note(self.text)
        if parsed is None:
            return "(unreadable crash note)"
        prefix, code, reason = parsed
        return f"{prefix}: {reason} (exit {code})"


def collect_crashes(out_dir: Path, participant: str, *, max_chars: int = 20000) -> list[Crash]:
    """Crash files of every logged run, newest first (large tracebacks are truncated)."""
    sub_dir = Path(out_dir) / f"sub-{participant_label(participant)}"
    crashes = []
    for path in sub_dir.glob(f"{spec.LOG_DIR}/*/{spec.CRASH_PREFIX}*.txt"):
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
    runs = [p for p in (Path(out_dir) / f"sub-{participant_label(participant)}" / spec.LOG_DIR).glob("*")
            if p.is_dir()]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def run_timings(out_dir: Path, participant: str, prefix: str) -> dict[str, Any]:
    """Stage timings of a target from the newest ``sub-X/log/*/timings.json`` that has it.

    Timings differ per run, so the runner keeps them in the log, never in the derivatives.
    """
    logs = [p for p in (Path(out_dir) / f"sub-{participant_label(participant)}" / spec.LOG_DIR)
            .glob(f"*/{spec.TIMINGS_NAME}")]
    for path in sorted(logs, key=lambda p: p.stat().st_mtime, reverse=True):
        data = read_json(path)
        if isinstance(data, dict) and isinstance(data.get(prefix), dict):
            return data[prefix]
    return {}


def expected_prefixes(out_dir: Path, participant: str) -> list[str]:
    """Prefixes the latest run set out to process, from its ``discovery.json`` (empty if unknown)."""
    run = latest_run_dir(out_dir, participant)
    if run is None or not (run / spec.DISCOVERY_NAME).exists():
        return []
    items = read_json(run / spec.DISCOVERY_NAME) or []
    prefixes = [str(i["prefix"]) for i in items]
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


def model_name(model: dict[str, Any]) -> str | None:
    """The model's name in a summary's ``Model`` provenance."""
    return str(model["name"]) if model.get("name") else None


def model_warning(model: dict[str, Any]) -> str | None:
    """The model's own warning (e.g. the demo model's) in a summary's ``Model`` provenance."""
    return str(model["warning"]) if model.get("warning") else None


@dataclass
class ChangeOutputs:
    """The lesion change of one pair of sessions (earlier E -> later L) of one target line.

    Found by its summary (written last); ``table``/``dseg`` exist unless the pair was refused.
    """

    participant: str
    session: str | None      # L's session label
    prefix: str              # L's prefix (every change file of the pair starts with it)
    earlier_session: str     # E's session label (in the names: desc-changeFrom<label>)
    anat_dir: Path
    summary: dict[str, Any]

    def path(self, key: str) -> Path:
        """The file of change output ``key`` (``spec.CHANGE_KEYS``) of this pair."""
        return self.anat_dir / spec.change_name(self.prefix, key, earlier=self.earlier_session)

    @property
    def earlier_prefix(self) -> str | None:
        return self.summary.get("Earlier")

    @property
    def refused(self) -> str | None:
        """Why no change was classified (no table, no map), or None."""
        value = self.summary.get("Refused")
        return str(value) if value else None

    def table(self) -> pd.DataFrame:
        """The change table; an empty frame with the contract columns when absent or empty."""
        frame = read_tsv(self.path("change_table"), spec.CHANGE_COLUMNS)
        return frame if len(frame.columns) else pd.DataFrame(columns=spec.CHANGE_COLUMNS)


def collect_changes(out_dir: Path, participant: str) -> list[ChangeOutputs]:
    """Every pair of sessions of one participant with a change summary, sorted by later session,
    prefix, then earlier session."""
    label = participant_label(participant)
    sub_dir = Path(out_dir) / f"sub-{label}"
    pattern = spec.change_glob("change_summary")
    pairs = []
    for path in list(sub_dir.glob(f"anat/{pattern}")) + list(sub_dir.glob(f"ses-*/anat/{pattern}")):
        parsed = spec.parse_change_name(path.name, "change_summary")
        summary = read_json(path)
        if parsed is None or not isinstance(summary, dict):
            continue
        session = path.parent.parent.name[4:] if path.parent.parent.name.startswith("ses-") \
            else None
        pairs.append(ChangeOutputs(label, session, parsed[0], parsed[1], path.parent, summary))
    pairs.sort(key=lambda c: (natural_key(c.session), c.prefix, natural_key(c.earlier_session)))
    return pairs
