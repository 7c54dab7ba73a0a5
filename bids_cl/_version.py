"""The one place the bids_cl version lives (read by pyproject.toml and at run time)."""

__version__ = "0.1.0"
