"""bids_cl.preproc."""
