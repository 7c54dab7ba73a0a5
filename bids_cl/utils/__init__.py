"""bids_cl.utils."""
