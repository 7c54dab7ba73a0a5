"""The run configuration: what the user asked for (:class:`RunConfig`, frozen, filled once by the parser)
and what this run resolved it to on this machine (:class:`ResolvedRun`: the device, threads, memory, the
verified model).

Both are saved as TOML next to every participant's outputs (``sub-X/log/<run_uuid>/bids_cl.toml``): the
``[bids_cl]`` section holds the request and is what ``--config-file`` reloads, so a saved ``device = "auto"``
run on a GPU node uses the GPU even when the first run found none; ``[resolved]`` records what was used.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from bids_cl.preproc.skullstrip import STRATEGIES

DEFAULT_OUTPUT_SPACES = ["MNI152NLin2009aSym"]
ANALYSIS_LEVELS = ("participant", "group")
SKULL_STRIP_CHOICES = STRATEGIES  # one list, owned by the skull-stripping code
DEVICE_CHOICES = ("auto", "cuda", "cpu")
CONNECTIVITY_CHOICES = (6, 18, 26)
LONGITUDINAL_CHOICES = ("auto", "off")
# auto: one shared segmentation worker on a GPU run whose Nipype plugin runs nodes on this machine,
# else every segment node loads the model itself (bids_cl.engine.worker).
SEGMENT_WORKER_CHOICES = ("auto", "shared", "node")
# Nipype plugins that run nodes on this machine; every other one submits jobs to a cluster scheduler.
IN_PROCESS_PLUGINS = ("MultiProc", "LegacyMultiProc", "Linear", "Debug")


def is_local_plugin(plugin: str | None) -> bool:
    """Whether the Nipype plugin runs the nodes on this machine (unset: MultiProc, the default)."""
    return (plugin or "MultiProc") in IN_PROCESS_PLUGINS


def _new_run_uuid() -> str:
    # Sortable by time, unique across concurrent array tasks writing into one output folder.
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}_{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class RunConfig:
    """Every setting of one bids_cl invocation as the user asked for it (paths absolute once parsed)."""

    bids_dir: Path
    output_dir: Path
    analysis_level: str = "participant"
    # BIDS selection
    participant_label: list[str] | None = None
    session_label: list[str] | None = None
    bids_filters: dict[str, dict[str, Any]] = field(default_factory=dict)
    bids_filter_file: Path | None = None
    bids_database_dir: Path | None = None
    skip_bids_validation: bool = False
    # execution
    work_dir: Path = field(default_factory=lambda: Path.cwd() / "work")
    nprocs: int | None = None
    omp_nthreads: int | None = None
    mem_mb: int | None = None
    use_plugin: Path | None = None
    plugin: str = "MultiProc"
    plugin_args: dict[str, Any] = field(default_factory=dict)
    dry_run: bool = False
    reports_only: bool = False
    verbose: int = 0
    random_seed: int = 20250716
    sloppy: bool = False
    # segmentation
    device: str = "auto"
    model: str = "auto"
    folds: list[int] | None = None
    disable_tta: bool = False
    threshold: float | None = None  # None: the model's tuned threshold, else 0.5
    min_lesion_size: str | None = None
    connectivity: int = 26
    segment_worker: str = "auto"
    # preprocessing
    skull_strip: str = "auto"
    synthstrip_model: Path | None = None
    output_spaces: list[str] = field(default_factory=lambda: list(DEFAULT_OUTPUT_SPACES))
    # longitudinal lesion change (docs/longitudinal.md)
    longitudinal: str = "auto"  # auto: pairs of sessions when a participant has several; off: none
    change_rules: dict[str, float] = field(default_factory=dict)  # ChangeRules fields given by the user
    # bookkeeping
    run_uuid: str = field(default_factory=_new_run_uuid)
    version: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON/TOML-friendly dict (paths as strings, None values kept)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = _plain(value)
        return out

    def to_toml(self, resolved: ResolvedRun | None = None) -> str:
        """TOML text of this configuration (and what a run resolved it to); unset options are comments."""
        sections = {"bids_cl": self.to_dict()}
        if resolved is not None:
            sections["resolved"] = resolved.to_dict()
        return dict_to_toml(sections)

    def save(self, path: Path, resolved: ResolvedRun | None = None) -> Path:
        from bids_cl.utils.io import atomic_write_text

        return atomic_write_text(Path(path), self.to_toml(resolved))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: coerce_field(k, v) for k, v in values.items() if k in known})

    @classmethod
    def load(cls, path: Path) -> RunConfig:
        """The request saved in ``path`` (its ``[bids_cl]`` section; ``[resolved]`` is a record only).

        Invalid TOML is a usage error (exit 64), one line.
        """
        from bids_cl.errors import EXIT_USAGE, BidsClError

        try:
            with open(path, "rb") as handle:
                data = tomllib.load(handle)
        except tomllib.TOMLDecodeError as exc:
            raise BidsClError(f"--config-file {path} is not valid TOML ({exc})", EXIT_USAGE) from None
        section = data.get("bids_cl")
        if not isinstance(section, dict):
            raise BidsClError(f"--config-file {path} has no [bids_cl] section (is it a bids_cl.toml?)",
                              EXIT_USAGE)
        return cls.from_dict(section)


@dataclass(frozen=True)
class ResolvedRun:
    """What one run made of its :class:`RunConfig` on this machine (never reloaded by --config-file)."""

    device: str                 # "cpu" | "cuda": what --device auto found
    nprocs: int                 # processes at once (option, else the Slurm allocation / usable CPUs)
    omp_nthreads: int           # threads per process
    mem_mb: int | None          # memory budget for the scheduler
    model: str                  # the verified model folder the segmentation nodes load
    random_seed: int
    segment_worker: str = "node"  # "shared" | "node": what --segment-worker auto chose
    worker_address: str | None = None  # the shared worker's socket while this run lasts

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def environment(self) -> dict[str, str]:
        """Environment variables that every process of this run should see."""
        return {
            "NIPYPE_NO_ET": "1", "NO_ET": "1",
            "OMP_NUM_THREADS": str(self.omp_nthreads),
            "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(self.omp_nthreads),
            "ANTS_RANDOM_SEED": str(self.random_seed),
        }

    def apply_environment(self) -> None:
        os.environ.update(self.environment())


_PATH_FIELDS = {
    "bids_dir",
    "output_dir",
    "bids_filter_file",
    "bids_database_dir",
    "work_dir",
    "use_plugin",
    "synthstrip_model",
}


def coerce_field(key: str, value: Any) -> Any:
    """A value read from TOML/JSON in the type the RunConfig field holds (paths as Path)."""
    return Path(value) if value is not None and key in _PATH_FIELDS else value


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        items = ", ".join(
            f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None
        )
        return "{ " + items + " }" if items else "{}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _toml_value(key)


def dict_to_toml(sections: dict[str, dict[str, Any]]) -> str:
    """Write ``{section: {key: value}}`` as TOML (enough for our flat configuration)."""
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is None:
                lines.append(f"# {key} = (unset)")
            else:
                lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)
