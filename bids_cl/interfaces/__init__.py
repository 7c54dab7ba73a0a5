"""bids_cl.interfaces."""
