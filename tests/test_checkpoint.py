"""Checkpoints on real files and real gloo process groups: round trips (1 process, DDP, FSDP2 with 2 -> 1 rank
resharding, async), atomic publish under SIGKILL, retention, fallback from corrupt checkpoints, refusal of crafted
pickles and of non-finite state.

Multi-rank cases run this file as a script, one process per rank (``python tests/test_checkpoint.py ranks DIR RANK
WORLD``), rendezvous through a file store in the test's tmp dir; the SIGKILL test forks save loops from one
``python tests/test_checkpoint.py zygote DIR`` process so that torch is imported once.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from dinospec.checkpoint import (CheckpointError, Checkpointer, NonFiniteCheckpoint, _write_manifest,
                                 load_model_state, safe_torch_load, verify_checkpoint)
from dinospec.rng import capture_rng, restore_rng, seed_all

HERE = Path(__file__).resolve()


# ---------------------------------------------------------------------------------------------------------------
# helpers shared by the tests and the rank workers

class TinyNet(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width)) for _ in range(2)])
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + torch.relu(block(x))
        return self.head(x)


def _model_and_optim(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = TinyNet()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)


def _train_step(model: nn.Module, optim: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 16, generator=g)
    optim.zero_grad()
    model(x).square().mean().backward()
    optim.step()


def _clone(tree):
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_clone(v) for v in tree)
    return tree.detach().clone() if isinstance(tree, torch.Tensor) else tree


def _assert_same(a, b, key: str = "") -> None:
    """Bitwise equal nested trees (dtype and shape included)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{key}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{key}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), key
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{key}.{i}")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, key
        assert torch.equal(a, b), f"{key} differs"
    else:
        assert type(a) is type(b) and a == b, f"{key}: {a!r} vs {b!r}"


def _full_state(model: nn.Module, optim: torch.optim.Optimizer) -> dict:
    msd, osd = get_state_dict(model, optim, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return _clone({"model": msd, "optim": osd})


def _load_into_fresh(ckpt: Checkpointer, seed: int, path=None) -> tuple[int | None, nn.Module, torch.optim.Optimizer]:
    model, optim = _model_and_optim(seed)
    msd, osd = get_state_dict(model, optim)
    step = ckpt.load({"model": msd, "optim": osd}, path=path)
    set_state_dict(model, optim, model_state_dict=msd, optim_state_dict=osd)
    return step, model, optim


def _save_steps(run: Path, steps, **kw) -> tuple[Checkpointer, dict[int, dict]]:
    """Save one real training state per step; returns the checkpointer and each step's full state."""
    ckpt = Checkpointer(run, **kw)
    model, optim = _model_and_optim(0)
    saved = {}
    for step in steps:
        _train_step(model, optim, step)
        msd, osd = get_state_dict(model, optim)
        ckpt.save(step, {"model": msd, "optim": osd, "train": {"step": step}}, config_yaml=f"step: {step}\n")
        saved[step] = _full_state(model, optim)
    return ckpt, saved


def _dirs(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


# ---------------------------------------------------------------------------------------------------------------
# one process, no process group

def test_round_trip_single_process_bitwise(tmp_path):
    assert not torch.distributed.is_initialized()  # DCP without any process group
    model, optim = _model_and_optim(0)
    _train_step(model, optim, 1)
    _train_step(model, optim, 2)
    random.random(), np.random.rand(), torch.rand(1)
    random.gauss(0, 1), np.random.standard_normal()  # leaves a cached gaussian in both generators
    rng = capture_rng()
    after_capture = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3))
    msd, osd = get_state_dict(model, optim)
    train = {"step": 2, "loss_scale": 0.25, "done": False, "tag": "run-a", "rng_rank0": rng}
    ckpt = Checkpointer(tmp_path / "run")
    path = ckpt.save(2, {"model": msd, "optim": osd, "train": train}, config_yaml="student:\n  arch: tiny\n")

    assert path == tmp_path / "run" / "checkpoints" / "step_2"
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_2\n"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 2 and manifest["world_size"] == 1 and manifest["torch_version"] == torch.__version__
    assert set(manifest["files"]) == {p.name for p in path.iterdir()} - {"manifest.json"}
    assert {".metadata", "config.yaml"} <= set(manifest["files"])
    assert ckpt.read_config() == "student:\n  arch: tiny\n" and ckpt.latest_step() == 2

    fresh, fresh_optim = _model_and_optim(123)
    fmsd, fosd = get_state_dict(fresh, fresh_optim)
    ftrain = {"step": 0, "loss_scale": 1.0, "done": True, "tag": "", "rng_rank0": capture_rng()}
    assert ckpt.load({"model": fmsd, "optim": fosd, "train": ftrain}) == 2
    set_state_dict(fresh, fresh_optim, model_state_dict=fmsd, optim_state_dict=fosd)
    _assert_same(_full_state(model, optim), _full_state(fresh, fresh_optim))
    assert ftrain["step"] == 2 and type(ftrain["step"]) is int and ftrain["loss_scale"] == 0.25
    assert ftrain["done"] is False and ftrain["tag"] == "run-a" and ckpt.last_load_skipped == []
    restore_rng(ftrain["rng_rank0"])
    again = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3))
    assert again[:3] == after_capture[:3] and torch.equal(again[3], after_capture[3])


