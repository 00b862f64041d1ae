"""The Accelerator gd_hf runs on, and what its processes must agree on (replicas of the student and teacher)."""

from __future__ import annotations

import os
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import DistributedType, gather_object

from gd_hf.config import Recipe, RecipeError
from gd_hf.method.teacher import EmaTeacher
from gd_hf.run.step import TrainingError


class ReplicasDivergedError(TrainingError):
    """The processes' copies of a model differ (they would train silently on different models)."""


def build_accelerator(recipe: Recipe) -> Accelerator:
    """Accelerator with mixed precision from the recipe (or the accelerate config). Its trackers are each phase's
    own (`gd_hf.run.trackers`): none here."""
    kwargs: dict[str, Any] = {
        # Some backbone parameters get no gradient (Swin's last norm, DINOv2's mask token): DDP must allow that.
        "kwargs_handlers": [DistributedDataParallelKwargs(find_unused_parameters=True)],
        "project_dir": recipe.output_dir,
        # Without a GPU, `accelerate launch --multi_gpu` gives real gloo DDP only with cpu=True (hf-notes).
        "cpu": not torch.cuda.is_available(),
    }
    if recipe.train.mixed_precision is not None:
        kwargs["mixed_precision"] = recipe.train.mixed_precision
    accelerator = Accelerator(**kwargs)
    check_distributed_type(accelerator.distributed_type)
    if accelerator.num_processes > 1:  # COCOeval (hotcoco) runs on every process: they share the machine's cores
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // local_processes)))
    return accelerator


# Strategies that shard parameters: the EMA update pairs full teacher and student tensors, and exports,
# checksums and the teacher's checkpoint state expect full parameters on every process.
SHARDED_STRATEGIES = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)


def check_distributed_type(distributed_type: DistributedType) -> None:
    """Stop before any work when the accelerate config asks for a parameter-sharding strategy."""
    if distributed_type in SHARDED_STRATEGIES:
        raise RecipeError(
            f"the accelerate config asks for {distributed_type.value}, which gd_hf does not support yet: the EMA "
            "teacher update, exports and checkpoints need full (unsharded) parameters. Use DDP instead "
            "(accelerate_configs/multi_gpu.yaml or multi_node.yaml)."
        )


def replica_fingerprints(
    accelerator: Accelerator, student: torch.nn.Module, teacher: EmaTeacher | None
) -> dict[str, list[float]]:
    """A float64 checksum of the student's and the teacher's weights on every process: they must all agree
    (DDP keeps students in sync; the EMA teacher is updated from them on each rank). Diverged replicas would
    train silently on different models, so they stop the run."""

    def checksum(module: torch.nn.Module) -> float:
        return float(sum(p.detach().double().sum() * (i + 1) for i, p in enumerate(module.state_dict().values())
                         if p.is_floating_point()))  # fmt: skip

    mine = {"student": checksum(student)}
    if teacher is not None:
        mine["teacher"] = checksum(teacher.model)
    everyone = gather_object([mine])
    fingerprints = {key: [f[key] for f in everyone] for key in mine}
    diverged = [key for key, values in fingerprints.items() if len(set(values)) > 1]
    if diverged:
        raise ReplicasDivergedError(f"the {' and '.join(diverged)} weights differ between processes: {fingerprints}")
    return fingerprints
