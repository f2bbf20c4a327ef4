"""Approximations and scale.

Monte-Carlo factors, curvature sub-sampling, parameter groups (block-diagonal GGN)
and data sets of many batches.
"""