def test_rng_state_is_tensors_only_and_restores(tmp_path):
    seed_all(7)
    random.gauss(0, 1)
    state = capture_rng()
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in state.values())
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    first = (random.getrandbits(64), np.random.randint(1 << 30, size=4).tolist(), torch.randint(1 << 30, (4,)))
    seed_all(99)
    restore_rng(state)
    second = (random.getrandbits(64), np.random.randint(1 << 30, size=4).tolist(), torch.randint(1 << 30, (4,)))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])
    with pytest.raises(ValueError, match="missing"):
        restore_rng({k: v for k, v in state.items() if k != "numpy_keys"})


class Progress:
    """A Stateful train entry like the trainer's: one replicated (world_size, ...) RNG tensor."""

    def __init__(self, world: int):
        self.step, self.world = 0, world
        self.rng = torch.arange(world * 4, dtype=torch.int64).reshape(world, 4)
        self.loaded: dict | None = None

    def state_dict(self):
        return {"step": self.step, "world_size": torch.tensor(self.world), "rng": self.rng}

    def load_state_dict(self, sd):
        self.loaded = sd
        self.step = int(sd["step"])


def test_stateful_train_entry_tolerates_other_world_size(tmp_path, caplog):
    ckpt = Checkpointer(tmp_path)
    saved = Progress(world=2)
    saved.step = 5
    ckpt.save(5, {"train": saved})
    now = Progress(world=1)
    with caplog.at_level(logging.WARNING, logger="dinospec.checkpoint"):
        assert ckpt.load({"train": now}) == 5
    assert now.step == 5 and int(now.loaded["world_size"]) == 2
    assert now.loaded["rng"] is now.rng  # shaped differently: left as it is, and said so
    assert ckpt.last_load_skipped == ["train.rng (saved (2, 4), now (1, 4))"]
    assert "train.rng" in caplog.text


def test_the_runs_broken_files_survive_a_resume_and_older_checkpoints_still_load(tmp_path):
    """The trainer's Progress keeps the run's record of broken files: a resumed run counts a file met before it
    once; a checkpoint from before the record loads with an empty one (and says so)."""
    from dinospec.checkpoint_state import Progress as RunProgress

    before = RunProgress(torch.device("cpu"))
    before.step = 3
    before.broken.add([("a.jpg", "file not found"), ("b.jpg", "OSError: truncated")])
    Checkpointer(tmp_path / "new").save(3, {"train": before})
    resumed = RunProgress(torch.device("cpu"))
    assert Checkpointer(tmp_path / "new").load({"train": resumed}) == 3
    resumed.broken.add([("a.jpg", "file not found"), ("c.jpg", "file not found")])
    assert resumed.broken.sync() == 3 and sorted(resumed.broken.known) == ["a.jpg", "b.jpg", "c.jpg"]

    class OldProgress(RunProgress):
        def state_dict(self):
            return {k: v for k, v in super().state_dict().items() if k != "broken_files"}

    Checkpointer(tmp_path / "old").save(2, {"train": OldProgress(torch.device("cpu"))})
    ckpt, resumed = Checkpointer(tmp_path / "old"), RunProgress(torch.device("cpu"))
    assert ckpt.load({"train": resumed}) == 2 and resumed.broken.sync() == 0
    assert ckpt.last_load_skipped == ["train.broken_files (not saved)"]


