"""A run's training batches: step-indexed loaders (map-style data) or resumable streams, labeled and unlabeled.

Map-style: the sampler is indexed by micro-batch, so data order and augmentation are a function of (seed, step)
and resuming is starting it at the right step. Streamed (`data.streaming`): `StatefulDataLoader`s whose positions
are saved in every checkpoint (`TrainBatches.data_state`) and restored from it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from gd_hf.config import Recipe, SslConfig
from gd_hf.data.loading import (
    LabeledTrainDataset,
    StepBatchSampler,
    StreamedTrainDataset,
    UnlabeledTrainDataset,
    collate_train,
    collate_unlabeled,
    labeled_sample,
    repeat_factors,
    unlabeled_sample,
)
from gd_hf.data.prepare import RunData
from gd_hf.data.records import check_record
from gd_hf.data.transforms import StrongAugment

logger = logging.getLogger("gd_hf.train")


@dataclass
class TrainBatches:
    """The labeled batches and, with `ssl.enabled`, the unlabeled ones (weak + strong views)."""

    labeled: Iterator[dict[str, Any]]
    unlabeled: Iterator[dict[str, Any]] | None
    streams: dict[str, StatefulDataLoader]  # with data.streaming: the loaders whose positions a checkpoint saves

    def next_step(self, micro_batches: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """The micro-batches of one optimizer step. Both streams advance every step (also when the unlabeled
        batches go unused, in a labeled-only burn-in), so the unlabeled position is a function of the step too."""
        labeled = [next(self.labeled) for _ in range(micro_batches)]
        unlabeled = [next(self.unlabeled) for _ in range(micro_batches)] if self.unlabeled is not None else None
        return labeled, unlabeled

    def data_state(self) -> dict[str, Any]:
        """This process's stream positions, for its checkpoint (empty for map-style data)."""
        return {name: loader.state_dict() for name, loader in self.streams.items()}


def strong_augment(ssl: SslConfig) -> StrongAugment:
    """The strong view of the recipe (the reference's, with the hue/grayscale/erasing knobs of `ssl`)."""
    return StrongAugment(hue=ssl.strong_hue, grayscale_prob=ssl.strong_grayscale_prob, erase_prob=ssl.strong_erase_prob)


def build_train_batches(
    recipe: Recipe,
    data: RunData,
    rank: int,
    world_size: int,
    padding_divisor: int,
    start_step: int,
    stream_states: dict[str, Any] | None,
    black_padding: bool = False,
) -> TrainBatches:
    """The run's batch iterators, positioned after `start_step` optimizer steps (see the module doc); a resumed
    run's streams where `stream_states` (this process's, from the checkpoint; None: a fresh start) left them.
    Built before the checkpoint's RNG states are restored: creating a loader's iterator draws a seed from torch's
    RNG."""
    d, ssl, cfg = recipe.data, recipe.ssl, recipe.train
    micro_steps = cfg.gradient_accumulation_steps
    resumed, stream_states = stream_states is not None, stream_states or {}
    streams: dict[str, StatefulDataLoader] = {}

    def step_indexed(dataset, batch_size: int, seed: int, collate, factors: np.ndarray | None = None) -> Iterator:
        sampler = StepBatchSampler(
            num_items=len(dataset),
            batch_size=batch_size // micro_steps,
            seed=seed,
            start_step=start_step * micro_steps,
            rank=rank,
            world_size=world_size,
            repeat_factors=factors,
        )
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=d.num_workers,
            collate_fn=partial(collate, padding_divisor=padding_divisor, black_padding=black_padding),
            persistent_workers=d.num_workers > 0,
        )
        return iter(loader)

    def streamed(name: str, records, make_sample, batch_size: int, seed: int, collate) -> Iterator:
        dataset = StreamedTrainDataset(records, make_sample, d, seed, rank, world_size, check_record)
        loader = StatefulDataLoader(
            dataset,
            batch_size=batch_size // micro_steps,
            num_workers=d.num_workers,
            collate_fn=partial(collate, padding_divisor=padding_divisor, black_padding=black_padding),
            persistent_workers=d.num_workers > 0,
        )
        if name in stream_states:
            loader.load_state_dict(stream_states[name])
        elif resumed:
            logger.warning("no saved position of the %s stream in the checkpoint: it starts from the beginning", name)
        streams[name] = loader
        return iter(loader)

    if d.streaming:
        labeled = streamed("labeled", data.labeled, partial(labeled_sample, data=d), cfg.batch_size, recipe.seed,
                           collate_train)  # fmt: skip
    else:
        factors = labeled_repeat_factors(recipe, data)
        labeled = step_indexed(
            LabeledTrainDataset(data.labeled, d), cfg.batch_size, recipe.seed, collate_train, factors
        )
    unlabeled = None
    if ssl.enabled:
        # A different seed: the unlabeled stream is not in the labeled stream's order.
        if d.streaming:
            make_views = partial(unlabeled_sample, data=d, strong=strong_augment(ssl))
            unlabeled = streamed("unlabeled", data.unlabeled, make_views, ssl.unlabeled_batch_size, recipe.seed + 1,
                                 collate_unlabeled)  # fmt: skip
        else:
            views = UnlabeledTrainDataset(data.unlabeled, d, strong_augment(ssl))
            unlabeled = step_indexed(views, ssl.unlabeled_batch_size, recipe.seed + 1, collate_unlabeled)
    return TrainBatches(labeled, unlabeled, streams)


def labeled_repeat_factors(recipe: Recipe, data: RunData) -> np.ndarray | None:
    """Phases 2-3 draw rare-class labeled images more often, as the reference (`ssl.labeled_repeat_threshold`);
    phase 1 draws uniformly."""
    ssl = recipe.ssl
    if not ssl.enabled or ssl.labeled_repeat_threshold is None:
        return None
    # Only the class column is read (not the masks); crowd regions count, as in detectron2.
    image_categories = data.labeled.select_columns(["objects"]).flatten()["objects.category"]
    factors = repeat_factors(image_categories, ssl.labeled_repeat_threshold)
    logger.info(
        "repeat-factor sampling of the labeled images (threshold %g): factors %.2f to %.2f",
        ssl.labeled_repeat_threshold,
        factors.min(),
        factors.max(),
    )
    return factors
