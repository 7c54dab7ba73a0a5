"""Input discovery and validation with pybids.

Discovery turns a BIDS dataset into a list of :class:`WorkItem` — one per participant, session and
segmentation target image — recording what was picked and why (the *evidence*), so a user can check the
plan (``--dry-run``) before submitting hundreds of jobs.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bids_cl.derivatives import spec
from bids_cl.errors import (
    EXIT_BAD_DATA,
    EXIT_MISSING_INPUT,
    EXIT_NO_DATA_SELECTED,
    EXIT_USAGE,
    EXIT_VALIDATION,
    BidsClError,
)

LOGGER = logging.getLogger("bids_cl.discovery")

NIFTI_EXTENSIONS = [".nii", ".nii.gz"]

# One query per input kind: data, so that --bids-filter-file can override any of them.
DEFAULT_QUERIES: dict[str, dict[str, Any]] = {
    "uni": {"datatype": "anat", "suffix": "UNIT1", "extension": NIFTI_EXTENSIONS},
    "t1w": {"datatype": "anat", "suffix": "T1w", "extension": NIFTI_EXTENSIONS},
    "inv1": {"datatype": "anat", "suffix": "MP2RAGE", "inv": 1, "extension": NIFTI_EXTENSIONS},
    "inv2": {"datatype": "anat", "suffix": "MP2RAGE", "inv": 2, "extension": NIFTI_EXTENSIONS},
    "t1map": {"datatype": "anat", "suffix": "T1map", "extension": NIFTI_EXTENSIONS},
}
QUERY_NAMES = tuple(DEFAULT_QUERIES)

# Phase/real/imaginary parts of the inversions carry no use for skull stripping or segmentation.
_IGNORED_PARTS = {"phase", "real", "imag"}
# acq- labels that mark a T1w file as an MP2RAGE UNI image filed under the T1w suffix.
_MP2RAGE_ACQ = re.compile(r"(mp2rage|uni|unit1|mp2r)", re.IGNORECASE)
_ENTITY_ORDER = [
    "subject", "session", "sample", "task", "tracksys", "acquisition", "nucleus", "volume",
    "ceagent", "staining", "tracer", "reconstruction", "direction", "run", "proc", "modality",
    "echo", "flip", "inv", "mt", "part", "recording", "chunk",
]
# What a --bids-filter-file may name: the BIDS entities, plus the file-level keys of pybids queries.
FILTER_ENTITIES = (*_ENTITY_ORDER, "suffix", "extension", "datatype", "space", "desc")

_ENTITY_KEYS = {
    "subject": "sub", "session": "ses", "sample": "sample", "task": "task", "tracksys": "tracksys",
    "acquisition": "acq", "nucleus": "nuc", "volume": "voi", "ceagent": "ce", "staining": "stain",
    "tracer": "trc", "reconstruction": "rec", "direction": "dir", "run": "run", "proc": "proc",
    "modality": "mod", "echo": "echo", "flip": "flip", "inv": "inv", "mt": "mt", "part": "part",
    "recording": "recording", "chunk": "chunk",
}


@dataclass
class WorkItem:
    """One segmentation target: a participant's session and the T1-weighted image to segment."""

    participant: str
    session: str | None
    target: str
    target_suffix: str
    entities: dict[str, Any]
    prefix: str
    sequence: str
    evidence: list[str] = field(default_factory=list)
    field_strength: float | None = None
    inv1: str | None = None
    inv2: str | None = None
    t1map: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> WorkItem:
        return cls(**values)

    @property
    def anat_dir(self) -> str:
        """Relative folder of this target's derivatives: ``sub-X[/ses-Y]/anat``."""
        return spec.anat_dir(self.participant, self.session)


@dataclass
class Problem:
    """Something discovery found that cannot be segmented: an unreadable target, or a participant
    without any T1-weighted image. Reported by the run (one line, its exit code), never processed."""

    participant: str
    session: str | None
    prefix: str                  # names the crash note
    problem: str                 # one line for the user
    problem_code: int            # the BIDS-Apps exit code it maps to
    target: str | None = None    # the image, when there is one

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Discovery:
    """What discovery found: the targets to segment, and the problems to report."""

    items: list[WorkItem]
    problems: list[Problem]

    def to_dicts(self) -> list[dict[str, Any]]:
        """The discovery record (``discovery.json``, ``--dry-run``): targets, then problems."""
        return [*(i.to_dict() for i in self.items), *(p.to_dict() for p in self.problems)]


# --------------------------------------------------------------------------------------------
# Filters and queries


