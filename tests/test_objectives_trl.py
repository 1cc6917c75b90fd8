"""Every preference objective equals TRL's (the pinned version in the dev extra) on the same pairs and
weights: the loss, the logged metrics and the gradient of every trainable tensor, to 1e-5 relative,
fp32. See tests/trl_oracle.py for how each side is computed."""

from __future__ import annotations

import pytest

from trl_oracle import assert_matches, kto_examples, lora_start, ours, reward_head, trl_dpo, trl_kto, trl_pairwise, trl_reward

DPO_METRICS = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "entropy",
    "mean_token_accuracy",
]
DPO_CASES = {
    "sigmoid": {},
    "hinge": {"loss_type": "hinge"},
    "ipo": {"loss_type": "ipo"},
    "robust": {"loss_type": "robust", "label_smoothing": 0.1},
    "sigmoid-beta": {"beta": 0.5},
}


@pytest.fixture(scope="module")
def lora():
    return lora_start()


@pytest.mark.parametrize("case", DPO_CASES)
def test_dpo_with_the_adapter_off_as_reference_equals_trl(case, lora, tmp_path):
    options = DPO_CASES[case]
    theirs = trl_dpo(tmp_path, {k: ([v] if k == "loss_type" else v) for k, v in options.items()}, lora)
    mine = ours({"name": "dpo", **options}, lora)
    assert_matches(mine, theirs, DPO_METRICS)


@pytest.mark.parametrize("case", ["sigmoid", "ipo"])
def test_dpo_of_a_full_model_against_an_explicit_reference_equals_trl(case, tmp_path):
    options = DPO_CASES[case]
    theirs = trl_dpo(tmp_path, {k: ([v] if k == "loss_type" else v) for k, v in options.items()}, lora=None)
    mine = ours({"name": "dpo", **options}, lora=None)
    assert_matches(mine, theirs, DPO_METRICS)


@pytest.mark.parametrize("packing", [True, False], ids=["padding-free", "padded"])
def test_pairs_split_across_forwards_or_padded_give_the_same_loss_and_gradients(packing, lora):
    """Chosen and rejected of each pair stay in one forward; how pairs group into forwards, and
    padding instead of padding-free packing, change nothing."""
    whole = ours({"name": "dpo"}, lora)
    split = ours({"name": "dpo"}, lora, packing=packing, max_tokens=24)
    assert split["forwards"] > 1
    assert_matches(split, whole, DPO_METRICS)


PAIR_METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "nll_loss"]
# (tunelab objective options, TRL trainer, TRL config options)
PAIRWISE_CASES = {
    "cpo-sigmoid": ({"name": "cpo"}, "cpo", {}),
    "cpo-sigmoid-smoothed": ({"name": "cpo", "label_smoothing": 0.2, "cpo_alpha": 0.5}, "cpo", {"label_smoothing": 0.2, "cpo_alpha": 0.5}),
    "cpo-hinge": ({"name": "cpo", "loss_type": "hinge"}, "cpo", {"loss_type": "hinge"}),
    "cpo-ipo": ({"name": "cpo", "loss_type": "ipo"}, "cpo", {"loss_type": "ipo"}),
    "simpo": ({"name": "simpo"}, "cpo", {"loss_type": "simpo"}),
    "simpo-pure": ({"name": "simpo", "beta": 2.0, "gamma": 1.0, "cpo_alpha": 0.0}, "cpo", {"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 1.0, "cpo_alpha": 0.0}),
    "orpo": ({"name": "orpo"}, "orpo", {}),
    "orpo-beta": ({"name": "orpo", "beta": 0.5}, "orpo", {"beta": 0.5}),
}


@pytest.mark.parametrize("case", PAIRWISE_CASES)
def test_reference_free_pairwise_objectives_equal_trl(case, tmp_path):
    """CPO and SimPO against TRL's CPOTrainer, ORPO against its ORPOTrainer. (TRL's logits/* metrics
    average over every position of the padded batch, prompt and padding included; tunelab's over
    the completion tokens, as for DPO: they are not compared.)"""
    ours_options, trainer, trl_options = PAIRWISE_CASES[case]
    theirs = trl_pairwise(tmp_path, trainer, trl_options)
    mine = ours(ours_options, lora=None)
    metrics = PAIR_METRICS + (["log_odds_ratio", "log_odds_chosen"] if trainer == "orpo" else [])
    assert_matches(mine, theirs, metrics)


KTO_METRICS = ["kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "entropy"]
KTO_CASES = {
    "kto": {},
    "kto-weighted": {"desirable_weight": 1.33, "undesirable_weight": 0.7},
    "apo-zero-unpaired": {"loss_type": "apo_zero_unpaired"},
}


@pytest.mark.parametrize("case", KTO_CASES)
@pytest.mark.parametrize("setting", ["adapter-off", "explicit-reference"])
def test_kto_equals_trl(case, setting, lora, tmp_path):
    """KTO's KL point from the micro-batch's mismatched pairs (each prompt with the previous
    example's completion), as TRL builds them. With the explicit reference the point is positive;
    with the adapter switched off it is clamped at 0 (both branches covered)."""
    options = KTO_CASES[case]
    start = lora if setting == "adapter-off" else None
    theirs = trl_kto(tmp_path, options, start)
    mine = ours({"name": "kto", **options}, start, samples=kto_examples())
    if case == "kto":
        assert (mine["metrics"]["kl"] > 0) == (setting == "explicit-reference")
    assert_matches(mine, theirs, KTO_METRICS)


@pytest.mark.parametrize("options", [{}, {"center_rewards_coefficient": 0.01}], ids=["plain", "centered"])
def test_reward_model_equals_trl(options, tmp_path):
    """The head on each sequence's last token, the Bradley-Terry loss (and the centering term):
    TRL's RewardTrainer on LlamaForSequenceClassification with the same backbone and head."""
    head = reward_head()
    theirs = trl_reward(tmp_path, options, head)
    mine = ours({"name": "reward", **options}, lora=None, objective_state=head)
    # TRL's embedding gradient comes only through the inputs, as ours (the tied output head is unused).
    assert_matches(mine, theirs, ["accuracy", "margin", "mean_reward"])
