"""Unstructured and N:M methods: they zero weights inside unchanged shapes (``Produces.MASKS``).

magnitude.py (|W|), wanda.py (|W| * ||X||), sparsegpt.py (OBS weight update), masks.py (the
pure mask functions), base.py (``PruneConfig``, ``UnstructuredMethod``, the driver).
"""
