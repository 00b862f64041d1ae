import torch

from gd_hf.config import SslConfig
from gd_hf.method import GuidedDistillation
from gd_hf.method.teacher import EmaTeacher
from gd_hf.models.mask2former import Mask2FormerFamily


def pair():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    teacher_model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    student(torch.randn(8, 4))  # moves BN running stats and the integer counter
    return student, EmaTeacher(teacher_model)


def test_teacher_is_frozen_and_in_eval_mode():
    _, teacher = pair()
    teacher.train()
    assert not teacher.model.training
    assert not any(p.requires_grad for p in teacher.parameters())
    out = teacher(torch.randn(2, 4))
    assert not out.requires_grad


def test_ema_update_equals_the_formula_for_parameters_and_float_buffers():
    student, teacher = pair()
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    teacher.update(student, decay=0.9)
    after, source = teacher.model.state_dict(), student.state_dict()
    for key, value in after.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.9 * before[key] + 0.1 * source[key])
        else:
            assert torch.equal(value, before[key])  # num_batches_tracked is not averaged


def test_copy_from_makes_teacher_equal_to_student():
    student, teacher = pair()
    teacher.copy_from(student)
    for key, value in teacher.model.state_dict().items():
        if value.is_floating_point():
            assert torch.equal(value, student.state_dict()[key])
    # and it is a copy, not an alias
    with torch.no_grad():
        student[0].weight.add_(1)
    assert not torch.equal(teacher.model[0].weight, student[0].weight)


def test_phase_is_a_pure_function_of_the_step():
    method = GuidedDistillation(
        SslConfig(enabled=True, burn_in_steps=3), Mask2FormerFamily(), EmaTeacher(torch.nn.Linear(1, 1))
    )
    assert [method.phase(s) for s in range(5)] == ["burn_in"] * 3 + ["ema"] * 2
    assert GuidedDistillation.supervised(Mask2FormerFamily()).phase(10) == "supervised"
