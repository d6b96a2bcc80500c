import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from distilflow.errors import DistilflowError
from distilflow.params import DistillParams, params_from_dict
from tasks.inference import TorchPredictor
from tasks.kd import HintLoss, distill, kd_loss, make_student, soft_target_loss, train_without_kd
from tasks.models import builtin_classifier, count_parameters

torch.set_num_threads(1)


def _softmax(row):
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def test_kd_loss_matches_the_formula_computed_by_hand():
    student = [[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]]
    teacher = [[2.0, 1.0, 0.0], [0.0, 0.0, 4.0]]
    labels = [1, 2]
    T, alpha = 2.0, 0.3
    kl = ce = 0.0
    for s, t, y in zip(student, teacher, labels):
        p_t = _softmax([v / T for v in t])
        p_s = _softmax([v / T for v in s])
        kl += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s))
        ce += -math.log(_softmax(s)[y])
    expected = T**2 * kl / 2 + alpha * ce / 2  # batchmean over 2 rows

    got = kd_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(labels), temperature=T, alpha=alpha)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_alpha_weights_the_label_term_and_zero_ignores_labels():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    y, other_y = torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([3, 3, 3, 3, 3, 3])
    ce = F.cross_entropy(s, y).item()
    # the label term enters linearly with weight alpha
    assert kd_loss(s, t, y, 3.0, alpha=1.0).item() - kd_loss(s, t, y, 3.0, alpha=0.0).item() == pytest.approx(
        ce, rel=1e-5
    )
    assert kd_loss(s, t, y, 3.0, alpha=0.5).item() == pytest.approx(
        kd_loss(s, t, y, 3.0, alpha=0.0).item() + 0.5 * ce, rel=1e-5
    )
    # alpha=0 is the soft term alone: labels do not matter, and a student equal to its teacher has nothing to learn
    assert kd_loss(s, t, y, 3.0, alpha=0.0).item() == pytest.approx(kd_loss(s, t, other_y, 3.0, alpha=0.0).item())
    assert kd_loss(t, t, y, 3.0, alpha=0.0).item() == pytest.approx(0.0, abs=1e-6)


def test_higher_temperature_softens_targets_and_t_squared_keeps_gradients_comparable():
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(16, 10, generator=g)
    teacher = teacher - teacher.mean(1, keepdim=True)
    student0 = torch.randn(16, 10, generator=g)
    student0 = student0 - student0.mean(1, keepdim=True)

    def entropy(T):
        p = F.softmax(teacher / T, dim=1)
        return -(p * p.log()).sum(1).mean().item()

    assert entropy(1.0) < entropy(4.0) < entropy(16.0) <= math.log(10) + 1e-6

    def grad_norm(T, scaled):
        s = student0.clone().requires_grad_(True)
        loss = soft_target_loss(s, teacher, T) if scaled else soft_target_loss(s, teacher, T) / T**2
        loss.backward()
        return s.grad.norm().item()

    # Hinton 2015 §2: soft-target gradients shrink as 1/T²; the T² factor undoes that
    assert 0.5 < grad_norm(4.0, True) / grad_norm(16.0, True) < 2.0
    assert grad_norm(4.0, False) / grad_norm(16.0, False) > 8.0


def test_hint_loss_is_the_mse_after_the_learned_projection():
    hint = HintLoss(2, 3)
    with torch.no_grad():
        hint.proj.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]))
        hint.proj.bias.zero_()
    s = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    t = torch.tensor([[1.0, 4.0, 3.0], [3.0, -2.0, 2.0]])  # exactly W·s
    assert hint(s, t).item() == pytest.approx(0.0, abs=1e-7)
    assert hint(s, t + 2.0).item() == pytest.approx(4.0)
    hint(s, t + 2.0).backward()
    assert hint.proj.bias.grad.abs().sum() > 0  # the projection learns with the student


def test_cached_teacher_logits_use_eval_mode_and_no_grad():
    torch.manual_seed(0)
    teacher = builtin_classifier((8, 8, 1), 64, 10, width=4, depth=2)
    teacher.train()
    teacher(torch.randn(32, 64) * 3 + 1)  # move BatchNorm running stats away from the batch stats
    X = torch.randn(20, 64)
    cached = TorchPredictor(teacher, batch_size=7).outputs(X.numpy())
    teacher.eval()
    with torch.no_grad():
        expected = teacher(X)
    assert not cached.requires_grad
    assert torch.allclose(cached, expected, atol=1e-5)


