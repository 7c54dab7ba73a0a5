"""bids_cl's derivatives: the vocabulary (:mod:`.spec`), the records that travel between stages
(:mod:`.records`), the one writer (:mod:`.writer`) and the one reader (:mod:`.reader`).

Kept free of imports so that ``bids_cl.derivatives.spec`` and ``.records`` stay importable from every layer.
"""
