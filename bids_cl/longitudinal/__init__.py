"""Lesion-level change between the sessions of one participant (issue 21; docs/longitudinal.md).

* :mod:`~bids_cl.longitudinal.pairs`: which sessions are paired (one target line, consecutive pairs and
  baseline -> last);
* :mod:`~bids_cl.longitudinal.align`: symmetric rigid alignment of two sessions (antspyx in a worker
  process, fixed seed) and resampling into their halfway space;
* :mod:`~bids_cl.longitudinal.change`: lesion matching and change classes (pure numpy/pandas);
* :mod:`~bids_cl.longitudinal.pair`: one pair from files to a table, a map and a summary (in memory;
  the one writer writes them).
"""