def test_teacher_blocks_student_copies_the_first_blocks_and_gets_a_new_head():
    torch.manual_seed(0)
    teacher = builtin_classifier((8, 8, 1), 64, 10, width=8, depth=3)
    student = make_student(teacher, DistillParams(student="teacher_blocks", student_depth=2))
    assert len(student.blocks) == 2 and count_parameters(student) < count_parameters(teacher)
    for sb, tb in zip(student.blocks, teacher.blocks[:2]):
        assert torch.equal(sb[0].weight, tb[0].weight)
        assert sb[0].weight.data_ptr() != tb[0].weight.data_ptr()  # a copy, not shared
    assert student.head.in_features == 16 and student.head.out_features == 10
    assert student(torch.randn(5, 64)).shape == (5, 10)
    with pytest.raises(DistilflowError, match="distill.student_depth=3"):
        make_student(teacher, DistillParams(student="teacher_blocks", student_depth=3))


def test_compact_student_is_smaller_and_seeded():
    teacher = builtin_classifier((8, 8, 1), 64, 10, width=16, depth=3)
    a = make_student(teacher, DistillParams(student_width=4, student_depth=2), seed=3)
    b = make_student(teacher, DistillParams(student_width=4, student_depth=2), seed=3)
    assert count_parameters(a) < count_parameters(teacher) / 10
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    X_tr, X_va, y_tr, y_va = train_test_split(
        d.data.astype(np.float32), d.target, test_size=0.3, random_state=0, stratify=d.target
    )
    mu, sd = X_tr.mean(0), X_tr.std(0)
    sd[sd == 0] = 1
    return (X_tr - mu) / sd, y_tr, (X_va - mu) / sd, y_va


@pytest.fixture(scope="module")
def teacher(digits):
    X_tr, y_tr, X_va, y_va = digits
    torch.manual_seed(0)
    model = builtin_classifier((8, 8, 1), 64, 10, width=16, depth=2)
    result = train_without_kd(model, X_tr, y_tr, X_va, y_va, DistillParams(epochs=6, lr=1e-2), seed=0)
    assert result.best_val_accuracy > 0.9
    return model


def test_distill_is_deterministic_for_a_seed(digits, teacher):
    X_tr, y_tr, X_va, y_va = digits
    params = DistillParams(epochs=2, student_width=4, student_depth=2, hint_weight=0.5)
    runs = [
        distill(teacher, make_student(teacher, params, seed=1), X_tr, y_tr, X_va, y_va, params, seed=5)
        for _ in range(2)
    ]
    assert [h["train_loss"] for h in runs[0].history] == [h["train_loss"] for h in runs[1].history]
    assert all(torch.equal(p, q) for p, q in zip(runs[0].model.parameters(), runs[1].model.parameters()))
    assert len(runs[0].history) == 2 and runs[0].history[0]["train_hint_loss"] > 0


def test_kd_beats_labels_only_at_a_low_label_budget(digits, teacher):
    """3 labels per class: the no-KD student sees 30 labels, the KD student also sees the teacher on every row."""
    X_tr, y_tr, X_va, y_va = digits
    params = DistillParams(epochs=8, lr=1e-2, student_width=8, student_depth=2, label_budget=3, alpha=0.1)
    kd = distill(teacher, make_student(teacher, params, seed=0), X_tr, y_tr, X_va, y_va, params, seed=0)
    no_kd = train_without_kd(make_student(teacher, params, seed=0), X_tr, y_tr, X_va, y_va, params, seed=0)
    assert kd.labelled_rows == no_kd.labelled_rows == 30
    assert kd.best_val_accuracy > no_kd.best_val_accuracy + 0.1
    # the best-validation epoch is what comes back
    acc = (kd.model(torch.as_tensor(X_va)).argmax(1).numpy() == y_va).mean()
    assert acc == pytest.approx(max(h["val_accuracy"] for h in kd.history), abs=1e-6)


@pytest.mark.parametrize(
    "key,value",
    [
        ("temperature", 0),
        ("temperature", -1.0),
        ("alpha", 1.5),
        ("alpha", -0.1),
        ("hint_weight", -1),
        ("student_depth", 0),
        ("label_budget", 0),
    ],
)
def test_bad_distill_params_name_the_key(key, value):
    with pytest.raises(DistilflowError, match=rf"distill\.{key}"):
        params_from_dict({"distill": {key: value}})
