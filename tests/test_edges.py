"""Issue #12, "trustworthy at the edges": fast one-line refusals, range checks, one writer per run directory,
rendezvous ports that cannot collide, collectives whose group serves their tensors' device, progress on a log file,
a failed async save on a full disk, unreadable images in `dinospec eval`.

Real processes, files, locks and gloo process groups throughout; the SLURM cases are in tests/test_slurm_edges.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
from omegaconf import DictConfig, OmegaConf
from omegaconf.nodes import FloatNode, IntegerNode

from dinospec import dist
from dinospec.config import _RANGES, ConfigError, RunConfig, load_config
from dinospec.run_lease import LEASE, WRITERS, Holder, RunDirBusy, RunLease, read_lease

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / "data" / "eval" / "photos"


# ---------------------------------------------------------------------------------------------------------------
# 1-3: every config error from any command in well under 2 s, exit 2, one line, nothing written


@pytest.fixture(scope="module")
def no_torch(tmp_path_factory) -> Path:
    """A `torch` that fails on import: a command that imports torch before refusing its config shows it."""
    root = tmp_path_factory.mktemp("poisoned")
    (root / "torch").mkdir()
    (root / "torch" / "__init__.py").write_text("raise ImportError('torch imported before the config was checked')\n")
    return root


REFUSALS = [  # (command, override, what the one line says)
    ("train", "optim.lrr=1", "unknown config key 'optim.lrr'"),
    ("train", "train.batch_size_per_gpu=abc", "train.batch_size_per_gpu"),
    ("submit", "spec.qkv=0:99", "spec.qkv"),
    ("model-info", "train.log_every=0", "'train.log_every' = 0 must be >= 1"),
    ("submit", "checkpoint.period_steps=0", "'checkpoint.period_steps' = 0 must be >= 1"),
    ("train", "data.path=/no/such/images", "'data.path' = '/no/such/images' does not exist"),
    ("submit", "data.path=/no/such/images", "'data.path' = '/no/such/images' does not exist"),
    ("submit", "data.sources=[{path: /no/such/shards}]", "'data.sources[0].path' = '/no/such/shards' does not"),
    ("train", "data.path={tmp}/empty", "holds no files"),
    ("train", "student.pretrained_weights=/no/such.pth", "student.pretrained_weights"),
    ("submit", "train.init_from=/no/such/run", "train.init_from"),
    ("submit", "distill.enabled=true|distill.teacher=/no/such/export", "distill.teacher"),
    ("train", "train.output_dir={tmp}/file/run", "cannot be created"),
]


@pytest.mark.parametrize("command,override,message", REFUSALS, ids=[f"{c}-{o.split('=')[0]}" for c, o, _ in REFUSALS])
def test_config_errors_are_refused_at_once_in_one_line(tmp_path, no_torch, command, override, message):
    (tmp_path / "file").write_text("a file, not a folder")
    (tmp_path / "empty" / "class_a").mkdir(parents=True)
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [command, f"data.path={PHOTOS}", f"train.output_dir={tmp_path / 'run'}",
            *override.replace("{tmp}", str(tmp_path)).split("|")]  # "|" separates several overrides
    env = {**os.environ, "PYTHONPATH": f"{no_torch}{os.pathsep}{REPO}"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dinospec.cli", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr
    assert proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "a refused command wrote something"
    assert elapsed < 2.0, f"refused after {elapsed:.2f} s"


@pytest.mark.parametrize("args,message", [(["--backbone", "/no/such/export"], "--backbone /no/such/export does not"),
                                          (["--backbone", str(REPO), "--train", "/no/split"], "--train /no/split is")])
def test_eval_refuses_missing_paths_before_importing_torch(tmp_path, no_torch, args, message):
    env = {**os.environ, "PYTHONPATH": f"{no_torch}{os.pathsep}{REPO}"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dinospec.cli", "eval", "knn", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, \
        proc.stderr
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("command,args,rc,stream,message", [
    ("analyze", ["--help"], 0, "stdout", "--backbone DIR_OR_RUN"),
    ("analyze", ["--backbone", "x", "--out", "y", "--max-images", "many"], 2, "stderr",
     "--max-images: invalid int value: 'many'"),
    ("export", ["--help"], 0, "stdout", "--img-size"),
    ("export", ["runs/x", "--out", "y", "--step", "two"], 2, "stderr", "--step: invalid int value: 'two'"),
    ("index", ["--help"], 0, "stdout", "--workers"),
])
def test_commands_parse_their_arguments_without_importing_torch(tmp_path, no_torch, command, args, rc, stream,
                                                                 message):
    """`dinospec analyze`, `export` and `index` import torch (measurements, plots, weights) only once their
    arguments are parsed (index: never)."""
    env = {**os.environ, "PYTHONPATH": f"{no_torch}{os.pathsep}{REPO}"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dinospec.cli", command, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == rc and message in getattr(proc, stream), proc.stdout + proc.stderr
    assert "torch imported" not in proc.stderr and list(tmp_path.iterdir()) == []
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("override,key", [("train.batch_size_per_gpu=-4", "train.batch_size_per_gpu"),
                                          ("checkpoint.period_steps=0", "checkpoint.period_steps"),
                                          ("train.log_every=0", "train.log_every"),
                                          ("optim.adamw_beta2=1.0", "optim.adamw_beta2"),
                                          ("student.drop_path_rate=1.5", "student.drop_path_rate"),
                                          ("teacher.teacher_temp=-0.1", "teacher.teacher_temp")])
def test_out_of_range_values_name_the_key_and_the_range(override, key):
    with pytest.raises(ConfigError, match=rf"'{key}' = .* must be (>=|>|in) "):
        load_config([], [override])


def _numeric_keys(node: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for k in node.keys():
        sub = node._get_node(k)
        if isinstance(sub, DictConfig):
            keys += _numeric_keys(sub, f"{prefix}{k}.")
        elif isinstance(sub, (IntegerNode, FloatNode)):
            keys.append(f"{prefix}{k}")
    return keys


def test_every_numeric_key_has_a_range_and_the_defaults_are_in_it():
    keys = _numeric_keys(OmegaConf.structured(RunConfig))
    assert len(keys) > 40
    missing = [k for k in keys if k not in _RANGES]
    assert not missing, f"numeric config keys without a range in dinospec.config._RANGES: {missing}"
    load_config([], [])  # every default and every preset value is in range
    for preset in ("model=vit_giant2", "spec=paper"):
        load_config([], [preset])


def test_config_validation_does_not_import_torch():
    code = ("import sys; from dinospec.config import load_config; load_config([], ['spec=paper', 'model=vit_large']);"
            "assert 'torch' not in sys.modules, 'validation imported torch'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


# ---------------------------------------------------------------------------------------------------------------
# 8: one writer per run directory


def _holder_script(run_dir: Path) -> str:
    return textwrap.dedent(f"""
        import sys, time
        from dinospec.run_lease import RunLease
        RunLease({str(run_dir)!r}, heartbeat_s=0).acquire(code={{}})
        print("held", flush=True)
        time.sleep(600)
    """)


def test_second_writer_is_refused_naming_the_holder_and_a_killed_holder_is_recoverable(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _holder_script(run_dir)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusy, match=rf"in use by process {holder.pid} on {socket.gethostname()}"):
            RunLease(run_dir).acquire()
        holder.send_signal(signal.SIGKILL)  # no clean-up at all: the lease file stays
        holder.wait(timeout=30)
        assert (run_dir / LEASE).exists()
        lease = RunLease(run_dir, heartbeat_s=0).acquire(code={"commit": "x"})
        records = [json.loads(line) for line in (run_dir / WRITERS).read_text().splitlines()]
        assert records[-1]["took_over"]["pid"] == holder.pid and records[-1]["holder"]["pid"] == os.getpid()
        lease.release()
        assert not (run_dir / LEASE).exists()
    finally:
        holder.kill()
        holder.wait()


def test_holder_on_another_host_is_live_while_it_beats_and_stale_after(tmp_path):
    run_dir = tmp_path / "run"
    other = RunLease(run_dir, Holder("process", "some-other-node", 4242, "1"), heartbeat_s=0)
    other.acquire()
    with pytest.raises(RunDirBusy, match="process 4242 on some-other-node"):
        RunLease(run_dir, stale_after_s=60).acquire()
    old = time.time() - 120  # its heartbeat stopped two minutes ago (a lost node)
    os.utime(run_dir / LEASE, (old, old))
    mine = RunLease(run_dir, stale_after_s=60, heartbeat_s=0).acquire()
    assert read_lease(run_dir)["token"] == mine.token
    other.release()  # the old holder's release does not remove a lease it no longer holds
    assert read_lease(run_dir)["token"] == mine.token
    mine.release()


def test_the_token_hands_the_lease_over_and_a_kept_lease_stays(tmp_path):
    run_dir = tmp_path / "run"
    submitted = RunLease(run_dir, heartbeat_s=0).acquire()
    submitted.release(keep=True)  # handed to "the job": it stays while this (live) process holds it
    with pytest.raises(RunDirBusy):
        RunLease(run_dir).acquire()
    job = RunLease(run_dir, token=submitted.token, heartbeat_s=0).acquire()  # the job presents the token
    job.release()
    assert read_lease(run_dir) is None


@pytest.mark.slow
def test_dinospec_train_refuses_a_run_directory_in_use(tmp_path):
    """A real `dinospec train` against a run directory another process holds: one line, exit 2, nothing written."""
    run_dir = tmp_path / "run"
    held = RunLease(run_dir, heartbeat_s=0).acquire()
    try:
        before = sorted(p.name for p in run_dir.iterdir())
        proc = subprocess.run([sys.executable, "-m", "dinospec.cli", "train", f"data.path={PHOTOS}",
                               f"train.output_dir={run_dir}", "logging.progress=false"], cwd=REPO,
                              capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"is in use by process {os.getpid()}" in proc.stderr.strip().splitlines()[-1]
        assert sorted(p.name for p in run_dir.iterdir()) == before
    finally:
        held.release()


# ---------------------------------------------------------------------------------------------------------------
# 10: rendezvous ports


_RANK_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch, torch.distributed as tdist
    from dinospec import dist
    env, _ = dist.init_distributed("cpu", timeout_s=60, rendezvous_file=Path(sys.argv[1]))
    t = torch.tensor([float(sys.argv[2])])
    tdist.all_reduce(t)
    print(f"{env.rank} {t.item():g}", flush=True)
    dist.shutdown()
""")


