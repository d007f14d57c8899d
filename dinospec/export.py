"""Exports: a run's backbone, or released weights, as model.safetensors + config.json, rebuilt later without pickle
(the `dinospec export` command itself is dinospec/export_cmd.py, which parses its arguments before torch loads).

From a weights file (DINOv2 / DINOv3 format, or a dinospec export dir) the architecture is read from the weights
and the settings from their family (interpolation of DINOv2's register models, DINOv3's RoPE); ``spec=NAME`` or
``spec.*`` / ``student.*`` overrides convert it, e.g. into a specialised backbone that computes what the released
one computes, without a training step.

Load an export with ``dinospec.load_backbone(DIR)``, ``torch.hub.load(REPO, "dinospec_backbone", source="local",
weights=DIR)`` or, for --format timm, with the timm call the command prints (also in the export's README.md).
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from dinospec.models.spec_ranges import explicit_config, vanilla_config
from dinospec.models.specialize import SpecError, routed_to_vanilla
from dinospec.models.vit import VisionTransformer, arch_kwargs, build_backbone
from dinospec.weight_formats import DINOV3_NORM_GROUPS, ImportedWeights, infer_student
from dinospec.weights import (CONFIG_FILE, WEIGHTS_FILE, load_into, load_weights, timm_model_args,
                              to_timm_state_dict)

FORMAT_VERSION = 1
# the student keys build_backbone reads besides the arch sizes; pretrained_weights / drop_path_rate are training-only
_STUDENT_KEYS = ("arch", "patch_size", "mlp_ratio", "num_register_tokens", "layerscale", "qkv_bias", "proj_bias",
                 "ffn_bias", "attn_backend", "interpolate_offset", "interpolate_antialias", "pos_embed",
                 "rope_base", "rope_min_period", "rope_max_period", "rope_normalize_coords", "rope_shift_coords",
                 "rope_jitter_coords", "rope_rescale_coords", "norm_eps")


class ExportError(ValueError):
    """A run, checkpoint or export directory that cannot be used as asked."""


def _plain(obj: Any) -> Any:
    """OmegaConf containers / tuples -> JSON-ready dicts and lists."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or type(obj).__name__ == "ListConfig":
        return [_plain(v) for v in obj]
    return obj


def _version() -> str:
    try:
        return importlib.metadata.version("dinospec")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ----------------------------------------------------------------------------------------------------------------
# reading a run


def resolve_step_dir(run_dir: str | Path, step: int | None = None) -> Path:
    """<run>/checkpoints/step_<N>: the given step, else the one the `latest` pointer names."""
    ckpts = Path(run_dir) / "checkpoints"
    if not ckpts.is_dir():
        raise ExportError(f"{run_dir} is not a run directory (no checkpoints/ inside)")
    if step is None:
        latest = ckpts / "latest"
        if not latest.is_file():
            raise ExportError(f"{ckpts} has no 'latest' pointer: name a step with --step")
        name = latest.read_text().strip()
    else:
        name = f"step_{step}"
    step_dir = ckpts / name
    if not step_dir.is_dir():
        have = sorted(p.name for p in ckpts.glob("step_*"))
        raise ExportError(f"no checkpoint {step_dir} (available: {', '.join(have) or 'none'})")
    return step_dir


def read_backbone_state(step_dir: Path, which: str = "teacher") -> dict[str, Tensor]:
    """The teacher's (or student's) backbone state of one checkpoint, keys as VisionTransformer names them."""
    from dinospec.checkpoint import CheckpointError, load_model_state  # verifies the manifest; no unsafe unpickling

    try:
        with warnings.catch_warnings():  # DCP's "no process group: loading in one process" is what we want
            warnings.simplefilter("ignore", UserWarning)
            return load_model_state(step_dir, prefix=f"{which}.backbone.")
    except CheckpointError as e:
        raise ExportError(str(e)) from None


def step_config(step_dir: Path) -> Any:
    """The run config a checkpoint was written with (its own copy, else its run directory's)."""
    from dinospec.config import load_config

    for path in (step_dir / "config.yaml", step_dir.parent.parent / "config.yaml"):
        if path.is_file():
            return load_config([path])
    raise ExportError(f"no config.yaml in {step_dir} or its run directory")


