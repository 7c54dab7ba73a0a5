"""bids_cl.engine."""
