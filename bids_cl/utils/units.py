"""Parsing of sizes given on the command line."""

from __future__ import annotations

import re

from bids_cl.errors import EXIT_USAGE, BidsClError

_SIZE = re.compile(r"^\s*(?P<value>\d+(\.\d+)?)\s*(?P<unit>vox|voxels?|ul|µl|mm3)?\s*$", re.I)


def parse_min_lesion_size(text: str | int | float | None) -> tuple[float, str] | None:
    """``"5"``/``"5vox"`` -> (5, "voxels"); ``"3uL"``/``"3mm3"`` -> (3.0, "ul"); None -> None."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        return float(text), "voxels"
    match = _SIZE.match(str(text))
    if not match:
        raise BidsClError(
            f"--min-lesion-size '{text}' is not a size: use voxels (e.g. 3) or µL (e.g. 3uL)",
            EXIT_USAGE,
        )
    value = float(match.group("value"))
    unit = (match.group("unit") or "voxels").lower()
    return value, ("ul" if unit in ("ul", "µl", "mm3") else "voxels")
