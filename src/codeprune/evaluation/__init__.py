"""Evaluation of one model: held-out perplexity (``perplexity``), HumanEval pass@k run in a
sandbox (``humaneval``, ``sandbox``, ``passk``), and efficiency (``efficiency``: size, MACs,
speed, memory, energy)."""
