"""Calibration and evaluation data: sources of documents, held-out split, token windows."""

from codeprune.data.calibration import TokenWindows, calibration_windows, heldout_windows, split_documents
from codeprune.data.sources import LANGUAGES, Corpus, Document, read_source

__all__ = ["LANGUAGES", "Corpus", "Document", "TokenWindows", "calibration_windows",
           "heldout_windows", "read_source", "split_documents"]
