"""bids_cl.group."""
