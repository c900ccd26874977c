"""Running models for the methods: this layer places models, layers and activations on devices.

engine.py      sequential calibration, one decoder layer at a time (optionally offloaded)
gradients.py   the whole-model gradient pass (LLM-Pruner)
stats.py       streaming input statistics (||X||, mean, variance; X^T X)
devices.py     ``resolve_device``, ``place_model``
"""
