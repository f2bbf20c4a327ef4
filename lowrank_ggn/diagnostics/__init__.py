"""What the curvature means.

Per-component gradient moments, directional derivatives along eigenvectors, and the
audit of the structural assumptions behind them.
"""
