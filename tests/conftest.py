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


@pytest.fixture(scope="module")
def records(module_cache, tmp_path_factory):
    """(train.jsonl, eval.jsonl): 8 and 2 rows of the record-extraction task (a module may define its own)."""
    from helpers import write_records_data

    return write_records_data(tmp_path_factory.mktemp("records"), n_train=8, n_eval=2, seed=0)


@pytest.fixture(scope="module")
def tiny_run(module_cache, tmp_path_factory, records):
    """A finished 2-step LoRA run of the tiny model on `records`, for the commands that read runs."""
    import tunelab
    from helpers import tiny_run_config

    train_file, eval_file = records
    config = tiny_run_config(tmp_path_factory.mktemp("tiny-run") / "run", train_file, eval_file, train={"max_steps": 2, "lr": 1e-2})
    return tunelab.train(config).output_dir
