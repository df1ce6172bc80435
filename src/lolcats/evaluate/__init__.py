"""Measuring a model against its teacher."""

from .perplexity import PerplexityResult, perplexity, perplexity_windows

__all__ = ["PerplexityResult", "perplexity", "perplexity_windows"]
