"""Serving (`tunelab serve`): the HTTP API (app.py), the continuous-batching engine (engine.py), many adapters on one base model (adapters.py)."""
