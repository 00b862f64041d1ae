"""Value checks of a loaded recipe that types alone cannot express (`validate`, called by `load_recipe`).

Each `_..._checks` function returns `(passes, key, message)` triples for one section or concern; `validate`
evaluates them all and raises `RecipeError(f"{key} {message}")` for the first that fails, in a fixed order. The
checks of the keys one model family reads are that family's (`ModelFamily.recipe_problems`, run by
`gd_hf.models.check_recipe` when training starts).
"""

from __future__ import annotations

from gd_hf.config.schema import DataConfig, EvalConfig, HubConfig, ModelConfig, Recipe, TrainConfig
from gd_hf.config.types import RecipeError

Check = tuple[bool, str, str]
"""`(passes, key, message)`: a failing check is reported as `f"{key} {message}"`."""


TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
"""The tracker names `train.report_to` takes (also `all` and `none`); each is a package of the same name."""


def report_to_problem(report_to: str | list[str]) -> str | None:
    """Why `train.report_to` is not a valid choice of names, or None."""
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    unknown = [n for n in names if n not in (*TRACKERS, "all", "none")]
    if unknown or not names:
        return f"{report_to!r} names no tracker gd_hf knows: use {', '.join(TRACKERS)}, a list of them, all or none"
    if len(names) > 1 and ("none" in names or "all" in names):
        return f"{report_to!r}: `none` and `all` stand alone"
    return None


def validate(recipe: Recipe) -> None:
    """Value checks that types alone cannot express; raise `RecipeError` naming the first that fails.

    The order below decides which problem a recipe with several is told about first: keep it."""
    m, d, t, e = recipe.model, recipe.data, recipe.train, recipe.eval
    checks = [
        *_run_checks(recipe),
        *_size_limit_checks(m, d),
        *_loss_checks(m),
        *_eval_image_and_synthetic_checks(d),
        *_eval_checks(e),
        *_optimizer_checks(t),
        *_teacher_and_repo_id_checks(recipe),
        *_data_checks(d),
        *_train_loop_checks(t),
        *_query_and_top_k_checks(m, e),
        *_hub_push_checks(recipe.hub),
        *_ssl_checks(recipe),
        *_ssl_loss_and_data_checks(recipe),
        *_layer_lr_decay_checks(recipe),
    ]
    for ok, key, message in checks:
        if not ok:
            raise RecipeError(f"{key} {message}")


def _run_checks(recipe: Recipe) -> list[Check]:
    """Where the run writes, and its seeds."""
    return [
        (bool(recipe.output_dir.strip()), "output_dir", "must name a folder (it is empty)"),
        (0 <= recipe.seed < 2**32, "seed", "must be in [0, 2**32) (numpy's seeds)"),
        (0 <= recipe.data.split_seed < 2**32, "data.split_seed", "must be in [0, 2**32) (numpy's seeds)"),
    ]


def _size_limit_checks(m: ModelConfig, d: DataConfig) -> list[Check]:
    """Upper bounds far above the reference's values: beyond them a run only exhausts memory."""
    return [
        (m.num_queries <= 10_000, "model.num_queries", "must be <= 10000 (the reference: 100)"),
        (m.train_num_points <= 1_000_000, "model.train_num_points", "must be <= 1000000 (the reference: 12544)"),
        (d.crop_size <= 8192, "data.crop_size", "must be <= 8192 (the reference: 1024)"),
        (d.max_scale <= 10, "data.max_scale", "must be <= 10 (the reference: 2.0)"),
        (d.eval_longest_edge <= 8192, "data.eval_longest_edge", "must be <= 8192 (the reference: 1333)"),
        (m.backbone_hidden_size <= 4096, "model.backbone_hidden_size", "must be <= 4096 (Swin-L: 192)"),
        (m.hidden_dim <= 4096, "model.hidden_dim", "must be <= 4096 (the reference: 256)"),
        (m.eomt_hidden_size <= 8192, "model.eomt_hidden_size", "must be <= 8192 (ViT-L: 1024)"),
        (m.eomt_register_tokens <= 64, "model.eomt_register_tokens", "must be <= 64 (DINOv2: 4)"),
        (m.eomt_layers <= 256, "model.eomt_layers", "must be <= 256 (ViT-L: 24)"),
    ]


def _loss_checks(m: ModelConfig) -> list[Check]:
    """The matched loss's points and weights."""
    return [
        (m.train_num_points > 0, "model.train_num_points", "must be > 0"),
        (
            min(m.no_object_weight, m.class_weight, m.mask_weight, m.dice_weight) >= 0,
            "model.*_weight",
            "loss weights must be >= 0",
        ),  # fmt: skip
        # The class loss is a weighted mean: an image batch without targets would divide by a zero weight sum.
        (m.no_object_weight > 0, "model.no_object_weight", "must be > 0 (0 makes a batch without objects NaN)"),
    ]


