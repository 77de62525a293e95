"""Provisioning of what the layers need before they start: a model and an engine."""
