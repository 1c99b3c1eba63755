"""Pruned, adversarially robust networks: one trial (study.pipeline) and the distributed study (study.runner)."""

__version__ = "0.1.0"
