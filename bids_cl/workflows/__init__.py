"""bids_cl.workflows."""
