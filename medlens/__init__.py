"""MedLens: calibrated, explainable, honestly evaluated medical image classifiers."""

__version__ = "0.1.0"