@pytest.mark.slow
def test_two_jobs_on_one_node_get_their_own_rendezvous(tmp_path):
    """Job ids 7 and 20007 got the same port (20000 + id mod 20000) before: both jobs now form their own group."""
    procs = []
    for job_id, value in (("7", 1), ("20007", 100)):
        folder = tmp_path / f"job{job_id}"
        for rank in range(2):
            env = {**os.environ, "OMP_NUM_THREADS": "1", "SLURM_JOB_ID": job_id, "SLURM_PROCID": str(rank),
                   "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank), "SLURM_JOB_NODELIST": "localhost"}
            for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(key, None)
            procs.append(subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, str(folder / "rdzv"),
                                           str(value * (rank + 1))], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
    assert [o[0].split() for o in outs] == [["0", "3"], ["1", "3"], ["0", "300"], ["1", "300"]]
    assert not list(tmp_path.glob("job*/rdzv*")), "rank 0 removes the rendezvous file once all joined"


# ---------------------------------------------------------------------------------------------------------------
# 11: collectives and the devices their group serves


@pytest.fixture
def one_rank_group(tmp_path):
    """A real one-rank gloo process group with a chosen device map (the caller passes the backend string)."""
    def start(backend: str) -> None:
        store = tdist.FileStore(str(tmp_path / "store"), 1)
        tdist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timedelta(seconds=30))

    yield start
    if tdist.is_initialized():
        tdist.destroy_process_group()


