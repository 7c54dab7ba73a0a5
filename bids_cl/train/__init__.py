"""bids_cl.train: nnU-Net training path (``bids_cl-train``) and the demo-model recipe.

Importing this package is cheap; nnU-Net and torch are imported by the submodules that need them.
"""