def _eval_image_and_synthetic_checks(d: DataConfig) -> list[Check]:
    """The evaluation resize and the synthetic set's sizes."""
    return [
        (d.eval_shortest_edge > 0, "data.eval_shortest_edge", "must be > 0"),
        (d.eval_longest_edge >= d.eval_shortest_edge, "data.eval_longest_edge", "must be >= data.eval_shortest_edge"),
        (d.synthetic_train_images > 0, "data.synthetic_train_images", "must be > 0"),
        (d.synthetic_val_images > 0, "data.synthetic_val_images", "must be > 0"),
        (d.synthetic_image_size >= 16, "data.synthetic_image_size", "must be >= 16"),
    ]


def _eval_checks(e: EvalConfig) -> list[Check]:
    """The evaluation's batch and image count."""
    return [
        (e.batch_size > 0, "eval.batch_size", "must be > 0"),
        (e.max_images is None or e.max_images > 0, "eval.max_images", "must be null (all) or > 0"),
        (0 <= e.pictures <= 32, "eval.pictures", "must be in [0, 32] (0: no pictures; each is a row of a picture)"),
    ]


def _optimizer_checks(t: TrainConfig) -> list[Check]:
    """The optimizer's and the schedule's shape."""
    return [
        (
            0 <= t.backbone_lr_multiplier <= 10,
            "train.backbone_lr_multiplier",
            "must be in [0, 10] (the backbone's lr is train.lr times it; the reference: 0.1)",
        ),
        (t.weight_decay >= 0, "train.weight_decay", "must be >= 0"),
        (t.poly_power > 0, "train.poly_power", "must be > 0"),
    ]


def _teacher_and_repo_id_checks(recipe: Recipe) -> list[Check]:
    """Where the teacher comes from, and the Hub repository the run pushes to."""
    return [
        (
            recipe.ssl.teacher_max_steps is None or recipe.ssl.teacher_max_steps > 0,
            "ssl.teacher_max_steps",
            "must be null (train.max_steps) or > 0",
        ),
        (
            not (recipe.ssl.teacher is not None and recipe.ssl.train_teacher_first),
            "ssl.teacher",
            f"is {recipe.ssl.teacher!r} but ssl.train_teacher_first is true, which trains its own teacher: set "
            "ssl.train_teacher_first=false to distill from that teacher, or ssl.teacher=null to train one first",
        ),
        (_repo_id_problem(recipe.hub.repo_id) is None, "hub.repo_id", _repo_id_problem(recipe.hub.repo_id) or ""),
    ]


