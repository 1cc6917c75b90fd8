"""The objective registry: every training objective, by the name used in `objective.name`.

A static table, imported lazily (tunelab/registry.py): the config validates an objective's options
without loading any other objective. Adding one: a module in this folder and its line here.
"""

from __future__ import annotations

from tunelab.registry import LazyRegistry

# objective name -> "module:Class", the module under tunelab.objectives.
OBJECTIVES = {
    "sft": "sft:Sft",
    "pretrain": "sft:Pretrain",
    "dpo": "dpo:Dpo",
    "cpo": "cpo:Cpo",
    "simpo": "cpo:Simpo",
    "orpo": "orpo:Orpo",
    "kto": "kto:Kto",
    "reward": "reward:Reward",
    "grpo": "grpo:Grpo",
    "raft": "raft:Raft",
    "distill": "distill:Distill",
}
REGISTRY = LazyRegistry("objective", "tunelab.objectives", OBJECTIVES)


def objective_names() -> list[str]:
    return REGISTRY.names()


def get_objective_class(name: str):
    return REGISTRY.get(name)


def objective_options_model(name: str):
    return get_objective_class(name).Options


def build_objective(options):
    return get_objective_class(options.name)(options)