def load_bids_filters(path: Path) -> dict[str, dict[str, Any]]:
    """Read a --bids-filter-file: JSON ``{query_name: {entity: value}}``.

    ``null`` means the entity must be absent, ``"*"`` means any value (entity present).
    """
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BidsClError(f"--bids-filter-file {path} does not exist", EXIT_USAGE) from None
    except json.JSONDecodeError as exc:
        raise BidsClError(f"--bids-filter-file {path} is not valid JSON: {exc}", EXIT_USAGE) from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise BidsClError(
            f"--bids-filter-file {path} must map query names to entity dictionaries", EXIT_USAGE
        )
    unknown = sorted(set(data) - set(QUERY_NAMES))
    if unknown:
        raise BidsClError(
            f"--bids-filter-file names unknown queries {unknown}; known: {list(QUERY_NAMES)}",
            EXIT_USAGE,
        )
    for query, entities in data.items():
        for entity, value in entities.items():
            if entity not in FILTER_ENTITIES:
                raise BidsClError(f"--bids-filter-file: query '{query}' names an unknown BIDS entity "
                                  f"'{entity}' (known: {', '.join(FILTER_ENTITIES)})", EXIT_USAGE)
            if not _filter_value_ok(value):
                raise BidsClError(f"--bids-filter-file: query '{query}', entity '{entity}': a value is a "
                                  "string, a number, null, \"*\" or a list of strings/numbers, not "
                                  f"{type(value).__name__}", EXIT_USAGE)
    return data


def _filter_value_ok(value: Any) -> bool:
    scalar = (str, int, float)
    if value is None or (isinstance(value, scalar) and not isinstance(value, bool)):
        return True
    return isinstance(value, list) and bool(value) and all(
        isinstance(v, scalar) and not isinstance(v, bool) for v in value)


