"""Longitudinal evaluation: bids_cl's lesion change between two sessions against the phantom truth.

For every pair of sessions with a change summary (earlier E -> later L, ``reader.collect_changes``):

* **new-lesion detection**: the connected components of the predicted change map whose class is
  ``new`` against the truth cortical lesions that are new at L since E, matched exactly as the
  cross-sectional metrics match lesions (``metrics.match_lesions``: adjusted IoU >= threshold is a
  TP, a poorer overlap a USL, no overlap an FP; a truth lesion without any overlap an FN), scored
  with the same F1, recall and precision and the same 0/0 convention;
* **confusion of change classes**: each truth cortical lesion of the pair gets its truth class
  (:func:`truth_classes`) and the class of the predicted lesion matched to it
  (:func:`matched_classes`), or ``missed``; predicted lesions on no truth cortical lesion are the
  row ``none``.

Truth classes come from the truth tables of every session from E to L (the phantom's course), not
from volumes: a truth lesion with a row of positive volume at L and none at E is ``new``; one at E
and not at L ``disappeared``; one at both ``enlarging`` or ``shrinking`` when its status says so at
a session after E up to L, else ``stable``. Everything here reads files only; the numerics are the
cross-sectional ones (``metrics``, ``utils.components``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bids_cl.derivatives import spec
from bids_cl.derivatives.reader import (
    ChangeOutputs,
    collect_changes,
    natural_key,
    output_participants,
    read_json,
)
from bids_cl.evaluation.aggregate import AGGREGATE_COLUMNS, _summary_rows
from bids_cl.evaluation.evaluate import (
    NA,
    TRUTH_DSEG_SUFFIX,
    TRUTH_STATS_SUFFIX,
    EvaluationSettings,
    Volume,
    load_volume,
    on_prediction_grid,
)
from bids_cl.evaluation.metrics import LesionCounts, majority_partner, match_lesions
from bids_cl.evaluation.pairing import find_by_suffix, prefix_entities
from bids_cl.utils.components import label_components, overlap_pairs

NEW, ENLARGING, STABLE, SHRINKING, DISAPPEARED = tuple(spec.CHANGE_CODES)
CLASSES: tuple[str, ...] = tuple(spec.CHANGE_CODES)  # new, enlarging, stable, shrinking, disappeared
MISSED = "missed"  # no predicted lesion overlaps the truth lesion
NO_TRUTH = "none"  # a predicted lesion on no truth cortical lesion
PRESENT_AT_LATER = (NEW, ENLARGING, STABLE, SHRINKING)
_CODE_CLASS = {code: name for name, code in spec.CHANGE_CODES.items()}

PAIR_COLUMNS = [
    "participant_id", "earlier", "later", "session_from", "session_to", "refused",
    "alignment_quality", "truth_new", "pred_new", "new_tp", "new_fp", "new_usl", "new_fn",
    "new_f1", "new_recall", "new_precision",
    *(f"truth_{c}" for c in CLASSES), *(f"pred_{c}" for c in CLASSES if c != NEW),
    "class_agreement",
]
CONFUSION_COLUMNS = ["truth_class", "n", *CLASSES, MISSED]
LESION_COLUMNS = ["participant_id", "earlier", "later", "truth_id", "type", "truth_class",
                  "predicted_class", "matched_in", "overlap_voxels"]
NEW_METRICS = ("new_f1", "new_recall", "new_precision")
NEW_POOLING = ("new_tp", "new_fp", "new_usl", "new_fn", "truth_new")

CONVENTIONS = {
    "NewLesionDetection": "components of the predicted change map with value 1 (new), labelled with "
                          "the evaluation's connectivity, against the truth cortical lesions new at "
                          "the later session since the earlier one; matched and scored as the "
                          "cross-sectional lesion-wise metrics (criterion, threshold, 0/0 convention)",
    "TruthClass": "from the truth tables of every session from the earlier to the later one: a row "
                  "of positive volume at the later session and none at the earlier: new; at the "
                  "earlier and not the later: disappeared; at both: enlarging or shrinking when the "
                  "lesion's status is that at a session after the earlier one up to the later one, "
                  "else stable. Cortical lesions (label CL) only",
    "PredictedClass": "a truth lesion present at the later session: the class (majority value) of "
                      "the predicted change-map component (values 1-4) overlapping it most; if none "
                      "and the lesion is also in the earlier truth, 'disappeared' when the earlier "
                      "predicted lesion overlapping it most is disappeared in the change table. A "
                      "truth lesion that disappeared: the change-table class of the earlier "
                      "predicted lesion (lesion_id_before) overlapping its earlier truth most. "
                      "Otherwise 'missed'",
    "NoTruthRow": "predicted change-map components on no truth cortical lesion of the later session, "
                  "and earlier predicted lesions called disappeared on no truth cortical lesion of "
                  "the earlier session, by predicted class",
    "ClassAgreement": "truth lesions whose predicted class equals the truth class / truth lesions",
    "RefusedPairs": "pairs whose alignment was refused have no change map: they are listed in "
                    "pairs.tsv and left out of every aggregate",
}


# ------------------------------------------------------------------------------------ pure parts
def truth_classes(tables: Mapping[str, pd.DataFrame], earlier: str, later: str,
                  order: Sequence[str]) -> dict[int, str]:
    """Truth change class of every cortical lesion of the pair (``CONVENTIONS["TruthClass"]``).

    ``tables``: session label -> truth table (lesion_id, label, volume_ul, status); ``order``: the
    session labels of the line in time order (``earlier`` and ``later`` among them).
    """
    def present(session: str) -> dict[int, pd.Series]:
        table = tables.get(session)
        if table is None or table.empty:
            return {}
        rows = table[(table["label"] == "CL") & (pd.to_numeric(table["volume_ul"]) > 0)]
        return {int(r.lesion_id): r for r in rows.itertuples()}

    before, after = present(earlier), present(later)
    between = list(order)[list(order).index(earlier) + 1: list(order).index(later) + 1]
    out: dict[int, str] = {}
    for lesion_id in sorted(set(before) | set(after)):
        if lesion_id not in before:
            out[lesion_id] = NEW
        elif lesion_id not in after:
            out[lesion_id] = DISAPPEARED
        else:
            events = []
            for session in between:
                table = tables.get(session)
                if table is None or table.empty:
                    continue
                rows = table[table["lesion_id"].astype(int) == lesion_id]
                events += [s for s in rows["status"].astype(str) if s in (ENLARGING, SHRINKING)]
            out[lesion_id] = events[0] if events else STABLE
    return out


def component_classes(change_map: np.ndarray, connectivity: int,
                      codes: Sequence[int]) -> tuple[np.ndarray, int, list[str]]:
    """Components of the change map where its value is in ``codes``: labels, count and the class of
    each (the most common value under it; ties to the smaller code)."""
    values = np.asarray(change_map)
    labels, n = label_components(np.isin(values, list(codes)), connectivity)
    if n == 0:
        return labels, 0, []
    pairs = overlap_pairs(labels, values.astype(np.int64))
    best, _ = majority_partner(pairs, n)
    return labels, n, [_CODE_CLASS.get(int(b), NA) for b in best]


@dataclass
class Matched:
    """The predicted lesion overlapping each truth lesion most (0 when none) and the overlap."""

    partner: dict[int, int]
    voxels: dict[int, int]
    predicted_on_truth: set[int]


def match_truth(truth_labels: np.ndarray, truth_ids: Sequence[int], pred_labels: np.ndarray,
                n_pred: int) -> Matched:
    """For each truth instance id, the predicted component overlapping it most (ties: smaller id)."""
    truth = np.where(np.isin(truth_labels, list(truth_ids)), truth_labels, 0)
    pairs = overlap_pairs(truth.astype(np.int64), pred_labels)
    n_truth = int(max(truth_ids, default=0))
    best, voxels = majority_partner(pairs, n_truth)
    return Matched({t: int(best[t - 1]) for t in truth_ids if t >= 1},
                   {t: int(voxels[t - 1]) for t in truth_ids if t >= 1},
                   {int(b) for b in pairs.b_id.tolist()} if n_pred else set())


def confusion_table(truth: Sequence[str], predicted: Sequence[str],
                    no_truth: Sequence[str] = ()) -> pd.DataFrame:
    """Rows: truth classes (+ ``none`` for predictions on no truth); columns: predicted classes and
    ``missed``; ``n`` = row total."""
    rows = []
    for truth_class in [*CLASSES, NO_TRUTH]:
        if truth_class == NO_TRUTH:
            counts = pd.Series(list(no_truth), dtype=object).value_counts()
        else:
            got = [p for t, p in zip(truth, predicted, strict=True) if t == truth_class]
            counts = pd.Series(got, dtype=object).value_counts()
        row: dict[str, object] = {"truth_class": truth_class}
        for column in [*CLASSES, MISSED]:
            row[column] = int(counts.get(column, 0))
        row["n"] = int(sum(row[c] for c in [*CLASSES, MISSED]))  # type: ignore[misc]
        rows.append(row)
    return pd.DataFrame(rows, columns=CONFUSION_COLUMNS)


def _pooled_new(zero_division: str):
    def pooled(sums: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        counts = LesionCounts(sums["new_tp"], sums["new_fp"], sums["new_usl"], sums["new_fn"],
                              sums["truth_new"])
        return {"new_f1": counts.f1(), "new_recall": counts.recall(zero_division),
                "new_precision": counts.precision()}
    return pooled


def summarise_pairs(pairs: pd.DataFrame, *, n_boot: int, seed: int,
                    zero_division: str) -> pd.DataFrame:
    """Mean over pairs and pooled (summed counts) new-lesion scores with bootstrap intervals, over
    the pairs that were not refused (the aggregate table's columns)."""
    usable = pairs[pairs["refused"].isna()] if len(pairs) else pairs
    rows = _summary_rows(usable, NEW_METRICS, NEW_POOLING, _pooled_new(zero_division),
                         n_boot=n_boot, seed=seed, level=0.95)
    frame = pd.DataFrame(rows).reindex(columns=list(AGGREGATE_COLUMNS))
    return frame.rename(columns={"n_images": "n_pairs"})


# ------------------------------------------------------------------------------------ file side
@dataclass
class TruthIndex:
    """Truth dseg and table of every annotated image of the reference folder, by prefix."""

    dseg: dict[str, Path]
    tables: dict[str, Path]

    @classmethod
    def of(cls, ref_dir: Path) -> TruthIndex:
        dseg = {p: paths[0] for p, paths in find_by_suffix(ref_dir, TRUTH_DSEG_SUFFIX).items()}
        tables = {p: paths[0] for p, paths in find_by_suffix(ref_dir, TRUTH_STATS_SUFFIX).items()}
        return cls(dseg, tables)

    def line(self, prefix: str) -> dict[str, Path]:
        """Session label -> truth table of every session of ``prefix``'s target line."""
        key = spec.line_of(prefix)
        out = {}
        for other, path in self.tables.items():
            ses = prefix_entities(other).get("ses")
            if ses is not None and spec.line_of(other) == key:
                out[ses] = path
        return out


def _read_table(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", na_values=[NA], keep_default_na=False)


@dataclass
class PairEvaluation:
    row: dict[str, object]
    lesions: list[dict[str, object]] = field(default_factory=list)
    truth: list[str] = field(default_factory=list)
    predicted: list[str] = field(default_factory=list)
    no_truth: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def evaluate_change(out_dir: Path, change: ChangeOutputs, truth: TruthIndex,
                    settings: EvaluationSettings) -> PairEvaluation | None:
    """Evaluate one pair; None when the truth of either session is missing."""
    earlier, later = change.earlier_prefix, change.prefix
    ses_e, ses_l = change.earlier_session, change.session
    if earlier is None or ses_l is None or later not in truth.dseg or earlier not in truth.dseg:
        return None
    line = truth.line(later)
    if ses_e not in line or ses_l not in line:
        return None
    tables = {ses: _read_table(path) for ses, path in line.items()}
    classes = truth_classes(tables, ses_e, ses_l, sorted(line, key=natural_key))
    identity = {"participant_id": f"sub-{change.participant}", "earlier": earlier, "later": later,
                "session_from": f"ses-{ses_e}", "session_to": f"ses-{ses_l}"}
    row: dict[str, object] = {**identity, "refused": change.refused,
                              "alignment_quality": change.summary.get("AlignmentQuality")}
    for c in CLASSES:
        row[f"truth_{c}"] = sum(v == c for v in classes.values())
    result = PairEvaluation(row)
    if change.refused:
        return result

    warnings = result.warnings
    change_img = load_volume(change.path("change_dseg"))
    codes = np.rint(np.nan_to_num(change_img.data)).astype(np.int64)
    truth_l, _ = on_prediction_grid(truth.dseg[later], change_img, "truth dseg", later, warnings)
    truth_l = np.rint(np.nan_to_num(np.asarray(truth_l))).astype(np.int64)
    conn = settings.connectivity

    # 1. new lesions: predicted new components vs truth lesions new at L (the paper's matching)
    new_ids = [t for t, c in classes.items() if c == NEW]
    pred_labels, n_pred = label_components(codes == spec.CHANGE_CODES[NEW], conn)
    gt_labels, n_gt = label_components(np.isin(truth_l, new_ids), conn)
    match = match_lesions(pred_labels, n_pred, gt_labels, n_gt, criterion=settings.criterion,
                          threshold=settings.threshold)
    counts = match.counts
    row.update({"pred_new": n_pred, "new_tp": counts.tp, "new_fp": counts.fp,
                "new_usl": counts.usl, "new_fn": counts.fn, "new_f1": counts.f1(),
                "new_recall": counts.recall(settings.zero_division),
                "new_precision": counts.precision()})
    for c in CLASSES[1:]:
        row[f"pred_{c}"] = change.summary.get(c.capitalize())

    # 2. classes of the truth lesions present at L: the change-map component overlapping most
    comp_labels, n_comp, comp_class = component_classes(
        codes, conn, [spec.CHANGE_CODES[c] for c in PRESENT_AT_LATER])
    at_later = [t for t, c in classes.items() if c != DISAPPEARED]
    matched_l = match_truth(truth_l, at_later, comp_labels, n_comp)
    cl_everywhere = [t for t in classes]  # every truth CL id of the pair
    on_truth = match_truth(truth_l, cl_everywhere, comp_labels, n_comp).predicted_on_truth
    result.no_truth += [comp_class[i - 1] for i in range(1, n_comp + 1) if i not in on_truth]

    # 3. the earlier session: its predicted lesions (ids of its lesion table) and their class
    earlier_pred = earlier_classes(out_dir, change, earlier, warnings, conn)
    e_class: dict[int, str] = {}
    matched_e = None
    if earlier_pred is not None:
        e_volume, e_labels, e_class = earlier_pred
        truth_e, _ = on_prediction_grid(truth.dseg[earlier], e_volume, "truth dseg", earlier,
                                        warnings)
        truth_e = np.rint(np.nan_to_num(np.asarray(truth_e))).astype(np.int64)
        in_e = [t for t, c in classes.items() if c != NEW]
        matched_e = match_truth(truth_e, in_e, e_labels, int(e_labels.max(initial=0)))
        on_truth_e = match_truth(truth_e, cl_everywhere, e_labels,
                                 int(e_labels.max(initial=0))).predicted_on_truth
        result.no_truth += [DISAPPEARED for lesion, kind in e_class.items()
                            if kind == DISAPPEARED and lesion not in on_truth_e]

    stats = tables[ses_l].set_index(tables[ses_l]["lesion_id"].astype(int))
    for truth_id, truth_class in classes.items():
        predicted, where, overlap = MISSED, "none", 0
        if truth_class != DISAPPEARED and matched_l.partner.get(truth_id, 0):
            predicted = comp_class[matched_l.partner[truth_id] - 1]
            where, overlap = "later", matched_l.voxels[truth_id]
        elif matched_e is not None and matched_e.partner.get(truth_id, 0):
            kind = e_class.get(matched_e.partner[truth_id], NA)
            if truth_class == DISAPPEARED or kind == DISAPPEARED:
                predicted, where, overlap = kind, "earlier", matched_e.voxels[truth_id]
        result.truth.append(truth_class)
        result.predicted.append(predicted)
        result.lesions.append({**identity, "truth_id": truth_id,
                               "type": str(stats["type"].get(truth_id, NA))
                               if "type" in stats else NA,
                               "truth_class": truth_class, "predicted_class": predicted,
                               "matched_in": where, "overlap_voxels": overlap})
    agree = sum(t == p for t, p in zip(result.truth, result.predicted, strict=True))
    row["class_agreement"] = agree / len(result.truth) if result.truth else np.nan
    return result


def _earlier_mask(out_dir: Path, change: ChangeOutputs, earlier: str) -> Path:
    anat = Path(out_dir) / spec.anat_dir(change.participant, change.earlier_session)
    return anat / spec.output_name(earlier, "lesion_mask")


def earlier_classes(out_dir: Path, change: ChangeOutputs, earlier: str, warnings: list[str],
                    connectivity: int) -> tuple[Volume, np.ndarray, dict[int, str]] | None:
    """The earlier session's predicted mask, its lesions labelled as its lesion table numbers them
    (the connectivity of its summary), and the change-table class of each (``lesion_id_before``)."""
    mask_path = _earlier_mask(out_dir, change, earlier)
    if not mask_path.is_file():
        warnings.append(f"{earlier}: no predicted mask, disappeared lesions not evaluated")
        return None
    summary = read_json(mask_path.parent / spec.output_name(earlier, "summary")) or {}
    own = int(summary.get("Connectivity") or connectivity)
    volume = load_volume(mask_path)
    labels, _ = label_components(volume.data > 0, own)
    table = change.table()
    kinds: dict[int, str] = {}
    if len(table):
        ids = pd.to_numeric(table["lesion_id_before"], errors="coerce")
        for lesion, kind in zip(ids, table["change"].astype(str), strict=True):
            if np.isfinite(lesion):
                kinds.setdefault(int(lesion), kind)
    return volume, labels, kinds


def evaluate_longitudinal(out_dir: Path, ref_dir: Path, settings: EvaluationSettings,
                          participants: Sequence[str] | None = None
                          ) -> tuple[list[PairEvaluation], int, list[str]]:
    """Every pair with a change summary and truth: (evaluations, pairs found, warnings)."""
    truth = TruthIndex.of(Path(ref_dir))
    labels = list(participants) if participants else output_participants(Path(out_dir))
    found, results, warnings = 0, [], []
    for label in labels:
        for change in collect_changes(Path(out_dir), label):
            found += 1
            result = evaluate_change(Path(out_dir), change, truth, settings)
            if result is None:
                warnings.append(f"{change.prefix} (from ses-{change.earlier_session}): no truth for "
                                "both sessions; not evaluated")
                continue
            warnings += result.warnings
            results.append(result)
    return results, found, warnings


def tables_of(results: Sequence[PairEvaluation]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(pairs, confusion over the pairs that were not refused, per-lesion rows)."""
    pairs = pd.DataFrame([r.row for r in results], columns=PAIR_COLUMNS)
    usable = [r for r in results if not r.row.get("refused")]
    confusion = confusion_table([t for r in usable for t in r.truth],
                                [p for r in usable for p in r.predicted],
                                [n for r in usable for n in r.no_truth])
    lesions = pd.DataFrame([x for r in usable for x in r.lesions], columns=LESION_COLUMNS)
    return pairs, confusion, lesions