# ----------------------------------------------------------------------------------------------------------------
# writing and loading exports


def export_config(student: Mapping[str, Any], spec: Mapping[str, Any], img_size: int,
                  source: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """config.json: every size resolved, so the backbone rebuilds without the run's config or dinospec's presets."""
    student = _plain(student)
    resolved = {key: student[key] for key in _STUDENT_KEYS if key in student}  # older exports lack newer keys
    resolved.update(arch_kwargs(student), drop_path_rate=0.0)
    return {"format": "dinospec", "format_version": FORMAT_VERSION, "dinospec_version": _version(),
            "student": resolved, "img_size": img_size, "spec": explicit_config(_plain(spec), resolved["depth"]),
            "source": _plain(source or {})}


def _write_dir(out_dir: Path, state: Mapping[str, Tensor], config: dict[str, Any], readme: str,
               force: bool) -> Path:
    """Write the files in a hidden temporary dir, then move each in whole; config.json, moved last, completes it."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if (out_dir / WEIGHTS_FILE).exists() and not force:
        raise ExportError(f"{out_dir} already holds an export (pass --force to overwrite it)")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).unlink(missing_ok=True)  # overwriting: never a new weights file beside an old config
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
        save_file(tensors, str(Path(tmp) / WEIGHTS_FILE), metadata={"format": "pt"})
        (Path(tmp) / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        (Path(tmp) / "README.md").write_text(readme)
        for name in ("README.md", WEIGHTS_FILE, CONFIG_FILE):
            (Path(tmp) / name).chmod(0o644)  # safetensors creates 0600 files; an export is meant to be shared
            (Path(tmp) / name).replace(out_dir / name)
    return out_dir


def usage(out_dir: Path, config: Mapping[str, Any]) -> str:
    """How to load this export, as a README snippet."""
    if config["format"] == "timm":
        kwargs = ", ".join(f"{k}={v!r}" for k, v in config["timm"]["kwargs"].items())
        return (f"import timm\nmodel = timm.create_model(\n    {config['timm']['model_name']!r}, pretrained=True,\n"
                f"    pretrained_cfg_overlay=dict(file={str(out_dir / WEIGHTS_FILE)!r}),\n    {kwargs},\n)\n"
                f"# Same features as dinospec at img_size={config['img_size']}. With dynamic_img_size=True timm "
                f"resizes positions its own way (no DINOv2 offset), so other sizes differ slightly.\n")
    return (f"import dinospec\nmodel = dinospec.load_backbone({str(out_dir)!r})  # eval mode; no pickle\n"
            f"# or: torch.hub.load(DINOSPEC_REPO_DIR, 'dinospec_backbone', source='local', weights={str(out_dir)!r})\n"
            f"# model.forward_features(images) -> x_norm_clstoken, x_norm_regtokens, x_norm_patchtokens, x_prenorm\n")


def save_backbone(model: VisionTransformer, out_dir: str | Path, student: Mapping[str, Any],
                  spec: Mapping[str, Any], source: Mapping[str, Any] | None = None, fmt: str = "dinospec",
                  force: bool = False) -> Path:
    """Export a plain (unwrapped) `model`, built from the `student` and `spec` sections, as dinospec or timm weights."""
    img_size = native_img_size(model)
    config = export_config(student, spec, img_size, source)
    state = model.state_dict()
    with torch.device("meta"):  # what load_backbone will build from config.json must fit these weights
        rebuilt = build_backbone(config["student"], config["spec"], img_size).state_dict()
    wrong = [k for k in rebuilt.keys() | state.keys() if k not in rebuilt or k not in state
             or rebuilt[k].shape != state[k].shape]
    if wrong:
        raise ExportError(f"the model does not match the student/spec sections given (e.g. {sorted(wrong)[:3]})")
    if fmt == "timm":
        if model.pos_embed is None:
            raise ExportError("--format timm needs a learned pos_embed; this backbone uses RoPE "
                              "(export it with --format dinospec)")
        try:
            vanilla = routed_to_vanilla(state, model)
        except SpecError as e:
            raise ExportError(f"--format timm needs a vanilla backbone (timm has no token-type routing): {e}") from None
        with torch.device("meta"):  # the vanilla twin (one token group = no routing), to name timm's arguments
            twin = build_backbone(config["student"], vanilla_config(config["spec"]), img_size)
        name, kwargs = timm_model_args(twin)
        config.update(format="timm", timm={"model_name": name, "kwargs": kwargs})
        state = to_timm_state_dict(vanilla)
    elif fmt != "dinospec":
        raise ExportError(f"unknown export format {fmt!r} (dinospec | timm)")
    out_dir = Path(out_dir).resolve()
    readme = f"# dinospec backbone export\n\n```python\n{usage(out_dir, config)}```\n"
    return _write_dir(out_dir, state, config, readme, force)


def native_img_size(model: VisionTransformer) -> int:
    """The image size the backbone's position grid was learned for (RoPE has none: the size it was built with)."""
    if model.pos_embed is None:
        return model.img_size
    return math.isqrt(model.pos_embed.shape[1] - 1) * model.patch_size


def read_export_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    config_path = path / CONFIG_FILE
    if not config_path.is_file() or not (path / WEIGHTS_FILE).is_file():
        raise ExportError(f"{path} is not a dinospec export (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    config = json.loads(config_path.read_text())
    if config.get("format") != "dinospec":
        raise ExportError(f"{path} is a {config.get('format')!r}-format export: load it with that library "
                          f"(see its README.md), or export again with --format dinospec")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ExportError(f"{path} was written by a newer dinospec ({config.get('dinospec_version')}): upgrade")
    return config


def load_backbone(path: str | Path, **student_overrides: Any) -> VisionTransformer:
    """Rebuild an exported backbone from safetensors + JSON (no pickle), in eval mode on the CPU.

    `student_overrides` change settings that do not touch the weights, e.g. attn_backend="xformers".
    """
    from safetensors.torch import load_file

    path = Path(path)
    config = read_export_config(path)
    unknown = sorted(set(student_overrides) - set(config["student"]))
    if unknown:
        raise ExportError(f"unknown backbone setting(s) {unknown}; valid: {', '.join(config['student'])}")
    student = {**config["student"], **student_overrides}
    with torch.device("meta"):  # no random init of weights about to be replaced
        model = build_backbone(student, config["spec"], img_size=config["img_size"])
    try:
        model.load_state_dict(load_file(path / WEIGHTS_FILE), strict=True, assign=True)
    except RuntimeError as e:
        raise ExportError(f"{path}: weights do not match config.json: {str(e).splitlines()[0]}") from None
    return model.eval()


def backbone_from_state(state: Mapping[str, Tensor], student: Mapping[str, Any], spec: Mapping[str, Any],
                        global_crops_size: int, where: str) -> VisionTransformer:
    """A run's backbone rebuilt from its checkpointed state and config sections (no random init), eval mode; its
    image size is its pos_embed grid's (RoPE: the global crop size)."""
    if "pos_embed" in state:
        img_size = math.isqrt(state["pos_embed"].shape[1] - 1) * student["patch_size"]
    elif student["pos_embed"] == "rope":
        img_size = global_crops_size
    else:
        raise ExportError(f"{where}: the backbone has no pos_embed")
    with torch.device("meta"):
        model = build_backbone(student, spec, img_size=img_size)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ExportError(f"{where}: the checkpoint does not match its config.yaml: "
                          f"{str(e).splitlines()[0]}") from None
    return model.eval()


def member_sections(cfg: Any, student: int) -> tuple[Any, Any, str]:
    """(student section, spec section, state-key prefix below `teacher.` / `student.`) of a run's student number
    `student`: 0 the main one, k >= 1 a distillation run's distill.students[k - 1]."""
    from dinospec.config import distill_members

    members = distill_members(cfg)
    if not 0 <= student < len(members):
        raise ExportError(f"--student {student}: the run trains {len(members)} student(s) (0 = the main one"
                          f"{', 1.. = distill.students' if len(members) > 1 else ''})")
    from dinospec.ssl.distill import member_prefix

    return (*members[student], member_prefix(student))


def export_run(run_dir: str | Path, out_dir: str | Path, step: int | None = None, which: str = "teacher",
               fmt: str = "dinospec", force: bool = False, student: int = 0) -> Path:
    """Export one checkpoint's backbone from a run directory (student: which student of a distillation run, 0 =
    the main one); returns the export directory."""
    step_dir = resolve_step_dir(run_dir, step)
    cfg = step_config(step_dir)
    student_cfg, spec_cfg, prefix = member_sections(cfg, student)
    state = read_backbone_state(step_dir, f"{which}.{prefix}".rstrip("."))
    model = backbone_from_state(state, student_cfg, spec_cfg, cfg.crops.global_crops_size,
                                f"{step_dir} ({which} {prefix}backbone)")
    source = {"run_dir": str(Path(run_dir).resolve()), "step": int(step_dir.name.split("_")[-1]), "which": which}
    if student:
        source["student"] = student
    return save_backbone(model, out_dir, student_cfg, spec_cfg, source, fmt, force)


# ----------------------------------------------------------------------------------------------------------------
# from a weights file


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"  # JSON is YAML: numbers, booleans, null, quoted strings, lists


def source_overrides(path: str | Path, weights: ImportedWeights, img_size: int | None) -> tuple[list[str], int]:
    """Config overrides that rebuild the backbone of `weights` (student.*, spec, crop sizes that fit its patch
    size), and the image size to export it at (its position grid's; RoPE: 224 or --img-size)."""
    if weights.family == "dinospec" and Path(path).is_dir():
        config = read_export_config(path)
        student, spec = dict(config["student"]), dict(config["spec"])
        native = config["img_size"]
        spec_overrides = [_override(f"spec.{k}", v) for k, v in spec.items()]
    else:
        student = infer_student(weights)
        pos = weights.state.get("pos_embed")
        patch = student["patch_size"]
        native = math.isqrt(pos.shape[1] - 1) * patch if pos is not None else 224 // patch * patch
        spec_overrides = ["spec=final_norm" if weights.groups == DINOV3_NORM_GROUPS else "spec=none"]
    size = img_size or native
    patch = student["patch_size"]
    if size % patch:
        raise ExportError(f"--img-size {size} is not a multiple of the patch size {patch}")
    crops = [f"crops.global_crops_size={size}", f"crops.local_crops_size={max(1, 98 // patch) * patch}"]
    student_overrides = [_override(f"student.{k}", v) for k, v in student.items() if k != "pretrained_weights"]
    return [*student_overrides, *spec_overrides, *crops], size


def export_weights(path: str | Path, out_dir: str | Path, overrides: Sequence[str] = (), fmt: str = "dinospec",
                   force: bool = False, img_size: int | None = None) -> Path:
    """Export a weights file (DINOv2 / DINOv3 format) or a dinospec export dir, optionally converted to another
    spec (``spec=NAME``, ``spec.KEY=...``) or with other student settings; returns the export directory."""
    model, cfg, family = backbone_from_weights(path, overrides, img_size)
    source = {"weights": str(Path(path).resolve()), "family": family}
    return save_backbone(model, out_dir, cfg.student, cfg.spec, source, fmt, force)


def backbone_from_weights(path: str | Path, overrides: Sequence[str] = (),
                          img_size: int | None = None) -> tuple[VisionTransformer, Any, str]:
    """The backbone of a weights file (DINOv2 / DINOv3 format) or a dinospec export dir, in eval mode; the config
    whose `student` / `spec` sections rebuild it (converted by ``spec=NAME`` / ``student.KEY=...``); the
    weights' family (dinospec, dinov2, dinov2_reg, dinov3)."""
    from dinospec.config import ConfigError, load_config

    weights = load_weights(path)
    keys = [o.split("=", 1)[0] for o in overrides]
    if "model" in keys:
        raise ExportError("model=... does not apply: the architecture comes from the weights")
    base, size = source_overrides(path, weights, img_size)
    if "spec" in keys:  # a spec preset replaces the source's spec (presets apply before key=value overrides)
        base = [o for o in base if not o.startswith("spec")]
    try:
        cfg = load_config(overrides=[*base, *overrides])
    except ConfigError as e:
        raise ExportError(str(e)) from None
    with torch.device("meta"):
        model = build_backbone(cfg.student, cfg.spec, img_size=size)
    model = model.to_empty(device="cpu")  # every tensor comes from the weights (strict load)
    load_into(model, weights)
    return model.eval(), cfg, weights.family