def test_cpu_tensor_collective_on_a_cuda_only_group_is_refused(one_rank_group):
    """A group that serves CUDA only (what a plain NCCL group is) gets the trainer's CPU RNG states: refused with a
    message, on a CPU machine, instead of failing on the first GPU checkpoint."""
    from dinospec.checkpoint_state import Progress

    one_rank_group("cuda:gloo")
    assert dist.served_devices(tdist.get_backend_config()) == {"cuda"}
    with pytest.raises(dist.CollectiveDeviceError, match="gather_stacked all_gather: tensor on cpu"):
        Progress(torch.device("cpu")).state_dict()
    with pytest.raises(dist.CollectiveDeviceError, match="any_rank"):
        dist.any_rank(True, torch.device("cpu"))
    with pytest.raises(dist.CollectiveDeviceError, match="mean_over_ranks"):
        dist.mean_over_ranks({"loss": 1.0}, torch.device("cpu"))


def test_the_gpu_device_map_serves_cpu_state(one_rank_group):
    """The default group dinospec creates on GPU serves CPU tensors through gloo: with the same device map (gloo
    standing in for NCCL, which this machine lacks) the trainer's state and collectives go through."""
    from dinospec.checkpoint_state import Progress

    assert dist.backend_for(use_cuda=True) == "cpu:gloo,cuda:nccl"
    assert dist.served_devices(dist.backend_for(use_cuda=True)) == {"cpu", "cuda"}
    assert dist.served_devices("nccl") == {"cuda"} and dist.served_devices("gloo") == {"cpu", "cuda"}
    one_rank_group(dist.backend_for(use_cuda=True).replace("nccl", "gloo"))
    state = Progress(torch.device("cpu")).state_dict()
    assert state["rng.python_state"].shape[0] == 1  # (world size, ...)
    assert dist.any_rank(True, torch.device("cpu")) and dist.mean_over_ranks({"a": 2.0}, torch.device("cpu")) == \
        {"a": 2.0}


