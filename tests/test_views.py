import datasets
import torch

from gd_hf.config import DataConfig
from gd_hf.data.coco import load_coco, to_hf_dataset
from gd_hf.data.images import read_image
from gd_hf.data.loading import UnlabeledTrainDataset, collate_unlabeled
from gd_hf.data.transforms import scale_jitter_crop_flip, strong_photometric

from .conftest import demo_recipe


def test_strong_view_changes_colours_not_geometry():
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    image[:, 20:40, 10:30] = 200
    changed = 0
    for seed in range(20):
        strong = strong_photometric(image, torch.Generator().manual_seed(seed))
        assert strong.shape == image.shape and strong.dtype == torch.uint8
        changed += int(not torch.equal(strong, image))
        # The square is still where it was: brighter or dimmer, maybe blurred at the edge, never moved.
        luminance = strong.float().mean(0)
        inside, outside = (
            luminance[22:38, 12:28].mean(),
            torch.cat([luminance[:18].flatten(), luminance[42:].flatten()]).mean(),
        )
        assert inside != outside
        foreground = (luminance - outside).abs() > (inside - outside).abs() / 2
        truth = torch.zeros(64, 64, dtype=torch.bool)
        truth[20:40, 10:30] = True
        assert (foreground & truth).sum() / (foreground | truth).sum() > 0.8
    assert changed >= 15


def test_weak_and_strong_views_share_geometry_with_the_hidden_masks(synthetic_root):
    source = load_coco(synthetic_root / "annotations" / "instances_train.json", synthetic_root / "train")
    data = DataConfig(crop_size=64, min_scale=0.5, max_scale=1.5)
    hf = to_hf_dataset(source)
    dataset = UnlabeledTrainDataset(hf, data)
    raw = hf.cast_column("image", datasets.Image(decode=False))
    for seed in range(6):
        row = seed % len(dataset)
        sample = dataset[(row, seed)]
        # Rebuild both views by hand: ONE geometry draw, then colour noise on top of the weak view only.
        image = read_image(raw[row])
        generator = torch.Generator().manual_seed(seed)
        weak, _ = scale_jitter_crop_flip(
            image, torch.zeros(0, *image.shape[-2:], dtype=torch.bool), 64, 0.5, 1.5, 0.5, generator
        )
        strong = strong_photometric(weak, generator)
        assert torch.equal(sample["weak"], weak)
        assert torch.equal(sample["strong"], strong)
        # Hidden masks follow the same geometry: each object's pixels are nearly one colour in the weak view.
        for mask in sample["hidden_masks"]:
            if mask.sum() > 30:
                assert sample["weak"].float()[:, mask].std(1).mean() < 25
    batch = collate_unlabeled([dataset[(0, 1)], dataset[(1, 2)]], padding_divisor=32)
    assert batch["weak_pixel_values"].shape == batch["strong_pixel_values"].shape == (2, 3, 64, 64)


def test_strong_view_keeps_hue_and_colour_when_asked():
    import colorsys

    from gd_hf.data.transforms import StrongAugment

    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    image[0], image[1], image[2] = 200, 60, 40  # a saturated red-orange
    hue = colorsys.rgb_to_hsv(200 / 255, 60 / 255, 40 / 255)[0]

    def hues(augment: StrongAugment) -> list[float]:
        out = []
        for seed in range(40):
            view = strong_photometric(image, torch.Generator().manual_seed(seed), augment).float().mean((1, 2)) / 255
            h, s, _ = colorsys.rgb_to_hsv(*view.tolist())
            out.append(h if s > 0.05 else float("nan"))
        return out

    keep = hues(StrongAugment(hue=0.0, grayscale_prob=0.0, jitter_prob=1.0, blur_prob=0.0))
    assert all(abs(h - hue) < 0.02 for h in keep)  # brightness/contrast/saturation only: same hue, never gray
    reference = hues(StrongAugment(jitter_prob=1.0, blur_prob=0.0))
    assert any(h != h or abs(h - hue) > 0.03 for h in reference)  # the reference shifts hue or turns gray


def test_strong_erase_prob_erases_one_rectangle_of_the_strong_view_only():
    """`ssl.strong_erase_prob` (not in the reference): with probability 1 and every other noise off, exactly one
    rectangle of 2-20 % of the image is filled with one random colour; everything else is untouched."""
    from gd_hf.data.transforms import StrongAugment, strong_photometric

    image = torch.full((3, 40, 60), 100, dtype=torch.uint8)
    erase_only = StrongAugment(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, erase_prob=1.0)
    for seed in range(5):
        out = strong_photometric(image, torch.Generator().manual_seed(seed), erase_only)
        changed = (out != image).any(0)
        rows, cols = changed.any(1).nonzero()[:, 0], changed.any(0).nonzero()[:, 0]
        box = changed[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        assert box.all()  # one filled rectangle
        assert 0.02 * 40 * 60 * 0.8 <= box.numel() <= 0.2 * 40 * 60 * 1.2
        assert len(torch.unique(out[:, changed].T, dim=0)) == 1  # one colour
    off = StrongAugment(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, erase_prob=0.0)
    assert torch.equal(strong_photometric(image, torch.Generator().manual_seed(0), off), image)


def test_the_recipes_strong_augmentation_reaches_the_unlabeled_data(synthetic_root, tmp_path, monkeypatch):
    import gd_hf.data.batches as batches_module
    from gd_hf.train import train

    from .conftest import ONE_LAUNCH_SSL, tiny_overrides

    seen = []
    real = batches_module.UnlabeledTrainDataset

    def spy(records, data, strong):
        seen.append(strong)
        return real(records, data, strong)

    monkeypatch.setattr(batches_module, "UnlabeledTrainDataset", spy)
    overrides = tiny_overrides(synthetic_root, tmp_path / "run") + ONE_LAUNCH_SSL
    overrides += ["ssl.strong_erase_prob=0.7", "ssl.strong_hue=0.05", "ssl.strong_grayscale_prob=0.1"]
    train(demo_recipe(overrides))
    assert seen and all((s.erase_prob, s.hue, s.grayscale_prob) == (0.7, 0.05, 0.1) for s in seen)
