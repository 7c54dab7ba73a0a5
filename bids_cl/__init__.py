"""bids_cl: a BIDS-App that segments and measures cortical lesions in multiple sclerosis."""

from bids_cl._version import __version__

__all__ = ["__version__"]
