"""Find a template image for registration figures without ever making a report fail.

Callers may pass templates explicitly (``{space: path}``, ``{space: (t1w, mask)}`` or an object with
``t1w``/``mask`` attributes such as ``bids_cl.preproc.TemplateFiles``); otherwise
``bids_cl.preproc.get_template(space)`` is tried. Any problem (module not there yet, TemplateFlow
offline, file missing) means "no template": the report then says so instead of drawing the figure.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOGGER = logging.getLogger("bids_cl.reports")


@dataclass(frozen=True)
class Template:
    space: str
    t1w: Path
    mask: Path | None
    source: str


def _as_template(space: str, value: Any, source: str) -> Template | None:
    if value is None:
        return None
    if isinstance(value, (str, Path)):
        t1w, mask = value, None
    elif isinstance(value, (tuple, list)) and value:
        t1w, mask = value[0], value[1] if len(value) > 1 else None
    elif hasattr(value, "t1w"):
        t1w, mask = value.t1w, getattr(value, "mask", None)
        source = str(getattr(value, "source", source) or source)
    else:
        return None
    if t1w is None or not Path(t1w).exists():
        return None
    mask_path = Path(mask) if mask is not None and Path(mask).exists() else None
    return Template(space, Path(t1w), mask_path, source)


def resolve_template(space: str, templates: Mapping[str, Any] | None = None, *,
                     lookup: bool = True, cache: dict[str, Template | None] | None = None
                     ) -> Template | None:
    """The template for ``space`` from ``templates``, else from ``get_template`` (if ``lookup``)."""
    if cache is not None and space in cache:
        return cache[space]
    found = _as_template(space, (templates or {}).get(space), "given") if templates else None
    if found is None and lookup:
        try:
            from bids_cl.preproc import get_template  # written in parallel; may not exist yet

            found = _as_template(space, get_template(space), "bids_cl.preproc.get_template")
        except Exception as exc:  # any failure only costs a figure
            LOGGER.info("no template for %s (%s: %s)", space, type(exc).__name__, exc)
            found = None
    if cache is not None:
        cache[space] = found
    return found
