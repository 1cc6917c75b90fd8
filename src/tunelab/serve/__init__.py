"""Serving: many adapters on one base model (adapters.py); the server comes with issue 18."""
