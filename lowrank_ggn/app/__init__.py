"""The command-line main job and what it needs.

Digits data, a model zoo, a training loop, plots and the text report.
"""
