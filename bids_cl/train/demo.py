"""The demo model's data recipe: which phantoms it is trained on, and where the model lives.

    python -m bids_cl.train.demo OUT_DIR     # generates the training sets and merges them (OUT_DIR/train_all)

See docs/demo-model.md for the full recipe (bids_cl-train options, the GPU run, the evaluation).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

# Training sets: seeds 1001-1003. Evaluation sets (benchmarks/demo_quality.py) use seeds 2001-2004.
# Tiny (2 mm) phantoms, the size the README demo runs on: a network for them trains on 2 CPU cores.
TRAIN_SETS: dict[str, dict[str, Any]] = {
    "train_3T": dict(participants=24, seed=1001, field="3T", sequence="mixed"),
    "train_7T": dict(participants=24, seed=1002, field="7T", sequence="mixed"),
    "train_mix": dict(participants=24, seed=1003, field="mixed", sequence="both", orientation="mixed",
                      lesion_free_fraction=0.1),
}
SET_CODES = {"train_3T": "a", "train_7T": "b", "train_mix": "c"}
_SUB = re.compile(r"sub-([a-zA-Z0-9]+?)(?=[_/]|$)")


def merge_datasets(out: Path, sources: dict[str, Path]) -> Path:
    """One BIDS dataset from several phantom datasets; ``sub-01`` of the set coded ``a`` becomes ``sub-a01``.

    Images and manual masks are hard-linked (copied across file systems); participants.tsv records the
    source set of every participant.
    """
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    rows = ["participant_id\tsource"]
    for code, src in sources.items():
        for f in sorted(src.rglob("*")):
            rel = f.relative_to(src).as_posix()
            if not f.is_file() or not rel.startswith(("sub-", "derivatives/manual_masks/sub-")):
                continue
            dest = out / _SUB.sub(lambda m, c=code: f"sub-{c}{m.group(1)}", rel)
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, dest)
            except OSError:
                shutil.copy2(f, dest)
        for line in (src / "participants.tsv").read_text().splitlines()[1:]:
            rows.append(f"sub-{code}{line.split(chr(9))[0].removeprefix('sub-')}\t{src.name}")
    (out / "participants.tsv").write_text("\n".join(rows) + "\n")
    (out / "dataset_description.json").write_text(json.dumps(
        {"Name": "bids_cl demo-model training phantoms", "BIDSVersion": "1.10.0"}, indent=2) + "\n")
    return out


def make_training_data(out_dir: Path) -> Path:
    """Generate the three training sets (tiny phantoms) and merge them into ``out_dir/train_all``."""
    from bids_cl.synth.generate import generate_dataset

    for name, kwargs in TRAIN_SETS.items():
        if not (out_dir / name / "participants.tsv").is_file():
            generate_dataset(out_dir / name, size="tiny", overwrite=True, **kwargs)
    return merge_datasets(out_dir / "train_all", {SET_CODES[n]: out_dir / n for n in TRAIN_SETS})


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__)
        sys.exit(64)
    print(make_training_data(Path(sys.argv[1])))
