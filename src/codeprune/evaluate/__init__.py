"""Evaluation: perplexity (more to come: pass@k, efficiency, mask similarity)."""

from .perplexity import perplexity, protocol

__all__ = ["perplexity", "protocol"]