def build_queries(filters: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """The default queries with user filters merged in (and null/"*" turned into pybids Queries)."""
    from bids.layout import Query

    queries = copy.deepcopy(DEFAULT_QUERIES)
    for name, overrides in (filters or {}).items():
        for entity, value in overrides.items():
            if value is None:
                queries[name][entity] = Query.NONE
            elif value == "*":
                queries[name][entity] = Query.ANY
            else:
                queries[name][entity] = value
    return queries


# --------------------------------------------------------------------------------------------
# Validation


def find_symlink_loop(root: Path) -> Path | None:
    """A symbolic link inside ``root`` that points at its own folder or one above it, if any.

    pybids follows such a link ~40 levels deep and fails with an unrelated message; found here, the
    user is told which link to remove.
    """
    for folder, subdirs, _files in os.walk(root, followlinks=False):
        for name in subdirs:
            link = Path(folder) / name
            if link.is_symlink():
                try:
                    target = link.resolve(strict=True)
                except (OSError, RuntimeError):  # a link to itself, or a chain of links that loops
                    return link
                if target == link.parent.resolve() or target in link.parent.resolve().parents:
                    return link
    return None


def check_dataset_minimum(bids_dir: Path) -> list[str]:
    """The built-in minimum check; returns problems (empty list = acceptable)."""
    loop = find_symlink_loop(bids_dir)
    if loop is not None:
        return [f"the symbolic link {loop} points at {loop.resolve()}, a folder that contains it "
                "(a loop); remove or replace it"]
    problems: list[str] = []
    if not bids_dir.is_dir():
        return [f"{bids_dir} is not a directory"]
    description = bids_dir / "dataset_description.json"
    if not description.is_file():
        problems.append("dataset_description.json is missing")
    else:
        try:
            meta = json.loads(description.read_text())
        except json.JSONDecodeError as exc:
            problems.append(f"dataset_description.json is not valid JSON ({exc})")
        else:
            if not isinstance(meta, dict) or "BIDSVersion" not in meta or "Name" not in meta:
                problems.append("dataset_description.json lacks Name or BIDSVersion")
    if not any(p.is_dir() and p.name.startswith("sub-") for p in bids_dir.iterdir()):
        problems.append("no sub-<label> folders found")
    return problems


def find_bids_validator() -> list[str] | None:
    """Command of the full BIDS validator when installed (deno build first, then legacy node)."""
    # The environment's own bin folder first: a venv's scripts are not on PATH unless activated.
    bin_dir = Path(sys.executable).parent
    for name in ("bids-validator-deno", "bids-validator"):
        local = bin_dir / name
        exe = str(local) if local.is_file() else shutil.which(name)
        if exe:
            return [exe]
    return None


def validate_dataset(bids_dir: Path, *, skip: bool = False) -> str:
    """Validate the input dataset; raises BidsClError(16) on failure. Returns what was run."""
    problems = check_dataset_minimum(bids_dir)
    if problems:
        raise BidsClError(
            f"{bids_dir} failed BIDS validation: " + "; ".join(problems), EXIT_VALIDATION
        )
    if skip:
        return "skipped (--skip-bids-validation); built-in minimum checks passed"
    command = find_bids_validator()
    if command is None:
        LOGGER.warning(
            "The full BIDS validator is not installed (pip install bids-validator-deno); "
            "only the built-in minimum checks were run."
        )
        return "built-in minimum checks only (full validator not installed)"
    proc = subprocess.run(
        [*command, str(bids_dir)], capture_output=True, text=True, timeout=600, check=False
    )
    if proc.returncode != 0:
        lines = (proc.stdout + "\n" + proc.stderr).splitlines()
        first_error = next((ln.strip() for ln in lines if "[ERROR]" in ln or " ERR " in ln),
                           "see the log file for the validator's report")
        # The whole report goes to the log file; stderr gets one line (the first error and the log).
        LOGGER.info("BIDS validator output:\n%s\n%s", proc.stdout, proc.stderr)
        raise BidsClError(
            f"{bids_dir} failed BIDS validation ({Path(command[0]).name}): {first_error}",
            EXIT_VALIDATION,
        )
    return f"{Path(command[0]).name} passed"


def check_output_locations(bids_dir: Path, output_dir: Path, work_dir: Path | None) -> None:
    """Refuse output or work folders inside the input dataset (except bids_dir/derivatives/...)."""
    bids_dir = bids_dir.resolve()
    derivatives = bids_dir / "derivatives"
    for label, path in (("output", output_dir), ("work", work_dir)):
        if path is None:
            continue
        path = path.resolve()
        if path == bids_dir:
            raise BidsClError(
                f"The {label} directory must not be the input dataset; "
                f"use e.g. {derivatives / 'bids_cl'}",
                EXIT_USAGE,
            )
        if path.is_relative_to(bids_dir) and not path.is_relative_to(derivatives):
            raise BidsClError(
                f"The {label} directory {path} lies inside the input dataset; put it outside or "
                f"under {derivatives}",
                EXIT_USAGE,
            )


# --------------------------------------------------------------------------------------------
# Discovery


def strip_prefix(labels: list[str] | None, prefix: str) -> list[str] | None:
    if not labels:
        return None
    out = []
    for label in labels:
        label = label.strip()
        if label.startswith(prefix):
            label = label[len(prefix):]
        if label:
            out.append(label)
    return sorted(set(out)) or None


def make_layout(bids_dir: Path, database_dir: Path | None = None) -> Any:
    """A pybids layout that indexes only what discovery needs (fast on big datasets)."""
    from bids import BIDSLayout, BIDSLayoutIndexer

    indexer = BIDSLayoutIndexer(
        validate=False,
        ignore=[re.compile(r"^/(code|derivatives|sourcedata|stimuli)/"),
                re.compile(r"/\.")],
        index_metadata=True,
    )
    kwargs: dict[str, Any] = {"validate": False, "indexer": indexer}
    if database_dir is not None:
        database_dir.mkdir(parents=True, exist_ok=True)
        kwargs["database_path"] = str(database_dir)
    return BIDSLayout(str(bids_dir), **kwargs)


def _files(layout: Any, query: dict[str, Any], **selection: Any) -> list[Any]:
    files = layout.get(return_type="object", **{**query, **selection})
    return [f for f in files if f.get_entities().get("part") not in _IGNORED_PARTS]


def _mp2rage_evidence(bids_file: Any, metadata: dict[str, Any]) -> list[str]:
    """Why a T1w-suffixed file should be treated as an MP2RAGE UNI image (empty: it is not)."""
    evidence: list[str] = []
    acq = bids_file.get_entities().get("acquisition")
    if acq and _MP2RAGE_ACQ.search(str(acq)):
        evidence.append(f"acq-{acq}")
    pulse = str(metadata.get("PulseSequenceType", ""))
    if "MP2RAGE" in pulse.upper():
        evidence.append(f"PulseSequenceType={pulse}")
    series = str(metadata.get("SeriesDescription", ""))
    if re.search(r"mp2rage|\bUNI\b|_UNI|UNI_|UNI-DEN|UNI_Images", series, re.IGNORECASE):
        evidence.append(f"SeriesDescription={series}")
    inversion = metadata.get("InversionTime")
    if isinstance(inversion, list) and len(inversion) == 2:
        evidence.append(f"InversionTime={inversion} (two inversions)")
    return evidence


def _entity_string(entities: dict[str, Any]) -> str:
    parts = []
    for name in _ENTITY_ORDER:
        value = entities.get(name)
        if value is None or value == "":
            continue
        parts.append(f"{_ENTITY_KEYS[name]}-{value}")
    return "_".join(parts)


def prefix_of(path: str | Path) -> str:
    """File name minus suffix and extension: the entity string derivatives are named with."""
    name = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    return name.rsplit("_", 1)[0]


def _pick_helper(candidates: list[Any], target_entities: dict[str, Any]) -> Any | None:
    """The inversion/T1map image that belongs to a target: same acq/run when ambiguous."""
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]

    def score(f: Any) -> tuple[int, str]:
        ents = f.get_entities()
        matches = sum(
            1 for key in ("acquisition", "run", "reconstruction")
            if ents.get(key) is not None and ents.get(key) == target_entities.get(key)
        )
        mag_bonus = 1 if ents.get("part") in (None, "mag") else 0
        return (-(matches * 2 + mag_bonus), f.path)

    return sorted(candidates, key=score)[0]


