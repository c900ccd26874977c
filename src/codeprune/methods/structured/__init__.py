"""Structured methods: they remove attention heads and FFN channels (``Produces.PLAN``).

base.py      configs, ``ChannelScoreMethod`` / ``ModelScoreMethod``, layer scope, ``LayerScores``
flap.py      FLAP (fluctuation metric), Wanda-sp, magnitude-sp: channel scores
taylor.py    LLM-Pruner: Taylor importance of coupled structures from a gradient pass
units.py     heads, GQA units and their parameter weights; one layer's plan
search.py    how many units each layer loses: uniform or adaptive (global) structure
plan.py      ``StructurePlan``: what each layer keeps, and the parameter count it leads to
surgery.py   the only code that slices heads and FFN channels and rewrites the config for them
prune.py     the driver: score, search, plan, cut
"""