def test_every_tensor_collective_in_dinospec_goes_through_the_device_check():
    """Raw torch.distributed tensor collectives outside dinospec/dist.py would bypass check_devices."""
    raw = ("all_reduce(", "all_gather(", "all_gather_into_tensor(", "reduce_scatter", "broadcast(", "all_to_all(",
           "reduce(", "gather(", "scatter(")
    offenders = []
    for path in (REPO / "dinospec").rglob("*.py"):
        if path.name == "dist.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if any(f"dist.{op}" in code for op in raw) and "dist.gather_stacked" not in code:
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, offenders


# ---------------------------------------------------------------------------------------------------------------
# 5: an async save on a full disk


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _fill(disk: Path, leave_bytes: int) -> None:
    """Write a ballast file until only `leave_bytes` are free on the file system of `disk`."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(disk / "ballast", "wb") as f:
        f.write(b"\0" * max(0, free - leave_bytes))


@pytest.mark.slow
def test_async_save_on_a_full_disk_is_reported_first_and_the_previous_checkpoint_stays(tmp_path):
    from conftest import tiny_overrides

    from dinospec.checkpoint import load_model_state

    disk = tmp_path / "disk"
    if not _tmpfs(disk, "16m"):
        pytest.skip("cannot mount a tmpfs here (needs root): no full disk to test on")
    try:
        run_dir = disk / "run"
        args = tiny_overrides(run_dir, PHOTOS, **{"checkpoint.async_save": "true", "checkpoint.period_steps": 2,
                                                  "checkpoint.keep_last": 2, "train.max_steps": 40})
        proc = subprocess.Popen([sys.executable, "-m", "dinospec.cli", "train", *args], cwd=REPO,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        latest = run_dir / "checkpoints" / "latest"
        deadline = time.time() + 120
        while not (latest.exists() and latest.read_text().strip() == "step_2"):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGSTOP)  # the disk fills while the run stands still (a checkpoint needs ~1 MB)
        _fill(disk, leave_bytes=64 * 1024)
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 1, err[-3000:]
        errors = [line for line in err.splitlines() if "ERROR" in line or line.startswith("dinospec:")]
        assert "checkpoint step 4 could not be saved" in errors[0] and "No space left on device" in errors[0], err
        assert "still names step_2" in errors[0]
        assert "Traceback" not in err, err[-3000:]
        assert err.strip().splitlines()[-1].startswith("dinospec: error: checkpoint save failed")
        assert latest.read_text().strip() == "step_2"
        (disk / "ballast").unlink()
        state = load_model_state(run_dir)  # verified and loaded: the previous checkpoint is intact
        assert any(k.startswith("teacher.") for k in state)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# ---------------------------------------------------------------------------------------------------------------
# 7: progress on a terminal and on a log file


def _log_steps(logger, steps: int) -> None:
    for step in range(1, steps + 1):
        logger.advance()
        logger.log(step, {"loss": 1.0 / step, "lr": 1e-3, "img_s": 12.5})


def test_progress_on_a_log_file_is_a_few_plain_lines(tmp_path):
    from dinospec.metrics import MetricsLogger

    with open(tmp_path / "job.out", "w") as console:  # what SLURM's --output is: a file, not a terminal
        logger = MetricsLogger(tmp_path / "run", True, 500, 0, progress=True, console=console, plain_every_s=3600)
        _log_steps(logger, 500)
        logger.close()
    text = (tmp_path / "job.out").read_text()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert len(lines) == 2 and lines[0].startswith("step 1/500 (0.2%) loss 1 lr 0.001 img_s 12.5")
    assert lines[1].startswith("step 500/500 (100.0%) loss 0.002") and "eta 0:00:00" in lines[1]
    with open(tmp_path / "job2.out", "w") as console:  # every logged step when the interval is 0
        logger = MetricsLogger(tmp_path / "run2", True, 50, 10, progress=True, console=console, plain_every_s=0)
        _log_steps(logger, 40)
        logger.close()
    assert len((tmp_path / "job2.out").read_text().splitlines()) == 40


def test_progress_on_a_terminal_is_a_bar(tmp_path):
    from dinospec.metrics import MetricsLogger

    import fcntl
    import struct
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    with os.fdopen(slave, "w") as console:
        assert console.isatty()
        logger = MetricsLogger(tmp_path / "run", True, 20, 0, progress=True, console=console)
        _log_steps(logger, 20)
        logger.close()
    os.set_blocking(master, False)
    shown = b""
    try:
        while chunk := os.read(master, 65536):
            shown += chunk
    except (BlockingIOError, OSError):
        pass
    os.close(master)
    assert b"\r" in shown and b"20/20" in shown and b"step 20/20" not in shown


def test_metrics_on_a_full_disk_are_reported_once_and_do_not_stop_the_run(tmp_path, caplog):
    from dinospec.metrics import MetricsLogger

    disk = tmp_path / "disk"
    if not _tmpfs(disk, "1m"):
        pytest.skip("cannot mount a tmpfs here (needs root): no full disk to test on")
    try:
        logger = MetricsLogger(disk / "run", True, 100, 0, progress=False)
        _fill(disk, leave_bytes=0)
        with caplog.at_level("ERROR", logger="dinospec.metrics"):
            _log_steps(logger, 100)
            logger.close()
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and "No space left on device" in errors[0] and "metrics.jsonl" in errors[0]
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# ---------------------------------------------------------------------------------------------------------------
# 6: unreadable images in `dinospec eval`


def _split_with_broken_files(root: Path, source: Path, per_class: int) -> list[Path]:
    """A copy of a labelled split (a few images per class) with a truncated JPEG and an empty PNG added."""
    import shutil

    for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        (root / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[:per_class]:
            shutil.copy(image, root / class_dir.name / image.name)
    first, second = sorted(p for p in root.iterdir() if p.is_dir())[:2]
    truncated = first / "truncated.jpg"
    truncated.write_bytes((PHOTOS / "skimage_coffee.jpg").read_bytes()[:200])
    empty = second / "empty.png"
    empty.write_bytes(b"")
    return [truncated, empty]


@pytest.mark.parametrize("task", ["knn", "linear"])
def test_eval_skips_counts_and_reports_unreadable_images(task, tmp_path, capsys, caplog):
    from dinospec.cli import main
    from dinospec.export import save_backbone
    from dinospec.models.vit import build_backbone

    fashion = REPO / "data" / "eval" / "fashion_mnist"
    train_broken = _split_with_broken_files(tmp_path / "train", fashion / "train", per_class=6)
    val_broken = _split_with_broken_files(tmp_path / "val", fashion / "val", per_class=3)
    student = dict(arch="vit_pico", patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0,
                   num_register_tokens=0, layerscale=1e-5, qkv_bias=True, proj_bias=True, ffn_bias=True,
                   attn_backend="sdpa", interpolate_offset=0.1, interpolate_antialias=False, drop_path_rate=0.0)
    spec = dict(groups=[["cls"], ["reg", "patch"]], norm1="none", qkv="none", proj="none", norm2="none",
                mlp="none", ls1="none", ls2="none", final_norm=False)
    torch.manual_seed(0)
    export = save_backbone(build_backbone(student, spec, img_size=32), tmp_path / "export", student, spec)
    out = tmp_path / "result.json"
    extra = ["--k", "5"] if task == "knn" else ["--l2", "0.01"]
    with caplog.at_level("WARNING", logger="dinospec.eval.features"):
        rc = main(["eval", task, "--backbone", str(export), "--img-size", "32", "--json", str(out), "--no-progress",
                   "--train", str(tmp_path / "train"), "--val", str(tmp_path / "val"), *extra])
    assert rc == 0, capsys.readouterr().err
    results = json.loads(out.read_text())["results"]
    skipped = results["skipped_images"]
    for split, broken in (("train", train_broken), ("val", val_broken)):
        assert sorted(s.split(":")[0].removeprefix("cannot read image ") for s in skipped[split]) == \
            sorted(map(str, broken))
    assert results["num_train"] == 60 and results["num_val"] == 30
    warnings = [r.getMessage() for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert len(warnings) == 4  # each broken file once
    assert "2 unreadable train image(s), 2 unreadable val image(s)" in capsys.readouterr().out


def test_submitted_paths_are_made_absolute(tmp_path, monkeypatch):
    """A job runs in its code snapshot: every path it reads, phase sources and distillation teachers included, is
    made absolute at submission."""
    from dinospec.config import load_config
    from dinospec.launch import PATH_KEYS, with_absolute_paths
    from omegaconf import OmegaConf

    monkeypatch.chdir(tmp_path)
    for key in PATH_KEYS:  # one at a time: some are exclusive (init_from and pretrained_weights)
        absolute = with_absolute_paths(load_config([], [f"{key}=rel/path"]))
        assert OmegaConf.select(absolute, key) == str(tmp_path / "rel" / "path"), key
    assert {"train.init_from", "distill.teacher"} <= set(PATH_KEYS)
