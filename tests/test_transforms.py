import math
from itertools import islice

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gd_hf.config import DataConfig
from gd_hf.data.loading import StepBatchSampler, collate_train, repeat_factors
from gd_hf.data.transforms import eval_size, padded_size, scale_jitter_crop_flip


def striped_example(height=48, width=80):
    """An image whose red channel *is* the mask of an off-centre L-shaped object, so alignment is checkable."""
    masks = torch.zeros(2, height, width, dtype=torch.bool)
    masks[0, 5:30, 10:20] = True
    masks[0, 25:30, 10:60] = True
    masks[1, 35:45, 60:75] = True
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    image[0] = masks[0].to(torch.uint8) * 255
    image[1] = masks[1].to(torch.uint8) * 255
    return image, masks


def test_image_and_masks_stay_aligned_under_jitter_crop_and_flip():
    image, masks = striped_example()
    flipped_seen = unflipped_seen = False
    for seed in range(40):
        generator = torch.Generator().manual_seed(seed)
        out_image, out_masks = scale_jitter_crop_flip(image, masks, 64, 0.3, 2.5, 0.5, generator)
        assert out_image.shape[-2:] == out_masks.shape[-2:] and out_image.shape[-1] <= 64
        for channel in (0, 1):
            from_image = out_image[channel] > 127
            mask = out_masks[channel].float()[None, None]
            # Bilinear vs nearest resampling may differ on the 1-pixel border of a mask, nowhere else.
            border = (F.max_pool2d(mask, 3, 1, 1) != -F.max_pool2d(-mask, 3, 1, 1))[0, 0]
            disagree = (from_image != out_masks[channel]) & ~border
            assert not disagree.any(), (seed, channel, int(disagree.sum()))
        # The L is asymmetric: its long arm tells whether the sample was flipped.
        if out_masks[0].any():
            columns = out_masks[0].any(0).nonzero().flatten()
            rows_of_arm = out_masks[0][:, columns[0]].sum() > out_masks[0][:, columns[-1]].sum()
            flipped_seen |= not bool(rows_of_arm)
            unflipped_seen |= bool(rows_of_arm)
    assert flipped_seen and unflipped_seen


