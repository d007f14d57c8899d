"""Typed run configuration: dataclass schema, YAML presets, command-line overrides, validation.

A run's config is ``default.yaml <- --config files <- presets (model=NAME, spec=NAME) <- key=value overrides``.
Every key is checked against the schema before anything runs or is written: an unknown key or a value of the
wrong type raises :class:`ConfigError` naming the key and the closest valid one.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PRESET_KINDS = ("model", "spec")  # `model=vit_large` loads configs/model/vit_large.yaml, etc.


class ConfigError(ValueError):
    """A configuration problem found before the run starts."""


@dataclass
class StudentConfig:
    """The backbone (DINOv2 calls it `student`; the teacher is built identically)."""

    arch: str = "vit_small"
    """Size preset from dinospec.models.archs.ARCHS: vit_pico, vit_tiny, vit_small, vit_base, vit_large, vit_giant2."""
    patch_size: int = 14
    embed_dim: Optional[int] = None
    """Overrides of the arch preset (null = take the preset's value)."""
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    ffn_layer: Optional[str] = None
    """mlp | swiglu (null = the arch preset's)."""
    mlp_ratio: float = 4.0
    num_register_tokens: int = 0
    drop_path_rate: float = 0.1
    """Stochastic depth of the student (the teacher never drops)."""
    drop_path_mode: str = "auto"
    """row: the branch runs for every sample, dropped rows are zeroed | subset: the branch runs only for a random
    floor(B(1-rate)) samples, scaled by B/kept (DINOv2's trick: saves ~rate of the block's compute) | auto: subset
    when drop_path_rate > 0.1, as DINOv2."""
    layerscale: Optional[float] = 1.0e-5
    """LayerScale init value; null disables LayerScale."""
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    attn_backend: str = "sdpa"
    """sdpa (any device) | xformers (GPU only, optional install)."""
    interpolate_offset: float = 0.1
    """DINOv2's offset when interpolating position embeddings to another grid."""
    interpolate_antialias: bool = False
    pos_embed: str = "learned"
    """learned: a pos_embed parameter added to the tokens, interpolated for other grids (DINOv2) | rope: rotary
    positions of the patch tokens inside attention, nothing learned or interpolated (DINOv3)."""
    rope_base: Optional[float] = 100.0
    """RoPE periods base ** (j / (head_dim/4)), j = 0..head_dim/4-1 (DINOv3: 100)."""
    rope_min_period: Optional[float] = None
    """With rope_max_period: periods geometric from min to max (both included) instead of from the base."""
    rope_max_period: Optional[float] = None
    rope_normalize_coords: str = "separate"
    """Patch centres into (-1, 1): separate (each axis by its own length) | max | min (both by max/min(H, W))."""
    rope_shift_coords: Optional[float] = None
    """Training only: add uniform [-s, s] per axis to the coordinates (null = off)."""
    rope_jitter_coords: Optional[float] = None
    """Training only: scale each axis by its own log-uniform factor in [1/j, j] (null = off)."""
    rope_rescale_coords: Optional[float] = None
    """Training only: scale both axes by one log-uniform factor in [1/r, r] (null = off; DINOv3 ViT-S/16: 2)."""
    norm_eps: float = 1.0e-6
    """eps of every LayerNorm (DINOv2: 1e-6, DINOv3: 1e-5)."""
    pretrained_weights: Optional[str] = None
    """A dinospec export dir or a DINOv2-format checkpoint to initialise student and teacher backbones from."""


@dataclass
class SpecConfig:
    """Token-type specialization: which layers get one parameter set per token group, in which blocks.

    Block ranges: "none", "all", "0:8", "0:1/3" (fractions of depth, rounded), "first_third", "first_half",
    "2,5,7". Groups partition the token types cls / reg / patch.
    """

    groups: List[List[str]] = field(default_factory=lambda: [["cls"], ["reg", "patch"]])
    norm1: str = "none"
    qkv: str = "none"
    proj: str = "none"
    norm2: str = "none"
    mlp: str = "none"
    ls1: str = "none"
    ls2: str = "none"
    final_norm: bool = False


@dataclass
class DinoConfig:
    loss_weight: float = 1.0
    head_n_prototypes: int = 65536
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    head_hidden_dim: int = 2048
    koleo_loss_weight: float = 0.1
    koleo_scope: str = "rank"
    """rank (per-rank batch, as DINOv2) | global (all ranks gathered: the same loss for any number of ranks)."""


@dataclass
class IbotConfig:
    loss_weight: float = 1.0
    mask_sample_probability: float = 0.5
    mask_ratio_min_max: List[float] = field(default_factory=lambda: [0.1, 0.5])
    separate_head: bool = False
    head_n_prototypes: int = 65536
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    head_hidden_dim: int = 2048


@dataclass
class TeacherConfig:
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30
    student_temp: float = 0.1
    centering: str = "sinkhorn_knopp"
    """sinkhorn_knopp | centering (softmax with an EMA centre)."""
    center_momentum: float = 0.9
    sinkhorn_iterations: int = 3


@dataclass
class OptimConfig:
    epochs: int = 100
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    base_lr: float = 0.004
    """Learning rate at a total batch of 1024; scaled by `scaling_rule`."""
    scaling_rule: str = "sqrt_wrt_1024"
    """sqrt_wrt_1024 | linear_wrt_256 | none."""
    warmup_epochs: int = 10
    min_lr: float = 1.0e-6
    clip_grad: float = 3.0
    freeze_last_layer_epochs: int = 1
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999


@dataclass
class CropsConfig:
    global_crops_scale: List[float] = field(default_factory=lambda: [0.32, 1.0])
    local_crops_number: int = 8
    local_crops_scale: List[float] = field(default_factory=lambda: [0.05, 0.32])
    global_crops_size: int = 224
    local_crops_size: int = 98
    blur_probabilities: str = "intended"
    """intended (global-1 1.0, global-2 0.1, local 0.5) | upstream (DINOv2/v3 code as shipped: global ones swapped)."""
    blur_sigma: List[float] = field(default_factory=lambda: [0.1, 2.0])
    """Gaussian blur sigma range in pixels of the crop (DINOv2's, for 224/98 px crops); small images want less."""


@dataclass
class GramConfig:
    """Gram anchoring (DINOv3): the student's patch Gram matrix kept close to a frozen earlier teacher's
    (dinospec/ssl/gram_teacher.py). Loss options as DINOv3's gram.* keys (dinospec/ssl/gram.py)."""

    enabled: bool = False
    loss_weight: float = 1.0
    start_step: int = 0
    """Step at which the Gram teacher is taken from the EMA teacher and the loss starts."""
    refresh_period_steps: int = 0
    """Retake the Gram teacher every this many steps after start_step (0 = never; DINOv3: 10000)."""
    img_size: Optional[int] = None
    """Crop size the Gram teacher sees (the global crops upsampled; null = crops.global_crops_size); its patch
    grid is resized onto the student's."""
    normalized: bool = True
    img_level: bool = True
    """One Gram matrix per image (DINOv3's Gram recipes); false: one over the whole batch (B*N)^2."""
    remove_neg: bool = False
    remove_only_teacher_neg: bool = False
    tokens_used: str = "all"
    """all | masked | unmasked (the last two need img_level=false)."""


@dataclass
class DistillConfig:
    """Distillation (DINOv3): a frozen teacher backbone teaches the `student` (and any extra students) with the
    DINO / iBOT objectives (dinospec/ssl/distill.py). The EMA of the students is exported, as in any run."""

    enabled: bool = False
    teacher: Optional[str] = None
    """The frozen teacher: a dinospec run or step directory (its EMA teacher with its trained heads and loss
    centres), a dinospec export dir, or a DINOv2 / DINOv3 weights file (heads then frozen at a seeded random init)."""
    students: List[Dict[str, Any]] = field(default_factory=list)
    """Extra students trained in the same job beside the main one, each a mapping of `student.*` keys that differ
    from the main student's plus an optional `spec` preset name, e.g. [{arch: vit_tiny}, {arch: vit_small,
    spec: paper}]. The patch size must be the main student's (one mask grid, one teacher patch grid)."""


@dataclass
class DataSource:
    """One dataset of a mixture (data.sources)."""

    path: str = "???"
    kind: str = "auto"
    weight: float = 1.0
    """Share of the stream (weights are normalised over the sources)."""


@dataclass
class DataConfig:
    path: str = "data/demo"
    """An image folder (labels from subfolders if any), a file list (.txt), or a folder/glob of .tar shards."""
    kind: str = "auto"
    """auto | folder | filelist | tar."""
    num_workers: int = 8
    pin_memory: bool = True
    sources: List[DataSource] = field(default_factory=list)
    """A mixture: [{path, weight, kind}, ...] in one resumable stream (replaces data.path when not empty)."""
    order: str = "auto"
    """Per-pass sample order: auto (shard_window for tar shards, randperm otherwise) | randperm (a full permutation
    array per pass, the order before shard indexes) | feistel (a full shuffle computed per position) | shard_window
    (shards permuted, samples shuffled within windows of data.window_shards shards)."""
    window_shards: int = 16
    """Shards per shuffle window of the shard_window order."""
    max_open_shards: int = 32
    """Open tar shards per data-loader process (least recently used closed first)."""
    index_workers: int = 4
    """Processes that index the shards when no index exists yet (`dinospec index` builds it ahead)."""


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    batch_size_per_gpu: int = 64
    official_epoch_length: int = 1250
    """Iterations per "epoch" (DINOv2's OFFICIAL_EPOCH_LENGTH): schedules count in these epochs."""
    max_steps: Optional[int] = None
    """Stop after this many steps (null = optim.epochs * official_epoch_length); the schedules keep their length."""
    log_every: int = 10
    nonfinite: str = "stop"
    """What a non-finite loss does: stop (error naming the step) | skip (drop the step, up to max_nonfinite_skips)."""
    max_nonfinite_skips: int = 10
    deterministic: bool = False
    """Deterministic kernels (bitwise-reproducible CPU runs; slower on GPU)."""
    init_from: Optional[str] = None
    """Start a new phase from another run's checkpoint (a run dir or step dir): student, teacher, heads and loss
    centres, a learned pos_embed resized to the crop size; fresh optimizer and schedules (dinospec/phase.py).
    Ignored once this run has checkpoints of its own (it resumes from them)."""


@dataclass
class ComputeConfig:
    device: str = "auto"
    """auto | cpu | cuda."""
    precision: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16."""
    compile: bool = False
    """torch.compile each backbone block."""
    num_threads: Optional[int] = None
    """torch intra-op threads per rank (null = $OMP_NUM_THREADS if set, else CPU cores / ranks on the node - data
    workers, at least 1: an oversubscribed CPU runs many times slower)."""
    strategy: str = "auto"
    """auto (FSDP2 on GPU with >1 rank, DDP on CPU with >1 rank, plain module alone) | fsdp | ddp | none."""


@dataclass
class CheckpointConfig:
    period_steps: int = 1000
    keep_last: int = 3
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this (0 = none)."""
    async_save: bool = False


@dataclass
class EvaluationConfig:
    """Evaluation while pretraining (DINOv2: `evaluation`); the standalone evaluations are `dinospec eval`."""

    knn_period_steps: int = 0
    """k-NN of the teacher backbone every this many steps, after step 1 and at the last step (0 = never); logged in
    metrics.jsonl as knn_top1_k10 / knn_top1_k20 (%)."""
    knn_train: Optional[str] = None
    """Labelled image folder (one subfolder per class): the k-NN memory."""
    knn_val: Optional[str] = None
    """Labelled image folder with the same classes, classified by its nearest knn_train neighbours."""
    knn_img_size: Optional[int] = None
    """Evaluation image size (null = crops.global_crops_size)."""
    knn_batch_size: int = 64


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "dinospec"
    entity: Optional[str] = None
    mode: str = "online"
    """online | offline."""
    name: Optional[str] = None


@dataclass
class LoggingConfig:
    progress: bool = True
    plots: bool = True
    collapse_patience_steps: int = 100
    """Warn once when the DINO targets stay within 1e-3 nats of uniform for this many steps (0 = never): the
    [CLS] loss is then stuck at ln K (see dinospec/ssl/diagnostics.py)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class RunConfig:
    student: StudentConfig = field(default_factory=StudentConfig)
    spec: SpecConfig = field(default_factory=SpecConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    ibot: IbotConfig = field(default_factory=IbotConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    gram: GramConfig = field(default_factory=GramConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)


# ----------------------------------------------------------------------------------------------------------------
# validation with suggestions


def _schema_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            full = f"{prefix}{k}"
            keys.append(full)
            keys.extend(_schema_keys(node._get_node(k), full + "."))
    return keys


def _check_keys(schema: DictConfig, update: Any, source: str, prefix: str = "") -> None:
    """Raise ConfigError for the first key of `update` the schema does not have, with the closest valid key."""
    if not isinstance(update, DictConfig):
        return
    for k in update.keys():
        full = f"{prefix}{k}"
        if k not in schema:
            candidates = _schema_keys(OmegaConf.structured(RunConfig))
            close = difflib.get_close_matches(full, candidates, n=1, cutoff=0.4)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{full}' (from {source}){hint}")
        sub = schema._get_node(k)
        if isinstance(sub, DictConfig) and not OmegaConf.is_missing(update, k):
            _check_keys(sub, update._get_node(k), source, full + ".")


def _merge(base: DictConfig, update: DictConfig, source: str) -> DictConfig:
    _check_keys(base, update, source)
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        raise ConfigError(f"bad value for config key '{key}' (from {source}): {msg}") from None


def preset_path(kind: str, name: str) -> Path:
    path = CONFIG_DIR / kind / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.yaml"))
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown {kind} preset '{name}' (available: {', '.join(names)}){hint}")
    return path


def _load_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    cfg = OmegaConf.load(path)
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping")
    return cfg


def load_config(config_files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> DictConfig:
    """Build a validated run config: default.yaml <- config_files <- presets <- dotlist overrides."""
    cfg = OmegaConf.structured(RunConfig)
    cfg = _merge(cfg, _load_yaml(CONFIG_DIR / "default.yaml"), "configs/default.yaml")
    for f in config_files:
        cfg = _merge(cfg, _load_yaml(Path(f)), str(f))
    dotlist = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        if key in PRESET_KINDS:
            if key == "spec":  # a spec preset replaces the whole section, so presets never mix
                cfg.spec = OmegaConf.structured(SpecConfig)
            cfg = _merge(cfg, _load_yaml(preset_path(key, value)), f"{key}={value}")
        else:
            dotlist.append(item)
    for item in dotlist:  # one at a time, so an error names its own override
        key, value = item.split("=", 1)
        if key.startswith("spec.") and ":" in value and value[:1] not in "'\"":
            item = f"{key}='{value}'"  # unquoted, YAML reads the block range 4:8 as the base-60 integer 248
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"override '{item}'")
    OmegaConf.set_readonly(cfg, False)
    validate(cfg)
    return cfg


_CHOICES = {
    "student.ffn_layer": (None, "mlp", "swiglu"),
    "student.attn_backend": ("sdpa", "xformers"),
    "student.drop_path_mode": ("auto", "row", "subset"),
    "dino.koleo_scope": ("rank", "global"),
    "teacher.centering": ("sinkhorn_knopp", "centering"),
    "optim.scaling_rule": ("sqrt_wrt_1024", "linear_wrt_256", "none"),
    "crops.blur_probabilities": ("intended", "upstream"),
    "data.kind": ("auto", "folder", "filelist", "tar"),
    "data.order": ("auto", "randperm", "feistel", "shard_window"),
    "train.nonfinite": ("stop", "skip"),
    "compute.device": ("auto", "cpu", "cuda"),
    "student.pos_embed": ("learned", "rope"),
    "student.rope_normalize_coords": ("separate", "max", "min"),
    "compute.precision": ("auto", "fp32", "bf16"),
    "compute.strategy": ("auto", "fsdp", "ddp", "none"),
    "logging.wandb.mode": ("online", "offline"),
    "gram.tokens_used": ("all", "masked", "unmasked"),
}


# numeric ranges: key -> (lowest, highest, lowest allowed?, highest allowed?); None = unbounded; null values pass
_RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "student.patch_size": (1, None, True, True),
    "student.embed_dim": (1, None, True, True),
    "student.depth": (1, None, True, True),
    "student.num_heads": (1, None, True, True),
    "student.mlp_ratio": (0, None, False, True),
    "student.num_register_tokens": (0, None, True, True),
    "student.drop_path_rate": (0, 1, True, False),
    "student.layerscale": (0, None, False, True),
    "student.interpolate_offset": (0, None, True, True),
    "dino.loss_weight": (0, None, True, True),
    "dino.head_n_prototypes": (1, None, True, True),
    "dino.head_bottleneck_dim": (1, None, True, True),
    "dino.head_nlayers": (1, None, True, True),
    "dino.head_hidden_dim": (1, None, True, True),
    "dino.koleo_loss_weight": (0, None, True, True),
    "ibot.loss_weight": (0, None, True, True),
    "ibot.mask_sample_probability": (0, 1, True, True),
    "ibot.head_n_prototypes": (1, None, True, True),
    "ibot.head_bottleneck_dim": (1, None, True, True),
    "ibot.head_nlayers": (1, None, True, True),
    "ibot.head_hidden_dim": (1, None, True, True),
    "teacher.momentum_teacher": (0, 1, True, True),
    "teacher.final_momentum_teacher": (0, 1, True, True),
    "teacher.warmup_teacher_temp": (0, None, True, True),  # 0 is a NaN on purpose (tests/test_resume.py)
    "teacher.teacher_temp": (0, None, True, True),  # 0 too (tests/test_resume.py)
    "teacher.warmup_teacher_temp_epochs": (0, None, True, True),
    "teacher.student_temp": (0, None, False, True),
    "teacher.center_momentum": (0, 1, True, True),
    "teacher.sinkhorn_iterations": (1, None, True, True),
    "optim.epochs": (1, None, True, True),
    "optim.weight_decay": (0, None, True, True),
    "optim.weight_decay_end": (0, None, True, True),
    "optim.base_lr": (0, None, True, True),
    "optim.warmup_epochs": (0, None, True, True),
    "optim.min_lr": (0, None, True, True),
    "optim.clip_grad": (0, None, True, True),  # 0: no clipping
    "optim.freeze_last_layer_epochs": (0, None, True, True),
    "optim.layerwise_decay": (0, 1, False, True),
    "optim.patch_embed_lr_mult": (0, None, True, True),
    "optim.adamw_beta1": (0, 1, True, False),
    "optim.adamw_beta2": (0, 1, True, False),
    "crops.local_crops_number": (0, None, True, True),
    "crops.global_crops_size": (1, None, True, True),
    "crops.local_crops_size": (1, None, True, True),
    "data.num_workers": (0, None, True, True),
    "data.window_shards": (1, None, True, True),
    "data.max_open_shards": (1, None, True, True),
    "data.index_workers": (1, None, True, True),
    "train.seed": (0, None, True, True),
    "train.batch_size_per_gpu": (1, None, True, True),
    "train.official_epoch_length": (1, None, True, True),
    "train.max_steps": (1, None, True, True),
    "train.log_every": (1, None, True, True),
    "train.max_nonfinite_skips": (0, None, True, True),
    "compute.num_threads": (1, None, True, True),
    "checkpoint.period_steps": (1, None, True, True),
    "checkpoint.keep_last": (0, None, True, True),  # 0: keep all
    "checkpoint.keep_every": (0, None, True, True),
    "evaluation.knn_period_steps": (0, None, True, True),
    "evaluation.knn_img_size": (1, None, True, True),
    "evaluation.knn_batch_size": (1, None, True, True),
    "student.norm_eps": (0, None, False, True),
    "student.rope_base": (0, None, False, True),
    "student.rope_min_period": (0, None, False, True),
    "student.rope_max_period": (0, None, False, True),
    "student.rope_shift_coords": (0, None, True, True),
    "student.rope_jitter_coords": (1, None, True, True),  # a factor range [1/j, j]
    "student.rope_rescale_coords": (1, None, True, True),
    "logging.collapse_patience_steps": (0, None, True, True),  # 0: never
    "gram.loss_weight": (0, None, True, True),
    "gram.start_step": (0, None, True, True),
    "gram.refresh_period_steps": (0, None, True, True),  # 0: never
    "gram.img_size": (1, None, True, True),
}


def _check_ranges(cfg: DictConfig) -> None:
    """Every numeric key in its range, so a bad value is one line now, not a ZeroDivisionError after a step."""
    for key, (lo, hi, lo_ok, hi_ok) in _RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        low = lo is not None and (value < lo or (value == lo and not lo_ok))
        high = hi is not None and (value > hi or (value == hi and not hi_ok))
        if low or high:
            if hi is None:
                allowed = f"{'>=' if lo_ok else '>'} {lo:g}"
            else:
                allowed = f"in {'[' if lo_ok else '('}{lo:g}, {hi:g}{']' if hi_ok else ')'}"
            raise ConfigError(f"config key '{key}' = {value!r} must be {allowed}")


def validate(cfg: DictConfig) -> None:
    """Semantic checks the type system cannot express (choices, ranges, spec syntax)."""
    _check_ranges(cfg)
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices if c is not None], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"config key '{key}' = {value!r} is not one of {list(choices)}{hint}")
    # torch-free modules: a refused config costs well under a second on every command (tests/test_edges.py)
    from dinospec.models.archs import arch_kwargs
    from dinospec.models.spec_ranges import SpecError, resolve_spec

    try:
        kw = arch_kwargs(cfg.student)
        resolve_spec(cfg.spec, kw["depth"])
    except (SpecError, KeyError, ValueError) as e:
        raise ConfigError(str(e)) from None
    if cfg.student.pos_embed == "rope":
        from dinospec.models.rope_config import check_rope_settings, rope_settings  # torch-free

        try:  # head dim divisible by 4, base or min/max period, augmentation ranges
            check_rope_settings(kw["embed_dim"] // kw["num_heads"], **rope_settings(cfg.student))
        except ValueError as e:
            raise ConfigError(f"student.rope_*: {e}") from None
    if not cfg.student.norm_eps > 0:
        raise ConfigError(f"config key 'student.norm_eps' = {cfg.student.norm_eps} must be > 0")
    for name in ("global_crops_scale", "local_crops_scale"):
        lo, hi = cfg.crops[name]
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"config key 'crops.{name}' = {[lo, hi]} must satisfy 0 < min <= max <= 1")
    lo, hi = cfg.crops.blur_sigma
    if not 0 < lo <= hi:
        raise ConfigError(f"config key 'crops.blur_sigma' = {[lo, hi]} must satisfy 0 < min <= max")
    lo, hi = cfg.ibot.mask_ratio_min_max
    if not 0 <= lo <= hi < 1:
        raise ConfigError(f"config key 'ibot.mask_ratio_min_max' = {[lo, hi]} must satisfy 0 <= min <= max < 1")
    for name in ("global_crops_size", "local_crops_size"):
        if cfg.crops[name] % cfg.student.patch_size:
            raise ConfigError(
                f"config key 'crops.{name}' = {cfg.crops[name]} is not a multiple of "
                f"student.patch_size = {cfg.student.patch_size}"
            )
    for k, source in enumerate(cfg.data.sources):
        if OmegaConf.is_missing(source, "path"):
            raise ConfigError(f"config key 'data.sources[{k}].path' is missing (each source needs a path)")
        if source.kind not in _CHOICES["data.kind"]:
            raise ConfigError(f"config key 'data.sources[{k}].kind' = {source.kind!r} is not one of "
                              f"{list(_CHOICES['data.kind'])}")
        if not 0 < source.weight < float("inf"):
            raise ConfigError(f"config key 'data.sources[{k}].weight' = {source.weight!r} must be > 0")
    if cfg.train.init_from and cfg.student.pretrained_weights:
        raise ConfigError("config keys 'train.init_from' and 'student.pretrained_weights' are exclusive: a new phase "
                          "loads the whole model from the run it continues (unset student.pretrained_weights)")
    gram = cfg.gram
    if gram.enabled:
        if gram.remove_neg and gram.remove_only_teacher_neg:
            raise ConfigError("config keys 'gram.remove_neg' and 'gram.remove_only_teacher_neg' are exclusive")
        if gram.tokens_used != "all" and gram.img_level:
            raise ConfigError(f"config key 'gram.tokens_used' = {gram.tokens_used!r} pools the kept tokens of all "
                              f"images: it needs 'gram.img_level' = false")
        if gram.img_size is not None and gram.img_size % cfg.student.patch_size:
            raise ConfigError(f"config key 'gram.img_size' = {gram.img_size} is not a multiple of "
                              f"student.patch_size = {cfg.student.patch_size}")
    if cfg.distill.enabled or cfg.distill.students:
        _check_distill(cfg)
    knn = cfg.evaluation
    if knn.knn_period_steps and not (knn.knn_train and knn.knn_val):
        raise ConfigError("config key 'evaluation.knn_period_steps' > 0 needs 'evaluation.knn_train' and "
                          "'evaluation.knn_val' (labelled image folders)")


DISTILL_SPEC_KEY = "spec"  # the one key of a distill.students entry that is not a student.* key


def distill_members(cfg: DictConfig) -> list[tuple[DictConfig, DictConfig]]:
    """(student section, spec section) of every student a run trains: the main one, then distill.students in order
    (each the main student with its overrides; its spec preset, else the main spec). ConfigError on a bad entry."""
    members = [(cfg.student, cfg.spec)]
    for k, entry in enumerate(cfg.distill.students, start=1):
        where = f"distill.students[{k - 1}]"
        if not isinstance(entry, DictConfig):
            raise ConfigError(f"config key '{where}' must be a mapping of student.* keys (and spec), got {entry!r}")
        overrides = OmegaConf.to_container(entry)
        spec_name = overrides.pop(DISTILL_SPEC_KEY, None)
        unknown = sorted(set(overrides) - set(cfg.student.keys()))
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(cfg.student.keys()), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"config key '{where}.{unknown[0]}' is not a student.* key (nor 'spec'){hint}")
        student = _merge(OmegaConf.structured(StudentConfig), cfg.student, where)
        reset = {"pretrained_weights": None}  # the main student's weights are not another size's
        if "arch" in overrides:  # a size preset brings its own sizes, not the main student's explicit ones
            reset.update(embed_dim=None, depth=None, num_heads=None, ffn_layer=None)
        student = _merge(student, OmegaConf.create({**reset, **overrides}), where)
        spec = cfg.spec
        if spec_name is not None:
            preset = _load_yaml(preset_path("spec", str(spec_name)))
            spec = _merge(OmegaConf.structured(RunConfig), preset, f"{where}.spec={spec_name}").spec
        members.append((student, spec))
    return members


def _check_distill(cfg: DictConfig) -> None:
    """Distillation's checks: a teacher, well-formed extra students on one patch grid, no other teacher-side phase."""
    from dinospec.models.archs import arch_kwargs
    from dinospec.models.spec_ranges import SpecError, resolve_spec

    d = cfg.distill
    if not d.enabled:
        raise ConfigError("config key 'distill.students' is set but 'distill.enabled' = false (set it true, or "
                          "empty the list)")
    if not d.teacher:
        raise ConfigError("config key 'distill.enabled' = true needs 'distill.teacher': a dinospec run or export "
                          "dir, or a DINOv2 / DINOv3 weights file")
    for key, why in (("train.init_from", "a distillation run starts its students fresh or from "
                                         "student.pretrained_weights"),
                     ("gram.enabled", "Gram anchoring is not wired into distillation")):
        if OmegaConf.select(cfg, key):
            raise ConfigError(f"config keys 'distill.enabled' and '{key}' are exclusive ({why})")
    for k, (student, spec) in enumerate(distill_members(cfg)[1:]):
        where = f"distill.students[{k}]"
        for key, choices in _CHOICES.items():
            if key.startswith("student.") and student[key[8:]] not in choices:
                raise ConfigError(f"config key '{where}.{key[8:]}' = {student[key[8:]]!r} is not one of "
                                  f"{list(choices)}")
        try:
            resolve_spec(spec, arch_kwargs(student)["depth"])
        except (SpecError, KeyError, ValueError) as e:
            raise ConfigError(f"{where}: {e.args[0] if isinstance(e, KeyError) else e}") from None
        if student.patch_size != cfg.student.patch_size:
            raise ConfigError(f"config key '{where}.patch_size' = {student.patch_size} differs from "
                              f"student.patch_size = {cfg.student.patch_size}: every student shares the iBOT "
                              f"masks and the teacher's patch targets, so one patch grid")
        if student.pos_embed == "rope":
            from dinospec.models.rope_config import check_rope_settings, rope_settings

            kw = arch_kwargs(student)
            try:
                check_rope_settings(kw["embed_dim"] // kw["num_heads"], **rope_settings(student))
            except ValueError as e:
                raise ConfigError(f"{where}: rope: {e}") from None


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def as_container(cfg: DictConfig | ListConfig) -> Any:
    return OmegaConf.to_container(cfg, resolve=True)


def flat_keys(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as {"dotted.key": leaf} (lists are leaves), for comparing two configs key by key."""
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    out: dict[str, Any] = {}
    for k, v in node.items():
        out.update(flat_keys(v, f"{prefix}{k}."))
    return out


# keys whose change makes a checkpoint unusable (the model or its heads would not match)
INCOMPATIBLE_KEYS = ("student", "spec", "dino.head_", "ibot.head_", "ibot.separate_head", "crops.global_crops_size",
                     "distill.enabled", "distill.students")


def check_compatible(saved_yaml: str, cfg: DictConfig) -> list[str]:
    """Raise ConfigError when the saved run's model differs; return the compatible keys that changed."""
    old, new = flat_keys(OmegaConf.to_container(OmegaConf.create(saved_yaml))), flat_keys(OmegaConf.to_container(cfg))
    old = {"distill.enabled": False, "distill.students": [], **old}  # runs saved before distillation existed
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    bad = [k for k in changed if k.startswith(INCOMPATIBLE_KEYS)]
    if bad:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in bad[:6])
        raise ConfigError(f"the checkpoint was written by an incompatible config ({detail}); "
                          f"use another train.output_dir or --no-resume with a new directory")
    return changed