def _data_checks(d: DataConfig) -> list[Check]:
    """The labeled split, the augmentation and the loaders."""
    return [
        (0 < d.labeled_percent <= 100, "data.labeled_percent", "must be in (0, 100]"),
        (0 < d.min_scale <= d.max_scale, "data.min_scale", "must be > 0 and <= data.max_scale"),
        (0 <= d.hflip_prob <= 1, "data.hflip_prob", "must be in [0, 1]"),
        (d.crop_size > 0, "data.crop_size", "must be > 0"),
        (d.num_workers >= 0, "data.num_workers", "must be >= 0"),
        (
            d.dataset_name is None or (0 < len(d.dataset_name) <= 100 and d.dataset_name.isprintable()),
            "data.dataset_name",
            "must be one line of 1 to 100 printable characters (it is the model card's name for the data set)",
        ),
        (d.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1"),
        (
            d.source != "coco" or (d.category_names is None and d.classes_file is None),
            "data.category_names" if d.category_names is not None else "data.classes_file",
            "names classes for shards and hub data sets; a COCO source takes its classes from its JSON's "
            "`categories` (remove the key, or rename them there)",
        ),
    ]


def _train_loop_checks(t: TrainConfig) -> list[Check]:
    """Steps, batches, learning rate and the loop's bookkeeping."""
    return [
        (t.max_steps > 0, "train.max_steps", "must be > 0"),
        (report_to_problem(t.report_to) is None, "train.report_to", report_to_problem(t.report_to) or ""),
        (0 < t.batch_size <= 4096, "train.batch_size", "must be in [1, 4096] (the reference: 16)"),
        (t.gradient_accumulation_steps > 0, "train.gradient_accumulation_steps", "must be > 0"),
        (
            t.gradient_accumulation_steps <= 0 or t.batch_size % t.gradient_accumulation_steps == 0,
            "train.batch_size",
            "must be divisible by train.gradient_accumulation_steps",
        ),
        # AdamW moves each weight by about lr per step (the reference: 1e-4); above 1 is never meant, and above
        # ~3e37 torch cannot even apply the step (the bias-corrected step overflows float32).
        (0 < t.lr <= 1, "train.lr", "must be in (0, 1] (AdamW moves each weight by about lr per step)"),
        (t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0"),
        (t.grad_clip >= 0, "train.grad_clip", "must be >= 0"),
        (t.log_every > 0, "train.log_every", "must be > 0"),
        (t.max_nonfinite_steps > 0, "train.max_nonfinite_steps", "must be > 0"),
        (t.eval_every >= 0, "train.eval_every", "must be >= 0"),
        (t.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0"),
        (t.keep_checkpoints > 0, "train.keep_checkpoints", "must be > 0"),
    ]


def _query_and_top_k_checks(m: ModelConfig, e: EvalConfig) -> list[Check]:
    """How many queries the model has, and how many instances evaluation keeps."""
    return [
        (m.num_queries > 0, "model.num_queries", "must be > 0"),
        (e.top_k > 0, "eval.top_k", "must be > 0"),
    ]


def _hub_push_checks(h: HubConfig) -> list[Check]:
    """What a push to the Hub needs."""
    return [
        (not h.push or bool(h.repo_id), "hub.repo_id", "is required when hub.push is true"),
        (h.space_repo is None or h.push, "hub.space_repo", "needs hub.push: true (the Space serves the pushed model)"),
        (_repo_id_problem(h.space_repo) is None, "hub.space_repo", _repo_id_problem(h.space_repo) or ""),
        (h.retries >= 0, "hub.retries", "must be >= 0"),
    ]


def _ssl_checks(recipe: Recipe) -> list[Check]:
    """Guided Distillation: EMA, burn-in, the teacher check and the pseudo-label threshold."""
    s = recipe.ssl
    return [
        (0 <= s.ema_decay < 1, "ssl.ema_decay", "must be in [0, 1)"),
        (s.teacher_check_images > 0, "ssl.teacher_check_images", "must be > 0"),
        (0 <= s.teacher_check_min_precision <= 1, "ssl.teacher_check_min_precision", "must be in [0, 1]"),
        (s.teacher_check_min_label_ratio >= 0, "ssl.teacher_check_min_label_ratio", "must be >= 0"),
        (s.burn_in_steps >= 0, "ssl.burn_in_steps", "must be >= 0"),
        (
            s.pseudo_label_score_threshold == "auto" or 0 <= s.pseudo_label_score_threshold < 1,
            "ssl.pseudo_label_score_threshold",
            "must be in [0, 1) or `auto`",
        ),
        (
            0 < s.pseudo_label_target_precision <= 1,
            "ssl.pseudo_label_target_precision",
            "must be in (0, 1]",
        ),
        (s.pseudo_label_min_mask_pixels >= 0, "ssl.pseudo_label_min_mask_pixels", "must be >= 0 (0: off)"),
        (
            not (s.enabled and s.pseudo_label_score_threshold == "auto" and s.teacher_check == "off"),
            "ssl.pseudo_label_score_threshold",
            "is `auto`, which the teacher check chooses, and ssl.teacher_check is off: set ssl.teacher_check to "
            "stop or warn, or give a number (the paper: 0.7)",
        ),
        (
            not (
                s.enabled
                and s.pseudo_label_score_threshold == "auto"
                and not (
                    (s.teacher is not None or s.train_teacher_first) and s.burn_in_pseudo_labels and s.burn_in_steps > 0
                )
            ),
            "ssl.pseudo_label_score_threshold",
            "is `auto`, which the teacher check chooses for the fixed teacher of a guided burn-in, and this run "
            "has none that teaches (no ssl.teacher, a burn-in on labeled data only, or ssl.burn_in_steps 0: its "
            "first pseudo labels come from the student's copy): give a number (the paper: 0.7), or a guided "
            "burn-in",
        ),
        (
            not (
                s.enabled
                and s.pseudo_label_score_threshold == "auto"
                and s.teacher_check != "off"
                and s.pseudo_label_target_precision < s.teacher_check_min_precision
            ),
            "ssl.pseudo_label_target_precision",
            f"({s.pseudo_label_target_precision}) is below ssl.teacher_check_min_precision "
            f"({s.teacher_check_min_precision}): a threshold chosen at that precision would be stopped by the check",
        ),
    ]


def _ssl_loss_and_data_checks(recipe: Recipe) -> list[Check]:
    """Guided Distillation: the unsupervised loss, labeled resampling, the strong view, unlabeled batches and the
    teacher the burn-in and the student start need."""
    s, d, t = recipe.ssl, recipe.data, recipe.train
    return [
        (s.unsup_loss_weight >= 0, "ssl.unsup_loss_weight", "must be >= 0"),
        (
            s.unsup_no_object_weight is None or 0 < s.unsup_no_object_weight <= 1,
            "ssl.unsup_no_object_weight",
            # 0 would divide the class loss of a batch without pseudo labels by a zero weight sum: NaN
            "must be null (the model's no_object_weight) or in (0, 1]",
        ),
        (
            s.pseudo_label_max_overlap is None or 0 <= s.pseudo_label_max_overlap < 1,
            "ssl.pseudo_label_max_overlap",
            "must be null (off) or in [0, 1)",
        ),
        (
            s.labeled_repeat_threshold is None or s.labeled_repeat_threshold > 0,
            "ssl.labeled_repeat_threshold",
            "must be null (uniform sampling) or > 0",
        ),
        (
            not (s.enabled and d.streaming and s.labeled_repeat_threshold is not None),
            "ssl.labeled_repeat_threshold",
            "needs an indexed labeled split, and data.streaming is on: a stream cannot be resampled by class "
            "frequency. Set ssl.labeled_repeat_threshold=null (labeled images drawn uniformly, what the reference "
            "does with streamed data) or data.streaming=false",
        ),
        (0 <= s.strong_hue <= 0.5, "ssl.strong_hue", "must be in [0, 0.5]"),
        (0 <= s.strong_grayscale_prob <= 1, "ssl.strong_grayscale_prob", "must be in [0, 1]"),
        (
            t.gradient_accumulation_steps <= 0
            or (s.unlabeled_batch_size % t.gradient_accumulation_steps == 0)
            and s.unlabeled_batch_size > 0,
            "ssl.unlabeled_batch_size",
            "must be > 0 and divisible by train.gradient_accumulation_steps",
        ),
        (
            not (s.enabled and s.burn_in_pseudo_labels and s.burn_in_steps > 0)
            or s.teacher is not None
            or s.train_teacher_first,
            "ssl.teacher",
            "is required for guided burn-in: give a phase-1 export, or set ssl.train_teacher_first: true",
        ),
        (
            not (
                s.enabled
                and s.student_init == "teacher"
                and not ((s.teacher is not None or s.train_teacher_first) and s.burn_in_pseudo_labels)
            ),
            "ssl.student_init",
            "is `teacher` (the student starts from the fixed teacher's weights), and this run has no fixed teacher "
            "(a burn-in on labeled data only, ssl.burn_in_pseudo_labels: false, is the earlier-work baseline). Set "
            "ssl.student_init=pretrained for that baseline, or give a guided burn-in its teacher",
        ),
    ]


def _layer_lr_decay_checks(recipe: Recipe) -> list[Check]:
    """The range of the ViT's layer-wise lr decay (which families apply it is each family's check)."""
    return [(0 < recipe.train.layer_lr_decay <= 1, "train.layer_lr_decay", "must lie in (0, 1] (1 = off; EoMT: 0.8)")]


def _repo_id_problem(repo_id: str | None) -> str | None:
    """Why `repo_id` can never name a Hub repository (checked at start, not at the final push), or None."""
    if repo_id is None:
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        return f"{repo_id!r} is not a valid repository id ({e}); write it as `user-or-org/name`"
    return None


def short_run_warnings(recipe: Recipe, steps_key: str = "train.max_steps") -> list[str]:
    """What makes a phase of `recipe` too short to learn or to show it (`steps_key`: the key that set its
    `train.max_steps`, `ssl.teacher_max_steps` for phase 1 of a one-launch run). Not errors: a smoke test is
    short on purpose; each names the key to change and a value that fits the run."""
    t, s = recipe.train, recipe.ssl
    steps, warnings = t.max_steps, []
    if t.warmup_steps >= steps:
        warnings.append(
            f"train.warmup_steps={t.warmup_steps} is not below {steps_key}={steps}: the learning rate never leaves "
            f"warm-up (at the last step it is {100 * steps / t.warmup_steps:.0f} % of train.lr), so the run learns "
            f"little; set train.warmup_steps to about a tenth of the run ({max(1, steps // 10)})"
        )
    elif t.warmup_steps > steps / 2:
        warnings.append(
            f"train.warmup_steps={t.warmup_steps} is over half of {steps_key}={steps}: most of the run trains below "
            f"train.lr; set train.warmup_steps to about a tenth of the run ({max(1, steps // 10)})"
        )
    lines = steps // t.log_every + (1 if steps % t.log_every else 0)  # (the last step always logs)
    if lines < 10 and t.log_every > 1:  # (at 1, every step logs already)
        warnings.append(
            f"train.log_every={t.log_every} gives {lines} metrics line{'s' if lines != 1 else ''} over "
            f"{steps_key}={steps}: curves.png has as many points; set train.log_every to {max(1, steps // 20)} or "
            "less for a readable curve"
        )
    if s.enabled and s.burn_in_steps >= steps:
        warnings.append(
            f"ssl.burn_in_steps={s.burn_in_steps} is not below train.max_steps={steps}: the run ends in guided "
            "burn-in and EMA distillation never starts; lower ssl.burn_in_steps or raise train.max_steps"
        )
    return warnings
