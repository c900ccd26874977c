"""Recipes: pruning stages run in order to a target fraction of all parameters.

``spec.py`` parses and validates a recipe (a YAML file, or a built-in: ``flab.yaml``,
``shortgpt.yaml`` in this folder) before any work; ``runner.py`` runs its stages.
A single ``--method`` is a one-stage recipe. See docs/recipes.md.
"""
