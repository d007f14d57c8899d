"""The run configuration: defaults file vs schema, presets, precedence, and errors that name the key at fault."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dinospec.config import CONFIG_DIR, ConfigError, RunConfig, SpecConfig, load_config
from dinospec.models.specialize import resolve_spec
from dinospec.models.vit import ARCHS, arch_kwargs

MODEL_PRESETS = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
SPEC_PRESETS = sorted(p.stem for p in (CONFIG_DIR / "spec").glob("*.yaml"))
REPO = Path(__file__).resolve().parent.parent


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_default_yaml_equals_dataclass_defaults():
    schema = OmegaConf.to_container(OmegaConf.structured(RunConfig))
    from_file = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "default.yaml"))
    assert from_file == schema
    assert list(from_file) == list(schema)  # same section order, so the file reads like the schema
    # and loading with nothing else gives exactly those defaults
    assert OmegaConf.to_container(load_config()) == schema


def test_presets_exist():
    assert set(MODEL_PRESETS) == set(ARCHS), "every arch has a model preset and vice versa"
    assert {"none", "paper", "norm", "norm_ls", "qkv_only", "final_norm"} <= set(SPEC_PRESETS)


def test_every_model_preset_with_every_spec_preset_resolves():
    specs = {name: load_config([], [f"spec={name}"]).spec for name in SPEC_PRESETS}
    for model in MODEL_PRESETS:
        cfg = load_config([], [f"model={model}"])
        assert cfg.student.arch == model
        depth = arch_kwargs(cfg.student)["depth"]
        for name, spec in specs.items():  # the model/spec interaction is the depth the ranges resolve against
            assert resolve_spec(spec, depth).is_vanilla == (name == "none"), (model, name)
    for model, spec in zip(MODEL_PRESETS, SPEC_PRESETS * 2):  # and they load together
        cfg = load_config([], [f"model={model}", f"spec={spec}"])
        assert cfg.student.arch == model and cfg.spec == specs[spec]


def test_paper_preset_blocks():
    """The paper's rule: norms + LayerScale in every block, QKV in the first third (S/B 0-3, L 0-7, g 0-12)."""
    for model, qkv_blocks in [("vit_small", 4), ("vit_base", 4), ("vit_large", 8), ("vit_giant2", 13)]:
        cfg = load_config([], [f"model={model}", "spec=paper"])
        depth = arch_kwargs(cfg.student)["depth"]
        resolved = resolve_spec(cfg.spec, depth)
        assert resolved.blocks["qkv"] == frozenset(range(qkv_blocks)), model
        for kind in ("norm1", "norm2", "ls1", "ls2"):
            assert resolved.blocks[kind] == frozenset(range(depth))
        assert not resolved.blocks["proj"] and not resolved.blocks["mlp"] and not resolved.final_norm
        assert resolved.group_of_type == (0, 1, 1)


def test_precedence_default_file_preset_override(tmp_path):
    run = write_yaml(tmp_path / "run.yaml", """
student:
  arch: vit_base
  drop_path_rate: 0.2
  num_register_tokens: 4
optim:
  base_lr: 0.001
""")
    later = write_yaml(tmp_path / "later.yaml", "optim:\n  base_lr: 0.002\n")
    # the override comes first on the command line and still wins over the preset
    cfg = load_config([run, later], ["student.drop_path_rate=0.25", "model=vit_large"])
    assert cfg.student.arch == "vit_large"  # preset over file
    assert cfg.student.drop_path_rate == 0.25  # override over preset (the preset says 0.3)
    assert cfg.ibot.separate_head is True  # from the preset
    assert cfg.student.num_register_tokens == 4  # file over default, untouched by the preset
    assert cfg.optim.base_lr == 0.002  # a later file over an earlier one
    assert cfg.optim.epochs == 100  # default
    assert load_config([run], ["model=vit_large"]).student.drop_path_rate == 0.3  # preset over file


def test_spec_preset_replaces_the_whole_spec_section(tmp_path):
    cfg = load_config([], ["spec=paper", "spec=qkv_only"])
    assert cfg.spec.qkv == "first_third"
    assert all(cfg.spec[k] == "none" for k in ("norm1", "norm2", "ls1", "ls2", "proj", "mlp"))
    cfg = load_config([], ["spec=paper_reg_alone", "spec=final_norm"])
    assert cfg.spec.groups == [["cls", "reg"], ["patch"]] and cfg.spec.final_norm is True
    assert cfg.spec.qkv == "none" and cfg.spec.norm1 == "none"
    # a spec preset also replaces a spec set in a config file, but not the overrides after it
    run = write_yaml(tmp_path / "run.yaml", "spec:\n  mlp: all\n  groups: [[cls], [reg], [patch]]\n")
    cfg = load_config([run], ["spec=norm", "spec.proj=0:2"])
    assert cfg.spec.mlp == "none" and cfg.spec.groups == [["cls"], ["reg", "patch"]]
    assert cfg.spec.proj == "0:2" and cfg.spec.norm1 == "all"
    # a spec preset holds nothing but the spec section
    for name in SPEC_PRESETS:
        assert set(OmegaConf.load(CONFIG_DIR / "spec" / f"{name}.yaml")) == {"spec"}, name
        assert set(OmegaConf.load(CONFIG_DIR / "spec" / f"{name}.yaml").spec) <= set(
            OmegaConf.structured(SpecConfig)), name


def test_block_range_override_is_a_string():
    """`spec.qkv=4:8` on the command line must mean blocks 4-7, not YAML's base-60 integer 4*60+8."""
    cfg = load_config([], ["spec=paper", "spec.qkv=4:8", "spec.mlp=2,5"])
    assert cfg.spec.qkv == "4:8" and cfg.spec.mlp == "2,5"
    assert resolve_spec(cfg.spec, 12).blocks["qkv"] == frozenset(range(4, 8))


