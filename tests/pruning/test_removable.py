"""The held-out deletion test: the nested sets, the stop rule, what it marks can go at once."""

import copy
import re

import pytest
import torch

from anrat.errors import InputError
from pruning.prune import wrong_outcomes
from pruning.removable import removable_set
from tests.pruning.synthetic_data import make_split, trained_mlp


@pytest.fixture(scope="module")
def trained():
    held_out = make_split(4000, 1)
    model = trained_mlp(make_split(4000, 0), None, hidden=32, epochs=10)
    return model.eval(), held_out


def test_the_largest_set_shown_removable_can_go_at_once(trained):
    model, held_out = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = {name: p.detach().abs() for name, p in model.named_parameters() if name.endswith("weight")}
    result = removable_set(model, scores, held_out, margin=0.01)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is not changed
    # a fixed sequence, smallest first, stopping at the first set not shown within the margin
    fractions = [t["fraction"] for t in result.tests]
    assert fractions == sorted(fractions) and fractions[0] == 0.05
    assert all(t["accepted"] for t in result.tests[:-1])
    assert result.tests[-1]["accepted"] == (fractions[-1] == 0.95)
    # most of this network is redundant (7 of 10 inputs carry nothing), and the set is the smallest |w|
    assert 0.5 <= result.fraction < 1
    removed = torch.cat([m.flatten() for m in result.masks.values()])
    assert removed.float().mean() == pytest.approx(result.fraction, abs=1e-3)
    kept_min = min(float(scores[n][~m].min()) for n, m in result.masks.items() if (~m).any())
    removed_max = max(float(scores[n][m].max()) for n, m in result.masks.items() if m.any())
    assert removed_max <= kept_min
    # zeroed together they cost less than the margin on those images; the next set cost more
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for name, mask in result.masks.items():
            dict(pruned.named_parameters())[name].mul_(~mask)
    rise = float(wrong_outcomes(pruned, held_out).float().mean() - wrong_outcomes(model, held_out).float().mean())
    assert rise < 0.01
    if not result.tests[-1]["accepted"]:
        assert result.tests[-1]["upper"] >= 0.01


def test_nothing_is_removable_when_even_the_first_set_costs_too_much(trained):
    model, held_out = trained
    # ranked backwards, the first 5% are the largest weights: removing them is far from harmless
    scores = {name: -p.detach().abs() for name, p in model.named_parameters() if name.endswith("weight")}
    result = removable_set(model, scores, held_out, margin=0.002)
    assert result.fraction == 0.0 and len(result.tests) == 1 and not result.tests[0]["accepted"]
    assert not any(m.any() for m in result.masks.values())
    assert "removable at once: 0% of the weights" in result.line()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"grid": [0.5, 0.2]}, "grid must be increasing fractions"),
        ({"grid": [0.0, 0.5]}, "grid must be increasing fractions"),
        ({"grid": []}, "grid must be increasing fractions"),
        ({"margin": 0.0}, "margin (tolerance) must be in (0, 1)"),
        ({"alpha": 1.5}, "acceptance level alpha must be in (0, 1)"),
    ],
)
def test_bad_options_are_refused(trained, options, message):
    model, held_out = trained
    scores = {"fc1.weight": model.fc1.weight.detach().abs()}
    with pytest.raises(InputError, match=re.escape(message)):
        removable_set(model, scores, held_out, **options)


def test_scores_for_a_parameter_the_model_lacks_are_refused(trained):
    model, held_out = trained
    with pytest.raises(InputError, match="'conv9.weight', which is not a parameter"):
        removable_set(model, {"conv9.weight": torch.ones(3)}, held_out)