def _check_image(path: str) -> tuple[str | None, int | None]:
    """A one-line reason when a target image cannot be used (None when it is fine)."""
    import nibabel as nib

    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as exc:
        return f"{p.name} cannot be read ({exc.strerror})", EXIT_MISSING_INPUT
    if size == 0:
        return f"{p.name} is an empty (0-byte) file", EXIT_BAD_DATA
    try:
        img = nib.load(str(p))
        shape = img.shape
    except Exception as exc:  # nibabel raises many types for corrupt headers
        return f"{p.name} is not a readable NIfTI image ({type(exc).__name__}: {exc})", EXIT_BAD_DATA
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        return f"{p.name} is {len(shape)}-D; a 3-D T1-weighted image is needed", EXIT_BAD_DATA
    if min(shape) < 2:
        return f"{p.name} has a degenerate shape {tuple(shape)}", EXIT_BAD_DATA
    # The header can be fine and the data not: a truncated download, or an image without signal.
    # Reading it here makes that one line before any work, not a crash inside a node.
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # EOFError, zlib.error, OSError ... for truncated or corrupt data
        return (f"{p.name} is truncated or corrupt: its data cannot be read ({type(exc).__name__}: "
                f"{exc})"), EXIT_BAD_DATA
    problem = image_content_problem(data, p.name)
    return problem, (EXIT_BAD_DATA if problem else None)


def image_content_problem(data: np.ndarray, name: str) -> str | None:
    """Why an image's voxels cannot be segmented (no finite voxel, or no signal), else None."""
    finite = np.isfinite(data)
    if not finite.any():
        return f"{name} has no finite voxel (all NaN or infinite)"
    values = data[finite]
    if values.min() == values.max():
        return f"{name} has no signal (every finite voxel is {values.flat[0]:g})"
    return None


def discover(
    layout: Any,
    *,
    participant_label: list[str] | None = None,
    session_label: list[str] | None = None,
    bids_filters: dict[str, dict[str, Any]] | None = None,
    check_images: bool = True,
) -> Discovery:
    """Find every segmentation target, per participant and per session (sessions are never merged).

    Raises BidsClError(18) when the labels or filters select nothing, and BidsClError(66) when the
    selected participants have no T1-weighted image at all. A participant that lacks a T1-weighted image
    while others have one, and a target whose file cannot be read, become a :class:`Problem`, so the
    run can report them and go on.
    """
    queries = build_queries(bids_filters)
    all_subjects = sorted(layout.get_subjects())
    if participant_label:
        missing = sorted(set(participant_label) - set(all_subjects))
        if missing:
            raise BidsClError(
                "participant label(s) not found in the dataset: "
                + ", ".join(f"sub-{m}" for m in missing),
                EXIT_NO_DATA_SELECTED,
            )
        subjects = [s for s in all_subjects if s in participant_label]
    else:
        subjects = all_subjects
    if not subjects:
        raise BidsClError("no participants found in the dataset", EXIT_NO_DATA_SELECTED)

    items: list[WorkItem] = []
    problems: list[Problem] = []
    selected_anything = False
    for subject in subjects:
        sessions = sorted(layout.get_sessions(subject=subject)) or [None]
        if session_label:
            sessions = [s for s in sessions if s in session_label]
        subject_items: list[WorkItem] = []
        for session in sessions:
            selection: dict[str, Any] = {"subject": subject}
            if session is not None:
                selection["session"] = session
            session_items = _discover_session(layout, queries, selection, subject, session)
            if session_items:
                selected_anything = True
            subject_items.extend(session_items)
        if not subject_items and sessions:
            problems.append(Problem(
                participant=subject, session=None, prefix=f"sub-{subject}",
                problem=f"sub-{subject} has no T1-weighted image (UNIT1 or T1w) matching the queries",
                problem_code=EXIT_MISSING_INPUT))
        items.extend(subject_items)

    if session_label and not any(i.session in session_label for i in items):
        raise BidsClError(
            "session label(s) " + ", ".join(f"ses-{s}" for s in session_label)
            + " select no data", EXIT_NO_DATA_SELECTED,
        )
    if not selected_anything:
        if bids_filters:
            raise BidsClError(
                "the --bids-filter-file queries select no T1-weighted image", EXIT_NO_DATA_SELECTED
            )
        raise BidsClError(
            "no T1-weighted image (UNIT1 or T1w) found for "
            + ", ".join(f"sub-{s}" for s in subjects), EXIT_MISSING_INPUT,
        )
    usable: list[WorkItem] = []
    for item in items:
        reason, code = _check_image(item.target) if check_images else (None, None)
        if reason is None:
            usable.append(item)
        else:
            problems.append(Problem(participant=item.participant, session=item.session,
                                    prefix=item.prefix, problem=reason, problem_code=code or EXIT_BAD_DATA,
                                    target=item.target))
    return Discovery(usable, problems)


