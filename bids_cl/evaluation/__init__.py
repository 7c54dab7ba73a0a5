"""bids_cl.evaluation."""
