"""bids_cl.group: the group level (tables, statistics, plots, frequency maps, group.html)."""

from bids_cl.group.run import GroupResult, run_group_level

__all__ = ["GroupResult", "run_group_level"]
