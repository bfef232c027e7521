"""Evaluation reports, comparisons and the figures they share."""
