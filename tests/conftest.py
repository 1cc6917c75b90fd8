"""Fixtures shared by every test module."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Point tunelab's cache (and the `datasets` library's) at a fresh temporary folder, so tests
    never read from or write to the user's cache."""
    import datasets.config

    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("TUNELAB_CACHE", str(cache / "tunelab"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache / "hf-datasets"))
    # `datasets` reads HF_DATASETS_CACHE once, at import: patch the value it already holds too.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache / "hf-datasets")
    return cache / "tunelab"


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    """`isolated_cache` for module-scoped fixtures (a trained run shared by a module's tests).

    Module-scoped fixtures are set up before the function-scoped `isolated_cache`, so without this
    they would tokenize into (and convert models into) the user's cache.
    """
    import datasets.config

    cache = tmp_path_factory.mktemp("module-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TUNELAB_CACHE", str(cache / "tunelab"))
        patch.setenv("HF_DATASETS_CACHE", str(cache / "hf-datasets"))
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", cache / "hf-datasets")
        yield cache / "tunelab"
