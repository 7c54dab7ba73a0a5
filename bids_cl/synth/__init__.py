"""bids_cl.synth."""
