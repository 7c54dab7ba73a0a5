"""Generation time of the phantoms per participant (bids_cl-synth), for docs/phantoms.md.

    python benchmarks/synth.py [--sizes tiny full] [--participants 2]
    python benchmarks/synth.py --figure docs/img/phantom.png     # the picture of docs/phantoms.md
    python benchmarks/synth.py --contrast                        # lesion contrast per type

One session of one MP2RAGE acquisition (INV1, INV2, UNI + truth) per participant, written to a
temporary folder. The template anatomy is built once per process and timed on its own. Prints wall
and CPU seconds: on a shared machine the CPU time is the fairer figure.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bids_cl.synth.anatomy import load_template_anatomy
from bids_cl.synth.generate import SynthOptions, plan_participants, simulate_subject, write_subject
from bids_cl.synth.lesions import SCALES


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = _clock()
    return wall - start[0], cpu - start[1]


def figure(path: Path, seed: int = 4) -> None:
    """Slices of generated phantoms with the truth outlined (CL red, WML cyan)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def subject(**kw):
        options = SynthOptions(participants=1, seed=seed, lesion_free_fraction=0.0, **kw)
        return simulate_subject(options, plan_participants(options)[0])

    full3 = subject(size="full", field="3T", sequence="both")
    full7 = subject(size="full", field="7T", sequence="mp2rage")
    tiny = subject(size="tiny", field="3T", sequence="both")
    panels = []  # (title, image, image phantom)
    mp2, mpr = full3.images[0], full3.images[1]
    for stem, label in ((mp2.target, "3T UNI"), (next(k for k in mp2.images if "inv-1" in k), "3T INV1"),
                        (next(k for k in mp2.images if "inv-2" in k), "3T INV2")):
        panels.append((label, mp2.images[stem], mp2))
    panels.append(("3T MPRAGE T1w", mpr.target_image, mpr))
    panels.append(("7T UNI (0.75 mm)", full7.images[0].target_image, full7.images[0]))
    panels.append(("tiny UNI (2 mm)", tiny.images[0].target_image, tiny.images[0]))
    panels.append(("tiny MPRAGE (2 mm)", tiny.images[1].target_image, tiny.images[1]))
    fig, axes = plt.subplots(2, 4, figsize=(16, 8.6), facecolor="black")
    for ax, (title, image, ph) in zip(axes.ravel(), panels, strict=False):
        cl, wml = ph.cl_mask, ph.wml_mask
        k = int(np.argmax(cl.sum(axis=(0, 1)) + 0.3 * wml.sum(axis=(0, 1))))  # axial slice, most CL
        ax.imshow(image[:, :, k].T, origin="lower", cmap="gray", vmin=0,
                  vmax=float(np.percentile(image, 99.5)), interpolation="nearest")
        for mask, colour in ((cl, "red"), (wml, "cyan")):
            if mask[:, :, k].any():
                ax.contour(mask[:, :, k].T.astype(float), [0.5], colors=colour, linewidths=0.8)
        n_cl = sum(r["label"] == "CL" for r in ph.rows)
        ax.set_title(f"{title}  (slice {k}, {n_cl} CL in volume)", color="white", fontsize=10)
        ax.axis("off")
    # last panel: a close-up of a cortical lesion on the 3T UNI
    ax = axes.ravel()[-1]
    ph = mp2
    row = max((r for r in ph.rows if r["label"] == "CL"), key=lambda r: r["volume_ul"])
    ijk = np.argwhere(ph.truth.dseg == row["lesion_id"])
    ci, cj, ck = np.round(ijk.mean(axis=0)).astype(int)
    half = 18
    box = (slice(max(ci - half, 0), ci + half), slice(max(cj - half, 0), cj + half), ck)
    image = ph.target_image
    ax.imshow(image[box].T, origin="lower", cmap="gray", vmin=0,
              vmax=float(np.percentile(image, 99.5)), interpolation="nearest")
    ax.contour((ph.truth.dseg[box] == row["lesion_id"]).T.astype(float), [0.5], colors="red",
               linewidths=1.0)
    ax.set_title(f"3T UNI close-up: {row['type']} CL, {row['volume_ul']:.0f} uL", color="white",
                 fontsize=10)
    ax.axis("off")
    fig.suptitle(f"bids_cl-synth phantoms (seed {seed}); truth outlined: red = cortical lesions (CL), "
                 "cyan = white-matter lesions (WML, distractors)", color="white", fontsize=12)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, facecolor="black")
    print(path)


def contrasts(sizes: list[str], participants: int) -> None:
    """Median and weakest contrast of labelled lesions vs the same tissue around them."""
    import numpy as np

    from bids_cl.synth.quality import contrast_table

    print(f"{'size':5} {'field':5} {'image':6} {'type':16} {'n':>3} {'median':>7} {'weakest':>8}")
    for size in sizes:
        for field in ("3T", "7T"):
            options = SynthOptions(participants=participants, seed=5, field=field, size=size,
                                   sequence="both", lesion_free_fraction=0.0)
            subjects = [simulate_subject(options, p) for p in plan_participants(options)]
            for (seq, kind), values in sorted(contrast_table(subjects).items()):
                v = np.array(values)
                image = "UNI" if seq == "mp2rage" else "T1w"
                print(f"{size:5} {field:5} {image:6} {kind:16} {len(v):3d} {np.nanmedian(v):+7.0%} "
                      f"{np.nanmax(v):+8.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "full"], choices=["tiny", "full"])
    parser.add_argument("--participants", type=int, default=2)
    parser.add_argument("--figure", type=Path, default=None, help="write the picture and stop")
    parser.add_argument("--contrast", action="store_true", help="print lesion contrasts and stop")
    args = parser.parse_args()
    if args.figure is not None:
        figure(args.figure)
        return
    if args.contrast:
        contrasts(args.sizes, args.participants)
        return
    print(f"{'size':5} {'field':5} {'grid':>15} {'voxels':>9} {'wall s':>7} {'cpu s':>7}  (per participant)")
    for size in args.sizes:
        start = _clock()
        load_template_anatomy(SCALES[size].template_resolution)
        load_template_anatomy(2)  # lesion placement always uses the 2 mm maps
        wall, cpu = _since(start)
        print(f"{size:5} {'-':5} {'template (once)':>15} {'':>9} {wall:7.1f} {cpu:7.1f}")
        for field in ("3T", "7T"):
            options = SynthOptions(participants=args.participants, seed=1, field=field, size=size,
                                   lesion_free_fraction=0.0)
            walls, cpus, shape = [], [], None
            with tempfile.TemporaryDirectory() as tmp:
                for person in plan_participants(options):
                    start = _clock()
                    subject = simulate_subject(options, person)
                    write_subject(Path(tmp), subject, options)
                    wall, cpu = _since(start)
                    walls.append(wall)
                    cpus.append(cpu)
                    shape = subject.images[0].target_image.shape
            grid = "x".join(map(str, shape))
            voxels = shape[0] * shape[1] * shape[2]
            print(f"{size:5} {field:5} {grid:>15} {voxels:9d} {sum(walls) / len(walls):7.1f} "
                  f"{sum(cpus) / len(cpus):7.1f}")


if __name__ == "__main__":
    main()
