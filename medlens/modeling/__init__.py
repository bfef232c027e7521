"""Backbone registry and the Classifier network."""
