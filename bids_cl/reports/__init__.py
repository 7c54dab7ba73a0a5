"""bids_cl.reports: participant HTML reports built from the derivatives alone."""

from bids_cl.reports.participant import generate_participant_report, generate_reports

__all__ = ["generate_participant_report", "generate_reports"]
