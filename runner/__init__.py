"""infra: a node-side runner for protein-fitness machine learning experiments."""

__version__ = "0.1.0"
