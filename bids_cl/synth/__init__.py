"""Phantom BIDS datasets of MS brains with cortical-lesion ground truth (``bids_cl-synth``).

Python API::

    from bids_cl.synth import generate_dataset
    root = generate_dataset("/tmp/phantoms", participants=2, sessions=2, seed=0, size="tiny")

Lower level (in memory, no files): ``SynthOptions``, ``plan_participants``, ``simulate_subject``
(-> ``SubjectPhantom`` with one ``ImagePhantom`` per segmentation target) and ``write_subject``.
See docs/phantoms.md.
"""

from bids_cl.synth.errors import SynthError
from bids_cl.synth.generate import (
    ImagePhantom,
    Participant,
    SubjectPhantom,
    SynthOptions,
    generate_dataset,
    plan_participants,
    simulate_subject,
    write_dataset,
    write_subject,
)
from bids_cl.synth.lesions import CL_TYPES, LESION_TYPES, WML_TYPES

__all__ = [
    "CL_TYPES",
    "LESION_TYPES",
    "WML_TYPES",
    "ImagePhantom",
    "Participant",
    "SubjectPhantom",
    "SynthError",
    "SynthOptions",
    "generate_dataset",
    "plan_participants",
    "simulate_subject",
    "write_dataset",
    "write_subject",
]