def test_load_model_state_prefix_without_process_group(tmp_path):
    _, saved = _save_steps(tmp_path, [1])
    weights = load_model_state(tmp_path, prefix="blocks.1.")
    expected = {k[len("blocks.1."):]: v for k, v in saved[1]["model"].items() if k.startswith("blocks.1.")}
    _assert_same(expected, weights)
    _assert_same(saved[1]["model"], load_model_state(tmp_path / "checkpoints" / "step_1"))
    with pytest.raises(CheckpointError, match="no tensors"):
        load_model_state(tmp_path, prefix="teacher.")


def test_no_checkpoint_loads_none(tmp_path):
    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest_step() is None
    assert ckpt.load({"model": {"w": torch.zeros(2)}}) is None


def test_retention_keep_last_and_keep_every(tmp_path):
    ckpt, _ = _save_steps(tmp_path, range(1, 8), keep_last=2, keep_every=3)
    assert _dirs(tmp_path) == ["latest", "step_3", "step_6", "step_7"]
    # a rewound run publishing an older step: `latest` moves back, nothing newer than it is deleted
    ckpt.save(2, {"model": {"w": torch.ones(3)}})
    assert _dirs(tmp_path) == ["latest", "step_2", "step_3", "step_6", "step_7"]
    assert ckpt.latest_step() == 2
    ckpt.save(2, {"model": {"w": torch.full((3,), 2.0)}})  # the same step again replaces it
    assert torch.equal(load_model_state(tmp_path)["w"], torch.full((3,), 2.0))


def test_leftovers_removed_by_next_save_and_only_them(tmp_path):
    ckpt, _ = _save_steps(tmp_path, [1], keep_last=0)
    root = tmp_path / "checkpoints"
    (root / ".tmp_step_2_0badc0de").mkdir()
    (root / ".tmp_step_2_0badc0de" / "__0_0.distcp").write_bytes(b"half")
    (root / ".del_step_0_12345678").mkdir()
    (root / ".latest.abcdef01.tmp").write_text("step_2")
    (root / "step_9_notes").mkdir()
    assert ckpt.latest_step() == 1  # a hidden directory is never a candidate
    ckpt.save(3, {"model": {"w": torch.ones(1)}})
    assert _dirs(tmp_path) == ["latest", "step_1", "step_3", "step_9_notes"]


