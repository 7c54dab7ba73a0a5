"""Preprocessing as plain functions: skull stripping, templates, registration (nibabel/antspyx).

Heavy libraries (torch, deepbet, antspyx, nilearn, templateflow) are imported inside the functions that
need them, so importing this package stays cheap.
"""

from bids_cl.preproc.registration import (
    RegistrationResult,
    apply_to_template,
    points_to_template,
    register_to_template,
)
from bids_cl.preproc.skullstrip import STRATEGIES, SkullStripResult, check_stripped, skull_strip
from bids_cl.preproc.templates import TemplateFiles, check_templates, get_template

__all__ = [
    "STRATEGIES",
    "RegistrationResult",
    "SkullStripResult",
    "TemplateFiles",
    "apply_to_template",
    "check_stripped",
    "check_templates",
    "get_template",
    "points_to_template",
    "register_to_template",
    "skull_strip",
]
