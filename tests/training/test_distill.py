import pytest
import torch
from training_fixtures import corpus_blocks, parameters, tiny_model

from xatl.training import TrainConfig, train
from xatl.training.distill import hidden_alignment, kl_divergence, parse_distill


def test_kl_matches_its_definition_and_scales_with_temperature():
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 7, generator=gen), torch.randn(2, 3, 7, generator=gen)
    for tau in (1.0, 2.0):
        p = (teacher / tau).softmax(-1)
        expected = (p * (p.log() - (student / tau).log_softmax(-1))).sum(-1).mean() * tau**2
        torch.testing.assert_close(kl_divergence(student, teacher, tau), expected)
    assert kl_divergence(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)


def test_parse_distill():
    assert parse_distill("kl, hidden") == ("kl", "hidden")
    assert parse_distill("") == () and parse_distill(None) == ()
    with pytest.raises(ValueError, match="unknown kind"):
        parse_distill("kl,logits")


def _teacher_and_student():
    teacher = tiny_model(("attention", "attention"), seed=1).eval()
    student = tiny_model(("mamba2", "attention"), seed=2)
    # a hybrid transfer: the skeleton and the kept attention layer (1) come from the teacher
    shared = {n: t for n, t in teacher.state_dict().items() if not n.startswith("model.layers.0.mixer.")}
    student.load_state_dict(shared, strict=False)
    return teacher, student


def test_hidden_alignment_is_zero_for_the_teacher_itself_and_trains_only_the_student():
    teacher, student = _teacher_and_student()
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(12)[None].expand(2, -1)
    with torch.no_grad():
        hidden = teacher(input_ids=ids, output_hidden_states=True).hidden_states
    assert hidden_alignment(teacher, hidden, positions).item() == pytest.approx(0.0, abs=1e-10)

    loss = hidden_alignment(student, hidden, positions)
    assert loss.item() > 1e-3
    loss.backward()
    mixer_grad = student.model.layers[0].mixer.out_proj.weight.grad
    assert mixer_grad is not None and mixer_grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    # layer 1 is attention in both, fed the teacher's own input: it reproduces its output exactly
    per_layer = []
    for i, layer in enumerate(student.model.layers):
        out, _ = layer(hidden[i], position_ids=positions)
        per_layer.append(((out - hidden[i + 1]).square().sum() / hidden[i + 1].square().sum()).item())
    assert per_layer[1] == pytest.approx(0.0, abs=1e-10) and per_layer[0] > 0
    assert loss.item() == pytest.approx(sum(per_layer) / 2, rel=1e-5)


def test_hidden_alignment_needs_the_same_depth():
    teacher, _ = _teacher_and_student()
    student = tiny_model(("attention",) * 3)
    ids = torch.randint(3, 300, (1, 8))
    with torch.no_grad():
        hidden = teacher(input_ids=ids, output_hidden_states=True).hidden_states
    with pytest.raises(ValueError, match="teacher gives 2 layers"):
        hidden_alignment(student, hidden, torch.arange(8)[None])


def test_distillation_pulls_the_student_to_the_teacher_and_leaves_the_teacher_alone(tokenizer):
    blocks = corpus_blocks(tokenizer)
    batch = torch.stack(blocks[:8])
    positions = torch.arange(batch.shape[1])[None].expand_as(batch)

    def distance_to_teacher(distill):
        teacher, student = _teacher_and_student()
        teacher_before = parameters(teacher)
        events = []
        config = TrainConfig(max_steps=8, batch_size=4, lr=1e-2, distill=distill, kl_weight=0.9, temperature=2.0)
        train(student, blocks, config, teacher=teacher if distill else None, on_step=events.append)
        assert all(torch.equal(teacher_before[n], p) for n, p in teacher.named_parameters())
        with torch.no_grad():
            target = teacher(input_ids=batch, output_hidden_states=True)
            kl = kl_divergence(student(input_ids=batch).logits, target.logits).item()
            hidden = hidden_alignment(student, target.hidden_states, positions).item()
        return kl, hidden, [e for e in events if e["event"] == "train"]

    plain_kl, plain_hidden, _ = distance_to_teacher("")
    kl, hidden, steps = distance_to_teacher("kl,hidden")
    assert kl < 0.5 * plain_kl and hidden < plain_hidden
    first = steps[0]
    assert {"lm_loss", "kl_loss", "hidden_loss", "loss"} <= set(first)
    combined = 0.1 * first["lm_loss"] + 0.9 * first["kl_loss"] + first["hidden_loss"]
    assert first["loss"] == pytest.approx(combined, rel=1e-5)