def _discover_session(
    layout: Any, queries: dict[str, dict[str, Any]], selection: dict[str, Any],
    subject: str, session: str | None,
) -> list[WorkItem]:
    unis = _files(layout, queries["uni"], **selection)
    t1ws = _files(layout, queries["t1w"], **selection)
    inv1s = _files(layout, queries["inv1"], **selection)
    inv2s = _files(layout, queries["inv2"], **selection)
    t1maps = _files(layout, queries["t1map"], **selection)

    items: list[WorkItem] = []
    for bids_file in [*unis, *t1ws]:
        entities = {k: v for k, v in bids_file.get_entities().items()
                    if k not in ("suffix", "extension", "datatype")}
        metadata = bids_file.get_metadata()
        suffix = bids_file.get_entities()["suffix"]
        if suffix == "UNIT1":
            sequence, evidence = "MP2RAGE", ["suffix UNIT1 (scanner UNI image)"]
            evidence += _mp2rage_evidence(bids_file, metadata)
        else:
            evidence = _mp2rage_evidence(bids_file, metadata)
            if evidence:
                sequence = "MP2RAGE"
                evidence = ["T1w suffix but MP2RAGE UNI by:", *evidence]
            else:
                sequence = "MPRAGE"
                evidence = ["suffix T1w without MP2RAGE markers (acq-, PulseSequenceType, "
                            "SeriesDescription, InversionTime)"]
        field_strength = metadata.get("MagneticFieldStrength")
        try:
            field_strength = float(field_strength) if field_strength is not None else None
        except (TypeError, ValueError):
            field_strength = None
        inv1 = _pick_helper(inv1s, entities) if sequence == "MP2RAGE" else None
        inv2 = _pick_helper(inv2s, entities) if sequence == "MP2RAGE" else None
        t1map = _pick_helper(t1maps, entities) if sequence == "MP2RAGE" else None
        items.append(
            WorkItem(
                participant=subject,
                session=session,
                target=bids_file.path,
                target_suffix=suffix,
                entities=entities,
                prefix=prefix_of(bids_file.path),
                sequence=sequence,
                evidence=evidence,
                field_strength=field_strength,
                inv1=inv1.path if inv1 else None,
                inv2=inv2.path if inv2 else None,
                t1map=t1map.path if t1map else None,
            )
        )
    _deduplicate_prefixes(items)
    return items


def _deduplicate_prefixes(items: list[WorkItem]) -> None:
    """Two targets of one session must not share derivative names (UNIT1 + T1w without acq-)."""
    seen: dict[str, int] = {}
    for item in items:
        seen[item.prefix] = seen.get(item.prefix, 0) + 1
    for item in items:
        if seen[item.prefix] > 1 and item.target_suffix != "T1w":
            entities = dict(item.entities)
            label = item.target_suffix
            entities["acquisition"] = (
                f"{entities['acquisition']}{label}" if entities.get("acquisition") else label
            )
            item.prefix = _entity_string(entities)
            item.evidence.append(f"prefix {item.prefix} chosen to avoid a name collision")
