"""Ablation configs for `python -m experiments.ablate`; see base.py."""
