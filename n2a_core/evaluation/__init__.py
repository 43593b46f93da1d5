"""Judging a trained generator: feature extractors, the metrics on their features, `n2a eval`."""
