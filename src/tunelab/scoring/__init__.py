"""Checks of generated text against known answers (answers.py), a sandbox for model-written code
(sandbox.py), and the reward functions built on them (rewards.py): used by eval and by the
objectives that learn from verifiable rewards."""
