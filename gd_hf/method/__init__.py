"""The method, Guided Distillation, in a room of its own: `distillation` (`GuidedDistillation`: the teacher, the
phases, the loss of a micro-batch; the pseudo-label rules; the extension points), `teacher` (frozen, then the EMA
of the student), `pseudo_labels` (the rules' filter, their quality against hidden labels) and `teacher_check`
(can this teacher teach? measured before distilling). The public names are importable from here:
`from gd_hf.method import GuidedDistillation, PseudoLabelRules, PseudoLabelRule, ModelFamily`."""

from gd_hf.method.distillation import (
    FAMILY_METHODS,
    LOGGED_LOSS_TERMS,
    GuidedDistillation,
    ModelFamily,
    Predictions,
    PseudoLabelRule,
    PseudoLabelRules,
    StepStart,
    check_extension_points,
    describe_extension,
    one_frame,
    pseudo_label_figures,
    pseudo_labels_problem,
)
from gd_hf.method.pseudo_labels import PseudoLabels

__all__ = ["FAMILY_METHODS", "LOGGED_LOSS_TERMS", "GuidedDistillation", "ModelFamily", "Predictions", "PseudoLabelRule",
           "PseudoLabelRules", "PseudoLabels", "StepStart", "check_extension_points", "describe_extension", "one_frame",
           "pseudo_label_figures", "pseudo_labels_problem"]  # fmt: skip
