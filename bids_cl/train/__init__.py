"""bids_cl.train."""
