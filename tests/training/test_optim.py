import pytest
import torch
from training_fixtures import tiny_model

from xatl.training.optim import LRSchedule, build_optimizer, parameter_groups, set_learning_rates


def test_warmup_then_cosine_to_the_floor():
    schedule = LRSchedule(lr=1.0, total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert [schedule.factor(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert schedule.factor(9) == pytest.approx(1.0) and schedule.factor(10) == pytest.approx(1.0)
    assert schedule.factor(60) == pytest.approx(0.55)  # halfway down the cosine
    assert schedule.factor(110) == pytest.approx(0.1) and schedule.factor(500) == pytest.approx(0.1)
    decay = [schedule.factor(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_groups_split_by_role_and_decay_only_matrices():
    model = tiny_model()
    transferred = {"model.embed_tokens.weight", "model.norm.weight", "model.layers.0.mlp.up_proj.weight"}
    groups = parameter_groups(model, transferred, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    by_key = {(g["role"], g["weight_decay"]): {names[id(p)] for p in g["params"]} for g in groups}
    assert by_key[("transferred", 0.1)] == {"model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"}
    assert by_key[("transferred", 0.0)] == {"model.norm.weight"}
    assert all("norm" in n for n in by_key[("new", 0.0)])
    assert sum(len(v) for v in by_key.values()) == len(list(model.parameters()))


def test_transferred_weights_get_their_scale_and_their_own_warmup_after_unfreezing():
    model = tiny_model()
    optimizer = build_optimizer(model, {"model.norm.weight"}, lr=1.0, weight_decay=0.1, betas=(0.9, 0.95))
    schedule = LRSchedule(lr=1.0, total_steps=1000)

    def rates(step, **kwargs):
        set_learning_rates(optimizer, schedule, step, transferred_lr_scale=0.5, **kwargs)
        return {g["role"]: g["lr"] for g in optimizer.param_groups}

    assert rates(5, unfreeze_step=None)["transferred"] == 0.0  # frozen
    base = schedule.factor(5)
    assert rates(5, unfreeze_step=0) == pytest.approx({"new": base, "transferred": 0.5 * base})
    ramp = [rates(s, unfreeze_step=100, unfreeze_warmup_steps=4)["transferred"] / (0.5 * schedule.factor(s))
            for s in range(100, 106)]
    assert ramp == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_frozen_parameters_are_not_decayed_or_moved():
    model = tiny_model()
    frozen = "model.norm.weight"
    optimizer = build_optimizer(model, {frozen}, lr=0.1, weight_decay=0.5, betas=(0.9, 0.95))
    model.get_parameter(frozen).requires_grad_(False)
    before = model.get_parameter(frozen).detach().clone()
    model(input_ids=torch.tensor([[3, 4, 5]]), labels=torch.tensor([[3, 4, 5]])).loss.backward()
    optimizer.step()
    assert torch.equal(model.get_parameter(frozen), before)
