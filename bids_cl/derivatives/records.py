"""Results that travel as records: typed, JSON round-trippable, one shape from producer to consumer.

* :class:`SkullStripRecord`: what skull stripping did (the interface writes it, the writer reads it);
* :class:`SegmentationRecord`: every setting the engine resolved for one image (threshold and where it
  came from, minimum size, folds, device, ...), from ``CLSegmenter`` to the writer, unchanged;
* :class:`TargetRecord`: the outcome of one target (status, exit code, reason, stage timings, outputs),
  written by the target's last node (or by the node that failed) and read by the runner, instead of
  exit codes parsed out of crash-file text.

Pure data: no bids_cl imports, so the engine, the interfaces and the runner can all use it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

_R = TypeVar("_R", bound="_Record")


class _Record:
    """``to_dict``/``from_dict``/``read``/``to_json`` for the dataclasses below."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls: type[_R], values: dict[str, Any]) -> _R:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(values) - names
        if unknown:  # a record from another version of bids_cl, or not a record at all
            raise ValueError(f"{cls.__name__} has no field(s) {', '.join(sorted(unknown))}")
        return cls(**values)

    @classmethod
    def read(cls: type[_R], path: str | Path) -> _R:
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class SkullStripRecord(_Record):
    strategy: str
    detail: str
    warnings: list[str] = field(default_factory=list)
    used_inv2: bool = False
    seconds: float = 0.0


@dataclass(frozen=True)
class SegmentationRecord(_Record):
    """The engine's settings for one image, named as the summary JSON names them (``summary_fields``)."""

    threshold: float
    threshold_source: str            # user | model | default
    connectivity: int
    min_lesion_size: int | float | str | None
    min_lesion_size_source: str      # user | model | default
    min_lesion_size_voxels: int | None
    folds: list[int | str]
    tta: bool
    device: str
    fast_path: bool
    threads: int
    precision: str
    orientation: dict[str, str]
    tiles_run: int | None
    tiles_total: int | None
    ood_warning: str | None
    warnings: list[str]              # the model's warning, then the predictor's
    provenance: dict[str, Any]
    timings: dict[str, float]        # seconds per engine step; kept out of the derivatives

    def summary_fields(self) -> dict[str, Any]:
        """The summary JSON's keys for these settings (everything but the timings)."""
        return {
            "Model": self.provenance,
            "OODWarning": self.ood_warning,
            "Threshold": self.threshold,
            "ThresholdSource": self.threshold_source,
            "Connectivity": self.connectivity,
            "MinLesionSize": self.min_lesion_size,
            "MinLesionSizeSource": self.min_lesion_size_source,
            "MinLesionSizeVoxels": self.min_lesion_size_voxels,
            "Folds": list(self.folds),
            "TTA": self.tta,
            "Device": self.device,
            "FastPath": self.fast_path,
            "Threads": self.threads,
            "Precision": self.precision,
            "Orientation": dict(self.orientation),
            "TilesRun": self.tiles_run,
            "TilesTotal": self.tiles_total,
        }

    @property
    def all_warnings(self) -> list[str]:
        """The out-of-distribution warning (when there is one), then the others."""
        return [w for w in [self.ood_warning] if w] + list(self.warnings)


@dataclass(frozen=True)
class AlignmentRecord(_Record):
    """The rigid alignment of two sessions (bids_cl.longitudinal.align), from the aligning node to the
    change node: ``before_to_after`` maps earlier scanner (RAS mm) points to the later session's."""

    before_to_after: list[list[float]]
    quality: float                   # correlation inside both brains, halfway space
    quality_unaligned: float         # the same without alignment (identity)
    method: str
    seed: int
    seconds: float = 0.0             # kept out of the derivatives


STATUS_OK = "ok"
STATUS_FAILED = "failed"
STATUS_REFUSED = "refused"           # a change pair whose alignment was too poor to classify change


@dataclass(frozen=True)
class TargetRecord(_Record):
    """How one target ended: the runner's only source for success, exit code, reason and timings."""

    prefix: str
    status: str                      # ok | failed
    exit_code: int = 0
    stage: str | None = None         # the node that failed (skullstrip, segment, register, write ...)
    reason: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)  # relative to the output folder

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK
