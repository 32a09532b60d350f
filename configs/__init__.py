"""Experiment configs: one `get_config(arg)` per file; see base.py."""
