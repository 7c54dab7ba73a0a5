"""Which sessions are compared: one participant's targets of one *target line* (same sequence, suffix
and entities other than the session), sorted by session; every consecutive pair and, with three or
more sessions, baseline -> last. Pure (WorkItems in, pairs and warnings out): the graph builder and
the runner both call it, so they agree on the pairs."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from bids_cl.derivatives import spec
from bids_cl.utils.bids import WorkItem

CONSECUTIVE, BASELINE_LAST = "consecutive", "baseline-last"


@dataclass(frozen=True)
class SessionPair:
    earlier: WorkItem
    later: WorkItem
    kind: str  # consecutive | baseline-last

    @property
    def name(self) -> str:
        """The pair's record name (``targets/<name>.json``): the later prefix and the earlier session."""
        return f"{self.later.prefix}_desc-changeFrom{self.earlier.session}"


def target_line(item: WorkItem) -> tuple[Any, ...]:
    """What two sessions' targets must share to be compared: the prefix without its session
    (:func:`~bids_cl.derivatives.spec.line_of`, the rule the group level uses), sequence and suffix."""
    return item.participant, item.sequence, item.target_suffix, spec.line_of(item.prefix)


def session_key(label: str | None) -> tuple[Any, ...]:
    """Natural order of session labels (2 before 10; labels are compared digit runs as numbers)."""
    parts = re.findall(r"\d+|\D+", label or "")
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def _describe(line: tuple[Any, ...]) -> str:
    _, sequence, suffix, prefix = line
    return f"{sequence} {suffix} ({prefix})"


def plan_pairs(items: Sequence[WorkItem], problems: Iterable[Any] = ()
               ) -> tuple[list[SessionPair], list[str]]:
    """The pairs to compare and one warning per target or session that cannot be paired.

    ``problems``: discovery's unusable targets (anything with ``participant``, ``session``, ``prefix``,
    ``problem``); a participant's session that has one is named in a warning.
    """
    problems = list(problems)
    sessions: dict[str, set[str]] = {}
    for entry in [*items, *problems]:
        if entry.session is not None:
            sessions.setdefault(entry.participant, set()).add(entry.session)
    lines: dict[tuple[Any, ...], list[WorkItem]] = {}
    for item in items:
        if item.session is not None:
            lines.setdefault(target_line(item), []).append(item)
    pairs: list[SessionPair] = []
    warnings: list[str] = []
    for line in sorted(lines, key=lambda k: (k[0], _describe(k))):
        members = sorted(lines[line], key=lambda i: session_key(i.session))
        if len(sessions.get(line[0], ())) < 2:
            continue
        if len(members) < 2:
            warnings.append(f"{members[0].prefix}: no other session of sub-{line[0]} has a "
                            f"{_describe(line)} target: no lesion change is computed for it")
            continue
        for earlier, later in zip(members, members[1:], strict=False):
            pairs.append(SessionPair(earlier, later, CONSECUTIVE))
        if len(members) > 2:
            pairs.append(SessionPair(members[0], members[-1], BASELINE_LAST))
    for problem in problems:
        if problem.session is not None and len(sessions.get(problem.participant, ())) > 1:
            warnings.append(f"{problem.prefix}: left out of the lesion change pairs "
                            f"({' '.join(str(problem.problem).split())})")
    return pairs, warnings
