"""Evaluation: sample-quality metrics and the feature extractors they run on."""
