"""bids_cl.cli."""
