"""Recipe dataclasses: one documented field per YAML key (loaded by `gd_hf.config.load.load_recipe`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ModelConfig:
    """What network to build (see `gd_hf.models.build_model`)."""

    family: str = "mask2former"
    """The model family (`gd_hf.models`): `mask2former`: Mask2Former on the `backbone` below. `eomt`: EoMT ("Your
    ViT is Secretly an Image Segmentation Model"), a plain ViT whose last `eomt_query_blocks` blocks take the
    queries (`gd_hf.models.eomt`), sized by the `eomt_*` keys; the `backbone*`, `hidden_dim`, `encoder_layers`,
    `decoder_layers` and `dinov2_feature_layers` keys are Mask2Former's (and the `eomt_*` keys do not apply to
    it). A family of your own (`gd_hf.train.train(recipe, model_family=...)`): its `name`; it reads the keys it needs."""
    backbone: Literal["swin", "dinov2", "resnet"] = "swin"
    """Backbone family of the Mask2Former."""
    pretrained: str | None = None
    """Hub id or local folder to start from: backbone weights (e.g. `facebook/dinov2-base`,
    `microsoft/swin-tiny-patch4-window7-224`, `microsoft/resnet-50`) or a whole Mask2Former checkpoint
    (e.g. `facebook/mask2former-swin-tiny-coco-instance`, re-headed for the recipe's classes).
    EoMT: a DINOv2 checkpoint (`facebook/dinov2-*`, `facebook/dinov2-with-registers-*`: the ViT gets its weights,
    the query blocks' queries and the heads start fresh) or a whole EoMT checkpoint (re-headed).
    `null` builds the backbone from the sizes below with random weights."""
    backbone_hidden_size: int = 96
    """Random init only: Swin `embed_dim`, DINOv2 `hidden_size`, ResNet first-stage width."""
    backbone_depths: list[int] = field(default_factory=lambda: [2, 2, 6, 2])
    """Random init only: blocks per stage (Swin/ResNet, 4 stages); DINOv2 uses their sum as its layer count."""
    backbone_num_heads: list[int] = field(default_factory=lambda: [3, 6, 12, 24])
    """Random init only: attention heads per Swin stage; DINOv2 uses the last entry."""
    eomt_hidden_size: int = 1024
    """EoMT only, random init: the ViT's width (ViT-S 384, ViT-B 768, ViT-L 1024; a DINOv2 checkpoint brings
    its own)."""
    eomt_layers: int = 24
    """EoMT only, random init: the ViT's blocks (ViT-S/B 12, ViT-L 24)."""
    eomt_heads: int = 16
    """EoMT only, random init: attention heads (ViT-S 6, ViT-B 12, ViT-L 16)."""
    eomt_image_size: int = 640
    """EoMT only: the square input side. Its position embeddings do not interpolate, so every input is padded to
    exactly this (`data.crop_size` and the evaluation size may not exceed it)."""
    eomt_patch_size: int = 16
    """EoMT only: the ViT's patch size. DINOv2 checkpoints have 14; their patch embedding is resampled to this
    (FlexiViT's pseudo-inverse resize, as the EoMT reference's timm backbone does)."""
    eomt_query_blocks: int = 4
    """EoMT only: how many of the last ViT blocks take the queries (and train with masked attention)."""
    eomt_register_tokens: int = 4
    """EoMT only, random init: register tokens (a DINOv2 checkpoint brings its own count: 0, or 4 for
    `facebook/dinov2-with-registers-*`)."""
    eomt_mask_annealing: list[float] = field(default_factory=lambda: [0.16666667, 0.83333333])
    """EoMT only: [from, to] as fractions of the phase's `train.max_steps` (teacher: `ssl.teacher_max_steps`). The
    query blocks' masked attention is annealed away one block after another over this span (each block's
    probability from 1 to 0 over an equal share, poly 0.9), as the EoMT reference's 2-epoch-per-block schedule
    from epoch 2 to 10 of 12. Evaluation and exports always run without masks, as EoMT at inference."""
    eomt_teacher_masks: Literal["follow", "none"] = "follow"
    """EoMT only: how the EMA teacher predicts while the student still trains with masked attention. `follow`:
    with masks in the blocks where the student's probability is >= 0.5 (the model it averages was trained so);
    `none`: never (as at inference). The fixed burn-in teacher, trained to the end of its own annealing,
    always predicts without (benchmarks/RESULTS.md measures the two)."""
    dinov2_feature_layers: list[int] | None = None
    """DINOv2 only: which transformer layers feed the pixel decoder (1-based). `null` = 4 evenly spaced
    layers ending with the last one, e.g. [3, 6, 9, 12] for ViT-B."""
    hidden_dim: int = 256
    """Width of the pixel decoder and transformer decoder (Mask2Former `hidden_dim`, `feature_size`,
    `mask_feature_size`)."""
    encoder_layers: int = 6
    """Deformable-attention layers in the pixel decoder."""
    decoder_layers: int = 10
    """Masked-attention transformer decoder layers (the paper: 9 + the initial prediction)."""
    num_queries: int = 100
    """Object queries = the most instances the model can predict per image."""
    train_num_points: int = 12544
    """Points sampled per mask in the loss (the paper: 112 x 112 = 12,544)."""
    no_object_weight: float = 0.1
    """Weight of the 'no object' class in the classification loss."""
    class_weight: float = 2.0
    """Loss weight of the classification term."""
    mask_weight: float = 5.0
    """Loss weight of the mask binary cross-entropy term."""
    dice_weight: float = 5.0
    """Loss weight of the mask dice term."""


@dataclass
class HubColumns:
    """`data.source: hub` only: which columns/fields of the hub data set hold what (see gd_hf.data.sources)."""

    image: str = "image"
    """Image column (an `Image` feature, or bytes/path)."""
    image_id: str = "image_id"
    """Integer image-id column; without it, the row index is the id (map-style only)."""
    objects: str = "objects"
    """Objects column: a list of dicts, or a dict of lists, one entry per object."""
    category: str = "category"
    """Class field inside objects: an int (a `ClassLabel` gives the names) in 0..C-1."""
    segmentation: str = "segmentation"
    """Segmentation field inside objects: COCO polygons `[[x1, y1, ...], ...]` or RLE `{size, counts}`."""
    iscrowd: str = "iscrowd"
    """Optional crowd flag inside objects (crowd regions are never training targets)."""
    mask: str = "annotation"
    """With `data.mask_encoding`: the mask-image column (an `Image`; ImageFolder's `mask_file_name` -> `mask`)."""
    semantic_class_to_id: str = "semantic_class_to_id"
    """With `data.mask_encoding`: optional column `{class name: id}` (transformers' instance-segmentation example)."""
    instance_classes: str = "instance_classes"
    """`mask_encoding: instance_ids`: optional column `{instance id: class id}` of each image."""
    segments_info: str = "segments_info"
    """`mask_encoding: coco_panoptic`: the column of each image's segments (`id`, `category_id`, `iscrowd`)."""


@dataclass
class DataConfig:
    """Where the images and annotations are, how the labeled subset is chosen, and how images are augmented."""

    source: Literal["coco", "shards", "hub"] = "coco"
    """Where records come from: a COCO folder (`*_images` + `*_annotations`), Parquet shards / save_to_disk
    folders (`*_shards`), or a hub data set (`hub_*`). See `gd_hf.data.sources`."""
    train_images: str = "data/synthetic/train"
    """Folder of the training images (COCO `file_name`s are relative to it)."""
    train_annotations: str = "data/synthetic/annotations/instances_train.json"
    """COCO instances JSON of the training images."""
    val_images: str = "data/synthetic/val"
    """Folder of the validation images."""
    val_annotations: str = "data/synthetic/annotations/instances_val.json"
    """COCO instances JSON of the validation images (mask AP is computed against it)."""
    train_shards: str | None = None
    """`source: shards`: folder of the training shards (`python -m gd_hf.data.convert shards` writes one)."""
    val_shards: str | None = None
    """`source: shards`: folder of the validation shards."""
    hub_dataset: str | None = None
    """`source: hub`: data set id on the Hub (or a local folder `datasets.load_dataset` reads)."""
    hub_revision: str | None = None
    """`source: hub`: branch, tag or commit of the data set (`null` = main)."""
    hub_train_split: str = "train"
    """`source: hub`: split holding the training images."""
    hub_val_split: str = "validation"
    """`source: hub`: split holding the validation images."""
    hub_columns: HubColumns = field(default_factory=HubColumns)
    """`source: hub`: the column mapping."""
    category_names: list[str] | None = None
    """Class names in class-id order, when the source does not name them (shards without
    gd_hf_dataset.json, hub data sets without a ClassLabel). With `mask_encoding: semantic_instance_channels`
    (where class 0 is background) they name ids 1, 2, ... (or 0, 1, ... with a first name `background`)."""
    mask_encoding: Literal["semantic_instance_channels", "instance_ids", "cityscapes", "coco_panoptic"] | None = None
    """`source: hub`: the objects are a mask image (`hub_columns.mask`) in this encoding instead of an objects
    column (see `gd_hf.data.mask_images`). The COCO-folder equivalent is `python -m gd_hf.data.convert masks`."""
    classes_file: str | None = None
    """A JSON naming the classes: id2label `{"1": "cat"}`, label2id `{"cat": 1}`, a list of names, or a
    transformers config.json. For hub data sets whose classes are not a ClassLabel or a `semantic_class_to_id`."""
    crowd_masks_as_objects: bool = False
    """`source: coco`: read `iscrowd: 1` annotations as objects, in train (targets) and val (ground truth to
    detect). CVAT (and some other tools) export every mask instance as `iscrowd: 1` with an RLE; without this,
    those are ignored regions (COCO's meaning) and a split of mostly such objects has little to learn from (a
    warning names the count when they are the majority)."""
    drop_empty_categories: bool = False
    """`source: coco`: drop the categories that no training annotation uses from the class list (Roboflow's root
    category, say); they are always reported. Off by default: dropping renumbers the classes of the export."""
    records_cache: str | None = "auto"
    """`source: coco`: where the parsed, validated records of each instances JSON are kept as a memory-mapped
    `datasets` folder, so that a relaunch, a resume and every other process read them instead of parsing the
    JSON again (COCO train2017: minutes per parse, ~3 GB per process). `auto`: `$HF_DATASETS_CACHE/gd_hf_records`;
    a path: there; `null`: no cache (every process of every launch parses the JSON itself: N processes, N parses
    and N copies in memory). A cache is rebuilt when its JSON's content (SHA-256) changes."""
    unlabeled_images: str | None = None
    """A folder of extra images without labels, added to the unlabeled split (searched recursively)."""
    streaming: bool = False
    """Stream the training records (`datasets.IterableDataset`) instead of indexing them: for data sets too
    big to prepare up front. A resumed run continues each stream exactly where it stopped (each worker re-reads,
    without decoding images, the records it had read in the current epoch)."""
    shuffle_buffer: int = 1000
    """Streaming: records held in the shuffle buffer of each worker (the shard order is shuffled too)."""
    on_error: Literal["skip", "raise"] = "skip"
    """A training image that cannot be read or a record that misses a field: `skip` it (a warning, counted
    as `data_skipped` in the metrics log) or `raise` (stop the run naming it)."""
    labeled_percent: float = 100.0
    """Percentage of training images whose labels are used (the rest form the unlabeled split)."""
    split_seed: int = 0
    """Seed of the labeled-subset draw (same seed + same annotation file = same subset on every machine)."""
    split_file: str | None = None
    """A JSON file `{"labeled_image_ids": [...]}` or a text file with one image id per line; overrides
    `labeled_percent`."""
    generate_synthetic: bool = False
    """If the data folders are absent, write the synthetic data set there first (demo and tests)."""
    synthetic_train_images: int = 600
    """Synthetic set only: number of training images."""
    synthetic_val_images: int = 100
    """Synthetic set only: number of validation images."""
    synthetic_image_size: int = 256
    """Synthetic set only: side of the square images (the mean longer side with `synthetic_varied_sizes`)."""
    synthetic_varied_sizes: bool = False
    """Synthetic set only: images of mixed sizes and aspect ratios (4:3, 3:4, 1:1, 16:9, 9:16), as COCO's,
    instead of squares; with `min_scale` < 1 that is the paper's data path (crops and batches of many sizes)."""
    crop_size: int = 256
    """Training crop (square) after scale jitter; the reference uses 1024 on COCO."""
    min_scale: float = 0.1
    """Smallest scale-jitter factor (relative to `crop_size`)."""
    max_scale: float = 2.0
    """Largest scale-jitter factor."""
    hflip_prob: float = 0.5
    """Probability of a horizontal flip."""
    eval_shortest_edge: int = 800
    """Evaluation: images are resized so their shorter side is this long..."""
    eval_longest_edge: int = 1333
    """...and their longer side at most this long."""
    num_workers: int = 2
    """DataLoader worker processes per training process."""
    dataset_name: str | None = None
    """What model cards call the data set (e.g. `COCO 2017`); `null`: the hub data set's id, `gd_hf synthetic
    shapes` for the generated set, else `custom`."""


@dataclass
class TrainConfig:
    """Optimisation and the loop's bookkeeping."""

    max_steps: int = 90000
    """Optimizer steps in total."""
    batch_size: int = 16
    """Labeled images per optimizer step per process (split over `gradient_accumulation_steps`)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-4
    """Peak AdamW learning rate."""
    backbone_lr_multiplier: float = 0.1
    """The backbone's learning rate is `lr` times this."""
    layer_lr_decay: float = 1.0
    """EoMT only: layer-wise learning-rate decay of the ViT, as the EoMT reference's: block i of L (0-based)
    learns at `lr * backbone_lr_multiplier * layer_lr_decay ** (L - 1 - i)` (the last block at the full rate), the
    patch embedding, tokens and position table as block 0, the final norm at the full rate; 1.0 = off (the
    reference: 0.8)."""
    weight_decay: float = 0.05
    """AdamW weight decay (never applied to norms, biases, embeddings and position tables)."""
    warmup_steps: int = 0
    """Linear warm-up steps from 0 to `lr`."""
    schedule: Literal["poly", "cosine", "constant"] = "poly"
    """Learning-rate decay after warm-up."""
    poly_power: float = 0.9
    """Exponent of the poly schedule."""
    grad_clip: float = 0.01
    """Full-model gradient-norm clip (the reference: 0.01); 0 disables it."""
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    """`null` takes it from the accelerate config / `accelerate launch` flags."""
    max_nonfinite_steps: int = 10
    """A step whose loss or gradient is NaN/Inf is skipped (no optimizer or EMA update, counted as
    `nonfinite_steps` in the metrics log, over the whole run: checkpoints keep both counts); this many in a row
    stop the run, its last checkpoint kept (a streak goes on across a resume)."""
    undo_nonfinite_updates: bool = True
    """A step whose loss and gradient are finite but whose update makes a weight non-finite (a learning rate far
    too high) is taken back and counted like a non-finite step: a copy of the weights and the optimizer state is
    kept before every step (about 3x the trained parameters in memory). `false`: no copy; such a step stops the
    run at once (exit code 4), and nothing of it is written."""
    log_every: int = 20
    """Steps between metrics-log lines."""
    eval_every: int = 5000
    """Steps between val evaluations (also at the last step); 0 = only at the end."""
    checkpoint_every: int = 1000
    """Steps between resumable checkpoints (`accelerator.save_state`); 0 = only at the end."""
    keep_checkpoints: int = 2
    """How many resumable checkpoints to keep (oldest are deleted)."""
    report_to: str | list[str] = "tensorboard"
    """Where the metrics go besides `metrics.jsonl`, through Accelerate's trackers: `tensorboard` (the default;
    skipped with a warning when it is not installed), `wandb`, `mlflow`, `trackio`, a list of them, `all` (every
    one installed) or `none`. Tags are grouped (`train/`, `pseudo/`, `val/`, `teacher_check/`, `system/`), the
    resolved recipe (paths made public) is logged as hyperparameters, and the evaluation pictures go to trackers
    that take images (TensorBoard, wandb). wandb needs a login or `WANDB_MODE=offline`; mlflow logs to
    `MLFLOW_TRACKING_URI` (default `./mlruns`)."""


@dataclass
class EvalConfig:
    """Mask AP evaluation."""

    top_k: int = 100
    """Instances kept per image: top-k over all query x class scores (the reference: 100)."""
    batch_size: int = 2
    """Images per evaluation forward pass."""
    max_images: int | None = None
    """Evaluate on the first N val images only (quick checks); `null` = all."""
    pictures: int = 6
    """Images (0-32) in the pictures each evaluation writes to `OUTPUT/pictures/` (and the trackers): the model's
    predictions on the first N val images beside their truth, and, in phases 2-3, the teacher's pseudo labels on
    the weak views of the unlabeled images the student trained on just before (their hidden truth beside them
    when the data carry one). 0: none."""


@dataclass
class SslConfig:
    """Guided Distillation (phases 2-3): guided burn-in with a frozen teacher, then EMA distillation."""

    enabled: bool = False
    """Train a student semi-supervised; `false` = plain supervised training (phase 1, the teacher)."""
    teacher: str | None = None
    """The phase-1 teacher: an exported folder (`OUTPUT/best`) or hub id. Required for guided burn-in unless
    `train_teacher_first` is set."""
    train_teacher_first: bool = False
    """Run phase 1 first in the same launch (into `output_dir/teacher`, with `teacher_max_steps`), then use
    its best export as the teacher."""
    teacher_max_steps: int | None = None
    """Phase-1 steps when `train_teacher_first`; `null` = `train.max_steps`."""
    student_init: Literal["pretrained", "teacher"] = "pretrained"
    """Where the student's weights start. `pretrained` (the paper): where the teacher's did, `model.pretrained`
    (random weights when null). `teacher` (not in the paper): from the phase-1 teacher's export with a fresh class
    head, as `model.pretrained` set to `ssl.teacher` would (the student then starts from what the labels taught
    and spends its steps on the unlabeled images; measured in benchmarks/RESULTS.md, issue 34, third pass).
    Needs a guided burn-in's teacher (`ssl.teacher` or `train_teacher_first`)."""
    burn_in_steps: int = 50000
    """Steps with the frozen teacher; at this step teacher <- student, then EMA."""
    burn_in_pseudo_labels: bool = True
    """`true`: guided burn-in (labeled + pseudo labels from the frozen teacher, the paper). `false`: burn-in on
    labeled data only (the earlier-work baseline); no teacher needed."""
    ema_decay: float = 0.9996
    """teacher <- d * teacher + (1 - d) * student after every step of the EMA phase."""
    unsup_loss_weight: float = 2.0
    """loss = L_sup + weight * L_unsup."""
    unsup_no_object_weight: float | None = None
    """Not in the paper (`null` = off: the model's `model.no_object_weight`, 0.1, as the paper): the class-loss
    weight of "no object" in L_unsup alone. The teacher's misses become "no object" targets there. The class loss
    is a weighted mean over the unlabeled micro-batch, so a lower weight shifts it from the unmatched queries to
    the pseudo-labelled ones (in a micro-batch without pseudo labels it changes nothing). Measured in
    benchmarks/RESULTS.md (issue 34, second pass): 0.02 did not help there."""
    unlabeled_batch_size: int = 16
    """Unlabeled images per optimizer step per process (split over gradient_accumulation_steps)."""
    labeled_repeat_threshold: float | None = 10.0
    """Repeat-factor sampling of the labeled images in phases 2-3, as the reference (detectron2's
    RepeatFactorTrainingSampler, threshold 10): an image is drawn in proportion to max(1, sqrt(t / f)) of its
    rarest class, f = share of labeled images holding that class. `null` = every labeled image equally often
    (phase 1 always does that). Needs an indexed labeled split: `null` with `data.streaming`."""
    unlabeled_includes_labeled: bool = True
    """As the paper: the unlabeled stream is every training image (labels ignored); `false` = only the
    images outside the labeled split."""
    pseudo_label_score_threshold: float | Literal["auto"] = 0.7
    """Keep teacher queries whose max class probability exceeds this (the paper: 0.7, which assumes a calibrated,
    pretrained teacher). `auto`: the teacher check chooses it before distillation, on its val images: the lowest
    threshold of its sweep (0.05 to 0.95) whose pseudo labels reach `pseudo_label_target_precision`; a teacher
    that reaches it nowhere stops the run with the figures (`gd_hf.method.teacher_check`). Needs the check on and a
    fixed teacher (guided burn-in)."""
    pseudo_label_target_precision: float = 0.6
    """With `pseudo_label_score_threshold: auto`: the share of right pseudo labels (class and mask IoU >= 0.5)
    the chosen threshold must reach on the check's images."""
    pseudo_label_min_area: float = 5.0
    """Keep teacher queries whose soft mask area (sum of sigmoids) exceeds this many mask pixels."""
    pseudo_label_mask_threshold: float = 0.5
    """Pseudo-label mask = sigmoid(mask logit) > this."""
    pseudo_label_min_mask_pixels: int = 0
    """Not in the paper (0 = off): drop a pseudo label whose hard mask has fewer pixels than this (at the teacher's
    mask resolution). The soft-area rule passes a query whose mask sits just under the mask threshold, whose hard
    mask is then empty: a target "this class, no pixels". Logged either way (`pseudo_labels_small_mask_per_image`)."""
    pseudo_label_max_overlap: float | None = None
    """Not in the paper (`null` = off, as the paper): drop a pseudo label whose mask IoU with a higher-scoring
    one of the same image exceeds this (mask NMS, e.g. 0.5). Against teachers that fire twice on one object."""
    strong_erase_prob: float = 0.0
    """Random erasing on the student's view (not in the reference; 0 = off)."""
    strong_hue: float = 0.1
    """Strong view: largest hue shift of the colour jitter (the reference: 0.1). Set 0 when colour tells the
    classes apart (the synthetic set), or the student is trained on objects recoloured into another class."""
    strong_grayscale_prob: float = 0.2
    """Strong view: probability of turning the image gray (the reference: 0.2); 0 when colour is the class."""
    evaluate: Literal["student", "teacher", "both"] = "student"
    """Which model the periodic evaluation scores (the exported model is the student unless `teacher`)."""
    teacher_check: Literal["stop", "warn", "off"] = "stop"
    """Before the first step of phases 2-3 (with a trained teacher: `ssl.teacher` or phase 1 of this launch), its
    pseudo labels are measured on val under the recipe's rules (`gd_hf.method.teacher_check`). `stop`: a teacher that
    would mostly teach "no object" or wrong labels stops the run (exit code 2) before anything is written;
    `warn`: the same figures and a warning, then distillation; `off`: no check."""
    teacher_check_images: int = 200
    """Val images the teacher check measures (its cost: one teacher forward pass each)."""
    teacher_check_min_precision: float = 0.3
    """The check's rule: at least this share of the teacher's pseudo labels right (class and mask IoU >= 0.5)."""
    teacher_check_min_label_ratio: float = 0.1
    """... and at least this many pseudo labels per true object."""


@dataclass
class HubConfig:
    """Model cards and pushes to the Hugging Face Hub (the token comes from `hf auth login` / `HF_TOKEN`)."""

    push: bool = False
    """Push the final export (model, image processor, model card) to `repo_id` at the end of the run."""
    repo_id: str | None = None
    """Model repository, e.g. `your-name/mask2former-coco-1pct-gd` (created if absent)."""
    private: bool = False
    """Create the repository as private."""
    revision: str | None = None
    """Branch to push the final export to (created if absent); `null` = the default branch."""
    push_intermediate: bool = False
    """Also push the phase-1 teacher (branch `teacher`) and the student at the end of burn-in (branch
    `burn-in`), each as its own commit."""
    license: str = "apache-2.0"
    """License written into the model card."""
    retries: int = 4
    """Retries of a push after a transient failure (network, HTTP 429/5xx), with exponential back-off."""
    space_repo: str | None = None
    """After the final push, also write a Gradio Space for the pushed model (`python -m gd_hf.space`) and push it
    to this Space repository (e.g. `your-name/mask2former-coco-1pct-gd-demo`)."""


@dataclass
class Recipe:
    """A whole training run."""

    output_dir: str = "outputs/run"
    """Where checkpoints, exports (`final/`, `best/`), metrics.jsonl and COCO-JSON predictions go."""
    seed: int = 0
    """Seed of model init, data order and augmentation."""
    resume: str = "auto"
    """`auto`: continue from the newest readable checkpoint in `output_dir/checkpoints` if any (an unreadable
    newest one is passed over, saying so); `none`: start fresh (fails if the output folder already holds
    checkpoints); `force`: as `auto`, and also when the recipe changed keys that change what is trained (the
    change is recorded in `run_info.json` and the model card); or a checkpoint folder. A relaunch whose recipe
    differs from the run's in such keys stops without `force` (`MAY_CHANGE` in `gd_hf.run.launches` lists the
    keys that may change)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ssl: SslConfig = field(default_factory=SslConfig)
    hub: HubConfig = field(default_factory=HubConfig)