def test_same_seed_same_augmentation():
    image, masks = striped_example()
    a = scale_jitter_crop_flip(image, masks, 64, 0.5, 2.0, 0.5, torch.Generator().manual_seed(7))
    b = scale_jitter_crop_flip(image, masks, 64, 0.5, 2.0, 0.5, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_collate_pads_to_the_padding_divisor_and_keeps_targets():
    samples = [
        {
            "image": torch.zeros(3, 40, 50, dtype=torch.uint8),
            "masks": torch.ones(2, 40, 50, dtype=torch.bool),
            "classes": torch.tensor([1, 2]),
            "image_id": 1,
        },
        {
            "image": torch.zeros(3, 20, 70, dtype=torch.uint8),
            "masks": torch.zeros(0, 20, 70, dtype=torch.bool),
            "classes": torch.zeros(0, dtype=torch.long),
            "image_id": 2,
        },
    ]
    batch = collate_train(samples, padding_divisor=32)
    assert batch["pixel_values"].shape == (2, 3, 64, 96)
    assert batch["mask_labels"][0].shape == (2, 64, 96) and batch["mask_labels"][0][:, :40, :50].all()
    assert not batch["mask_labels"][0][:, 40:, :].any()  # padding is background
    assert batch["mask_labels"][1].shape == (0, 64, 96)
    assert padded_size([(14, 15)], 14) == (14, 28)


def test_eval_size_matches_shortest_and_longest_edge_rules():
    assert eval_size(480, 640, 800, 1333) == (800, 1067)
    assert eval_size(100, 1000, 800, 1333) == (133, 1333)


def test_sampler_resumes_exactly_and_ranks_are_disjoint():
    full = StepBatchSampler(num_items=10, batch_size=3, seed=4)
    stream = iter(full)
    first_eight = [next(stream) for _ in range(8)]
    resumed = iter(StepBatchSampler(num_items=10, batch_size=3, seed=4, start_step=5))
    assert [next(resumed) for _ in range(3)] == first_eight[5:]
    # Every epoch visits each image once; the augmentation seed differs between visits.
    rows = [row for batch in first_eight[:4] for row, _ in batch][:10]
    assert sorted(rows) == list(range(10))
    seeds = [s for batch in first_eight for _, s in batch]
    assert len(set(seeds)) == len(seeds)
    # Two ranks with batch b read exactly what one rank with batch 2b reads, split between them.
    one = iter(StepBatchSampler(num_items=10, batch_size=4, seed=4))
    rank0 = iter(StepBatchSampler(num_items=10, batch_size=2, seed=4, rank=0, world_size=2))
    rank1 = iter(StepBatchSampler(num_items=10, batch_size=2, seed=4, rank=1, world_size=2))
    for _ in range(5):
        assert next(one) == next(rank0) + next(rank1)


def test_repeat_factors_follow_the_category_frequency_formula():
    # class 0 is in 3 of the 4 images (twice in one: counted once), class 1 in 1; the last image is empty.
    categories = [[0], [0, 0], [0, 1], []]
    assert np.allclose(repeat_factors(categories, 0.5), [1, 1, math.sqrt(0.5 / 0.25), 1])
    # The reference's threshold 10: every class is "rare"; an image takes its rarest class's factor.
    assert np.allclose(repeat_factors(categories, 10), [math.sqrt(10 / 0.75)] * 2 + [math.sqrt(10 / 0.25), 1])


def test_repeat_factor_sampler_draws_images_in_proportion_and_resumes_exactly():
    factors = np.array([1.0, 1.0, 2.5, 4.0])
    sampler = StepBatchSampler(num_items=4, batch_size=3, seed=1, repeat_factors=factors)
    # An epoch lists image i floor(r_i) or floor(r_i) + 1 times (stochastic rounding), and both happen.
    counts = np.array([np.bincount(sampler.epoch_order(e), minlength=4) for e in range(40)])
    assert (counts[:, [0, 1, 3]] == [1, 1, 4]).all()
    assert set(counts[:, 2]) == {2, 3}
    batches = list(islice(iter(sampler), 400))
    rows = [row for batch in batches for row, _ in batch]
    # Epochs of different lengths are read back to back, whole.
    first, second = sampler.epoch_order(0), sampler.epoch_order(1)
    assert rows[: len(first) + len(second)] == first.tolist() + second.tolist()
    assert np.allclose(np.bincount(rows, minlength=4) / len(rows), factors / factors.sum(), atol=0.01)
    resumed = StepBatchSampler(num_items=4, batch_size=3, seed=1, start_step=137, repeat_factors=factors)
    assert list(islice(iter(resumed), 50)) == batches[137:187]
    rank0, rank1 = (
        iter(StepBatchSampler(num_items=4, batch_size=1, seed=1, rank=r, world_size=3, repeat_factors=factors))
        for r in (0, 1)
    )
    assert [next(rank0) + next(rank1) for _ in range(5)] == [b[:2] for b in batches[:5]]
    with pytest.raises(ValueError, match="each >= 1"):
        next(iter(StepBatchSampler(num_items=4, batch_size=1, seed=1, repeat_factors=np.array([1, 1, 0.5, 1]))))


def test_labeled_dataset_drops_crowd_and_cropped_away_objects(synthetic_root):
    from gd_hf.data.coco import load_coco, to_hf_dataset
    from gd_hf.data.loading import LabeledTrainDataset

    source = load_coco(synthetic_root / "annotations" / "instances_train.json", synthetic_root / "train")
    dataset = LabeledTrainDataset(
        to_hf_dataset(source), DataConfig(crop_size=64, min_scale=1.0, max_scale=1.0, hflip_prob=0.0)
    )
    sample = dataset[(0, 0)]
    image_id = sample["image_id"]
    # No jitter, no flip, no crop: targets are exactly the annotations, in order.
    assert sample["classes"].tolist() == [a["category"] for a in source.annotations[image_id]]
    assert sample["masks"].shape == (len(source.annotations[image_id]), 64, 64)
    assert all(m.any() for m in sample["masks"])
