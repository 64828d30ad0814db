"""EpiMer: curvature-aware model merging in a low-rank tagged subspace, and its baselines."""

__version__ = "0.1.0"