def _truncate_shard(step_dir: Path) -> str:
    shard = next(step_dir.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return "truncated"


def _delete_metadata(step_dir: Path) -> str:
    (step_dir / ".metadata").unlink()
    return ".metadata is missing"


def _flip_a_byte(step_dir: Path) -> str:
    shard = next(step_dir.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    return "sha256 differs"


def _foreign_model(step_dir: Path) -> str:
    """A complete, valid checkpoint of another model under the same name."""
    shutil.rmtree(step_dir)
    other = Checkpointer(step_dir.parent / "other_run")
    other.save(3, {"model": {"blocks.0.0.weight": torch.ones(2, 2)}})
    shutil.move(step_dir.parent / "other_run" / "checkpoints" / "step_3", step_dir)
    return "Size mismatch"


@pytest.mark.parametrize("damage", [_truncate_shard, _delete_metadata, _flip_a_byte, _foreign_model])
def test_unusable_latest_falls_back_to_previous(tmp_path, caplog, damage):
    ckpt, saved = _save_steps(tmp_path, [1, 2, 3], keep_last=5)
    reason = damage(tmp_path / "checkpoints" / "step_3")
    with caplog.at_level(logging.WARNING, logger="dinospec.checkpoint"):
        step, model, optim = _load_into_fresh(ckpt, seed=9)
    assert step == 2
    _assert_same(saved[2], _full_state(model, optim))
    assert "step_3" in caplog.text and reason in caplog.text
    with pytest.raises(CheckpointError, match=reason):  # an explicit path does not fall back
        _load_into_fresh(ckpt, seed=9, path=tmp_path / "checkpoints" / "step_3")


def test_unreadable_latest_falls_back_to_newest_step_dir(tmp_path, caplog):
    ckpt, saved = _save_steps(tmp_path, [1, 2])
    (tmp_path / "checkpoints" / "latest").write_text("garbage\n")
    with caplog.at_level(logging.WARNING, logger="dinospec.checkpoint"):
        step, model, optim = _load_into_fresh(ckpt, seed=4)
    assert step == 2 and "garbage" in caplog.text
    _assert_same(saved[2], _full_state(model, optim))
    assert ckpt.read_config() == "step: 2\n"
    assert ckpt.read_config(tmp_path / "checkpoints" / "step_1") == "step: 1\n"


def test_explicit_bad_paths_and_nothing_loadable_raise(tmp_path):
    ckpt, _ = _save_steps(tmp_path, [1])
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        ckpt.load({"model": {}}, path=tmp_path / "nowhere")
    (tmp_path / "checkpoints" / "step_1" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no manifest.json"):
        ckpt.load({"model": {}}, path=tmp_path / "checkpoints" / "step_1")
    with pytest.raises(CheckpointError, match="could be loaded"):  # checkpoints exist, none usable: never None
        ckpt.load({"model": {}})


class _RunsShell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_safe_torch_load_refuses_crafted_pickle(tmp_path):
    marker = tmp_path / "pwned"
    for name, save in [("zip.pt", torch.save), ("raw.pkl", lambda obj, f: pickle.dump(obj, f, protocol=2))]:
        with open(tmp_path / name, "wb") as f:
            save({"w": torch.ones(2), "evil": _RunsShell(marker)}, f)
        with pytest.raises(CheckpointError, match="refused"):
            safe_torch_load(tmp_path / name)
    assert not marker.exists()
    torch.save({"w": torch.ones(2), "n": 3, "names": ["a"]}, tmp_path / "ok.pt")
    assert safe_torch_load(tmp_path / "ok.pt")["names"] == ["a"]


def test_tampered_metadata_refused(tmp_path):
    marker = tmp_path / "pwned"
    ckpt, _ = _save_steps(tmp_path, [1])
    step_dir = tmp_path / "checkpoints" / "step_1"
    evil = pickle.dumps(_RunsShell(marker))
    (step_dir / ".metadata").write_bytes(evil)
    with pytest.raises(CheckpointError, match="metadata"):
        _load_into_fresh(ckpt, seed=1, path=step_dir)
    # the attacker rewrites the manifest too: the restricted unpickler still refuses
    manifest = json.loads((step_dir / "manifest.json").read_text())
    manifest["files"][".metadata"] = {"bytes": len(evil), "sha256": __import__("hashlib").sha256(evil).hexdigest()}
    (step_dir / "manifest.json").write_text(json.dumps(manifest))
    verify_checkpoint(step_dir)
    with pytest.raises(CheckpointError, match="posix.system' is not allowed"):
        _load_into_fresh(ckpt, seed=1, path=step_dir)
    with pytest.raises(CheckpointError, match="is not allowed"):
        load_model_state(step_dir)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_crafted_non_tensor_value_refused(tmp_path):
    """A checkpoint whose pickled non-tensor value builds an object: read with weights_only, never executed."""
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "pwned"
    step_dir = tmp_path / "checkpoints" / "step_1"
    dcp.save({"model": {"w": torch.ones(2)}, "train": {"note": _RunsShell(marker)}}, checkpoint_id=step_dir)
    (step_dir / "config.yaml").write_text("")
    _write_manifest(step_dir, 1, 1)
    (tmp_path / "checkpoints" / "latest").write_text("step_1\n")
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(CheckpointError, match="refused"):
        ckpt.load({"model": {"w": torch.zeros(2)}, "train": {"note": ""}}, path=step_dir)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="train.note .*_RunsShell"):  # and Checkpointer never writes one
        ckpt.save(2, {"train": {"note": _RunsShell(marker)}})


def test_non_finite_state_is_never_published(tmp_path):
    ckpt, saved = _save_steps(tmp_path, [1])
    model, optim = _model_and_optim(0)
    with torch.no_grad():
        model.blocks[1][0].weight[0, 0] = float("nan")
    msd, osd = get_state_dict(model, optim)
    with pytest.raises(NonFiniteCheckpoint, match=r"model\.blocks\.1\.0\.weight"):
        ckpt.save(2, {"model": msd, "optim": osd})
    with pytest.raises(NonFiniteCheckpoint, match=r"train\.ema_loss"):
        ckpt.save(2, {"model": {"w": torch.ones(1)}, "train": {"ema_loss": float("inf")}})
    assert _dirs(tmp_path) == ["latest", "step_1"] and ckpt.latest_step() == 1
    step, model, optim = _load_into_fresh(ckpt, seed=3)
    assert step == 1
    _assert_same(saved[1], _full_state(model, optim))
    ckpt.save(4, {"model": {"big": torch.full((8,), 3e38)}})  # finite, though its float32 sum overflows
    assert ckpt.latest_step() == 4


# ---------------------------------------------------------------------------------------------------------------
# SIGKILL while saving

KILL_ROUNDS = 6


def test_sigkill_during_saves_never_publishes_a_broken_checkpoint(tmp_path):
    """Each round: a fresh process resumes from `latest` and saves steps in a loop; SIGKILL after a random delay."""
    rng = random.Random(1234)
    zygote = subprocess.Popen([sys.executable, str(HERE), "zygote", str(tmp_path)], text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1"),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    published_max = 0
    try:
        for _ in range(KILL_ROUNDS):
            zygote.stdin.write("fork\n")
            zygote.stdin.flush()
            pid_line, first_save = zygote.stdout.readline(), zygote.stdout.readline()
            assert pid_line.startswith("pid") and first_save.startswith("saved"), pid_line + first_save
            time.sleep(rng.uniform(0.0, 0.5))
            os.kill(int(pid_line.split()[1]), signal.SIGKILL)
            zygote.stdin.write("reap\n")
            zygote.stdin.flush()
            while not zygote.stdout.readline().startswith("reaped"):  # "saved" lines printed before the kill
                pass
            for path in (tmp_path / "checkpoints").glob("step_*"):  # every published step_<N> is complete
                verify_checkpoint(path)
            ckpt = Checkpointer(tmp_path, keep_last=2)
            state = {"model": {"w": torch.zeros(256, 1024), "b": torch.zeros(1024)}, "train": {"step": 0}}
            step = ckpt.load(state)
            assert step is not None and step >= published_max and state["train"]["step"] == step
            assert bool((state["model"]["w"] == step).all()) and bool((state["model"]["b"] == -step).all())
            published_max = step
    finally:
        zygote.kill()
        zygote.communicate()
    ckpt.save(published_max + 1, {"model": {"w": torch.ones(1)}})
    names = _dirs(tmp_path)
    assert not [n for n in names if n.startswith(".")], names  # leftovers of the killed saves are gone
    assert names[-1] == f"step_{published_max + 1}" and len(names) == 3  # keep_last=2 + latest


def _zygote(run: Path) -> None:
    """Imports once, then forks one save loop per "fork" line (no torch op has run here: fork is safe)."""
    for command in sys.stdin:
        if command.strip() == "fork":
            pid = os.fork()
            if pid == 0:
                try:
                    _save_loop(run)
                finally:
                    os._exit(1)
            print(f"pid {pid}", flush=True)
        elif command.strip() == "reap":
            os.waitpid(pid, 0)
            print("reaped", flush=True)


def _save_loop(run: Path) -> None:
    """Resumes from the latest checkpoint, then saves steps forever (few MB each) until killed."""
    ckpt = Checkpointer(run, keep_last=2)
    state = {"model": {"w": torch.zeros(256, 1024), "b": torch.zeros(1024)}, "train": {"step": 0}}
    step = ckpt.load(state) or 0
    while True:
        step += 1
        state["model"]["w"].fill_(step)
        state["model"]["b"].fill_(-step)
        state["train"]["step"] = step
        ckpt.save(step, state, config_yaml=f"step: {step}\n")
        print(f"saved {step}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# two ranks on gloo

def _run_ranks(scenario: str, run: Path, world: int = 2, timeout: float = 120) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(HERE), scenario, str(run), str(rank), str(world)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(world)]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"{scenario} rank {rank} exited {p.returncode}:\n{out[-4000:]}"


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    """One 2-rank gloo job (DDP sync + async saves, a NaN on one rank, FSDP2 save and 2-rank reload)."""
    run = tmp_path_factory.mktemp("two_ranks")
    _run_ranks("ranks", run)
    return run


def test_ddp_sync_and_async_two_ranks(two_rank_run):
    for name, step in [("sync", 1), ("async", 2)]:
        reference = safe_torch_load(two_rank_run / f"{name}_reference.pt")
        ckpt = Checkpointer(two_rank_run / name)  # one process, no group: reads the 2-rank checkpoint
        loaded, model, optim = _load_into_fresh(ckpt, seed=5)
        assert loaded == step
        _assert_same(reference, _full_state(model, optim))


def test_fsdp2_two_ranks_reshards_to_one(two_rank_run):
    reference = safe_torch_load(two_rank_run / "fsdp_reference.pt")
    step_dir = two_rank_run / "fsdp" / "checkpoints" / "step_1"
    assert json.loads((step_dir / "manifest.json").read_text())["world_size"] == 2
    assert len(list(step_dir.glob("*.distcp"))) == 2
    loaded, model, optim = _load_into_fresh(Checkpointer(two_rank_run / "fsdp"), seed=5)  # plain model, 1 rank
    assert loaded == 1
    _assert_same(reference, _full_state(model, optim))
    _assert_same(reference["model"], load_model_state(two_rank_run / "fsdp"))


def _init_ranks(run: Path, rank: int, world: int) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{run}/rendezvous", rank=rank,
                                         world_size=world)


def _ddp_worker(run: Path, rank: int, world: int) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, optim = _model_and_optim(0)
    model = DDP(model)
    _train_step(model, optim, 100 + rank)  # different data per rank, averaged gradients
    for name, step, use_async in [("sync", 1, False), ("async", 2, True)]:
        ckpt = Checkpointer(run / name, async_save=use_async)
        msd, osd = get_state_dict(model, optim)
        reference = _full_state(model, optim)
        rng = capture_rng()
        expected_draw = torch.rand(4)
        ckpt.save(step, {"model": msd, "optim": osd, "train": {"step": step, f"rng_rank{rank}": rng}})
        if use_async:  # training goes on while the files are written: the checkpoint must be the staged copy
            _train_step(model, optim, 200 + rank)
            ckpt.wait()
        assert (run / name / "checkpoints" / "latest").read_text() == f"step_{step}\n"
        if rank == 0:
            torch.save(reference, run / f"{name}_reference.pt")
        fresh, fresh_optim = _model_and_optim(77)
        fresh = DDP(fresh)
        fmsd, fosd = get_state_dict(fresh, fresh_optim)
        train = {"step": 0, f"rng_rank{rank}": capture_rng()}
        assert ckpt.load({"model": fmsd, "optim": fosd, "train": train}) == step
        set_state_dict(fresh, fresh_optim, model_state_dict=fmsd, optim_state_dict=fosd)
        _assert_same(reference, _full_state(fresh, fresh_optim))
        restore_rng(train[f"rng_rank{rank}"])
        assert train["step"] == step and torch.equal(torch.rand(4), expected_draw)
    # NaN on one rank only: both ranks refuse, `latest` unchanged
    try:
        ckpt.save(3, {"model": {"w": torch.tensor([float("nan") if rank == 1 else 0.0])}})
        raise AssertionError("a NaN on rank 1 was saved")
    except NonFiniteCheckpoint as e:
        assert "rank 1: model.w" in str(e), e
    assert ckpt.latest_step() == 2


def _fsdp_worker(run: Path, rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))

    def sharded(seed):
        model, _ = _model_and_optim(seed)
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)

    model, optim = sharded(0)
    _train_step(model, optim, 100 + rank)
    msd, osd = get_state_dict(model, optim)
    reference = _full_state(model, optim)
    ckpt = Checkpointer(run / "fsdp")
    ckpt.save(1, {"model": msd, "optim": osd, "train": {"step": 1}})
    if rank == 0:
        torch.save(reference, run / "fsdp_reference.pt")
    fresh, fresh_optim = sharded(77)
    fmsd, fosd = get_state_dict(fresh, fresh_optim)
    assert ckpt.load({"model": fmsd, "optim": fosd}) == 1
    set_state_dict(fresh, fresh_optim, model_state_dict=fmsd, optim_state_dict=fosd)
    _assert_same(reference, _full_state(fresh, fresh_optim))


if __name__ == "__main__":
    scenario, run_dir = sys.argv[1], Path(sys.argv[2])
    if scenario == "zygote":
        _zygote(run_dir)
    else:
        rank_, world_ = int(sys.argv[3]), int(sys.argv[4])
        _init_ranks(run_dir, rank_, world_)
        _ddp_worker(run_dir, rank_, world_)
        _fsdp_worker(run_dir, rank_, world_)
        torch.distributed.destroy_process_group()