@pytest.mark.parametrize("override,key,suggestion", [
    ("optim.lrr=1", "optim.lrr", "optim.min_lr"),
    ("optimm.base_lr=1", "optimm", "optim"),  # the first unknown level is named
    ("student.archh=vit_base", "student.archh", "student.arch"),
    ("logging.wandb.projet=x", "logging.wandb.projet", "logging.wandb.project"),
])
def test_unknown_key_names_key_and_closest_valid_one(override, key, suggestion):
    with pytest.raises(ConfigError) as err:
        load_config([], [override])
    assert f"'{key}'" in str(err.value) and f"did you mean '{suggestion}'" in str(err.value)


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    run = write_yaml(tmp_path / "run.yaml", "crops:\n  local_crop_number: 4\n")
    with pytest.raises(ConfigError, match=r"'crops.local_crop_number' \(from .*run.yaml\).*crops.local_crops_number"):
        load_config([run])


@pytest.mark.parametrize("override,key", [
    ("optim.base_lr=abc", "optim.base_lr"),
    ("student.depth=1.5", "student.depth"),
    ("train.deterministic=maybe", "train.deterministic"),
    ("crops.global_crops_scale=0.3", "crops.global_crops_scale"),
])
def test_wrong_type_names_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config([], [override])


def test_wrong_type_in_a_file_names_key_and_file(tmp_path):
    run = write_yaml(tmp_path / "run.yaml", "optim:\n  epochs: many\n")
    with pytest.raises(ConfigError, match=r"'optim.epochs' \(from .*run.yaml\)"):
        load_config([run])


@pytest.mark.parametrize("override,key,suggestion", [
    ("student.ffn_layer=swigl", "student.ffn_layer", "swiglu"),
    ("teacher.centering=sinkhorn", "teacher.centering", "sinkhorn_knopp"),
    ("compute.precision=bf61", "compute.precision", "bf16"),
    ("student.drop_path_mode=subsets", "student.drop_path_mode", "subset"),
])
def test_bad_choice_suggests(override, key, suggestion):
    with pytest.raises(ConfigError, match=f"'{key}'.*did you mean '{suggestion}'"):
        load_config([], [override])


@pytest.mark.parametrize("override,match", [
    ("spec.qkv=0:99", r"spec\.qkv.*outside 0\.\.11"),
    ("spec.norm1=first_quarter", r"spec\.norm1.*bad block range"),
    ("spec.mlp=8:4", r"spec\.mlp.*reversed"),
    ("spec.groups=[[cls],[patch]]", r"spec\.groups.*'reg'"),
    ("spec.groups=[[cls],[cls,reg,patch]]", r"spec\.groups.*two groups"),
    ("student.arch=vit_huge", "vit_huge"),
    ("student.num_heads=5", "not divisible"),
    ("crops.global_crops_scale=[0.5,0.2]", "crops.global_crops_scale"),
    ("crops.local_crops_scale=[0.0,0.3]", "crops.local_crops_scale"),
    ("ibot.mask_ratio_min_max=[0.1,1.0]", "ibot.mask_ratio_min_max"),
    ("crops.blur_sigma=[2.0,0.5]", "crops.blur_sigma"),
    ("crops.global_crops_size=225", r"crops\.global_crops_size.*multiple"),
    ("evaluation.knn_period_steps=-1", r"evaluation\.knn_period_steps.*>= 0"),
    ("evaluation.knn_period_steps=100", r"evaluation\.knn_train.*evaluation\.knn_val"),
])
def test_bad_values(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config([], [override])


def test_bad_spec_range_for_the_preset_depth():
    load_config([], ["model=vit_large", "spec.qkv=0:20"])  # 24 blocks: fine
    with pytest.raises(ConfigError, match="spec.qkv"):
        load_config([], ["model=vit_small", "spec.qkv=0:20"])  # 12 blocks


def test_other_errors(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config([], ["optim.base_lr"])
    with pytest.raises(ConfigError, match="unknown spec preset 'papr'.*did you mean 'paper'"):
        load_config([], ["spec=papr"])
    with pytest.raises(ConfigError, match="unknown model preset"):
        load_config([], ["model=vit_huge"])
    with pytest.raises(ConfigError, match="not found"):
        load_config([tmp_path / "missing.yaml"])
    with pytest.raises(ConfigError, match="mapping"):
        load_config([write_yaml(tmp_path / "list.yaml", "- 1\n- 2\n")])


def test_cli_config_error_exits_2():
    proc = subprocess.run([sys.executable, "-m", "dinospec.cli", "model-info", "optim.lrr=1"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("dinospec: config error: unknown config key 'optim.lrr'"), proc.stderr
    assert "did you mean 'optim.min_lr'" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize("path", ["recipe/fashion_mnist.yaml", "demo.yaml"])
def test_small_scale_recipes_keep_their_documented_choices(path):
    """The CPU recipes that BENCHMARKS.md measures: LayerScale 0.1, teacher temperature 0.04, and a teacher momentum
    that leaves at most 5% of the random init in the teacher at their last step (a longer or shorter run must refit
    it: README "Runs that learn at small scale")."""
    from dinospec.ssl.schedules import momentum_for_run

    cfg = load_config([CONFIG_DIR / path])
    steps = cfg.optim.epochs * cfg.train.official_epoch_length
    assert cfg.student.layerscale == 0.1 and cfg.teacher.teacher_temp == 0.04
    assert cfg.teacher.momentum_teacher <= momentum_for_run(steps) + 5e-4, (steps, momentum_for_run(steps))
