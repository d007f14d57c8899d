"""Rank discovery from torchrun / SLURM variables, and what `dinospec submit` asks SLURM for (no cluster needed)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from dinospec import cli
from dinospec.checkpoint import Checkpointer
from dinospec.config import ConfigError, load_config, to_yaml
from dinospec.dist import DistEnv, expand_nodelist, read_env
from dinospec.launch import Resources, SignalLog, config_from_yaml, parse_time, sbatch_script

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")

NODELISTS = {
    "node[01-03,07]": ["node01", "node02", "node03", "node07"],
    "gpu[1-2],cpu5": ["gpu1", "gpu2", "cpu5"],
    "x[1-2],y[10-11],z": ["x1", "x2", "y10", "y11", "z"],
    "n[008-010]": ["n008", "n009", "n010"],
    "a[1-2]-b[3-4]": ["a1-b3", "a1-b4", "a2-b3", "a2-b4"],
    "rack1-n[9-11]": ["rack1-n9", "rack1-n10", "rack1-n11"],
    "host": ["host"],
    "login-1.cluster": ["login-1.cluster"],
}


@pytest.mark.parametrize("nodelist", sorted(NODELISTS))
def test_expand_nodelist(nodelist):
    assert expand_nodelist(nodelist) == NODELISTS[nodelist]


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol not installed: no cross-check with SLURM")
def test_expand_nodelist_agrees_with_scontrol():
    for nodelist in NODELISTS:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        assert expand_nodelist(nodelist) == out, nodelist


def test_read_env_torchrun():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "29555",
           # torchrun inside a SLURM allocation: torchrun's variables win
           "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "x[1-2]", "SLURM_JOB_ID": "9"}
    assert read_env(env) == DistEnv(3, 8, 1, "node7", 29555, "torchrun")


def test_read_env_slurm():
    env = {"SLURM_PROCID": "13", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_JOB_NODELIST": "gpu[07-08]",
           "SLURM_JOB_ID": "123456"}
    assert read_env(env) == DistEnv(13, 16, 5, "gpu07", 0, "slurm")  # port 0: rank 0 picks and publishes one
    # the older variable name, and an explicit rendezvous
    env2 = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_NODELIST": "a[1-2]-b[3-4]", "SLURM_JOB_ID": "7",
            "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "30000"}
    assert read_env(env2) == DistEnv(1, 2, 0, "10.0.0.1", 30000, "slurm")


def test_read_env_single():
    assert read_env({}).source == "single"
    assert read_env({}).world_size == 1
    # one SLURM task (sbatch without srun, or --ntasks=1): no process group to form
    assert read_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "5"}).source == "single"


def test_parse_time():
    assert parse_time("90") == 90
    assert parse_time("01:30:00") == 90
    assert parse_time("48:00:00") == 48 * 60
    assert parse_time("1:30") == 2  # M:S, rounded up to whole minutes
    assert parse_time("2-00:00:00") == 2 * 24 * 60
    assert parse_time("1-12") == 36 * 60
    assert parse_time("0-00:10") == 10
    for bad in ("", "1h", "00:00:00", "1:2:3:4"):
        with pytest.raises(ConfigError):
            parse_time(bad)


def test_dry_run_prints_the_sbatch_script(tmp_path, capsys):
    run_dir = tmp_path / "run"
    rc = cli.main(["submit", "--config", DEMO, f"train.output_dir={run_dir}", "data.num_workers=9",
                   "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--time", "2-00:00:00",
                   "--account", "proj", "--qos", "high", "--constraint", "h100", "--mem", "0",
                   "--exclude", "bad[1-2]", "--slurm", "gres=gpu:8", "--slurm", "exclusive", "--dry-run"])
    script = capsys.readouterr().out
    assert rc == 0
    lines = set(script.splitlines())
    for directive in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=10",
                      "--partition=gpu", "--time=2880", "--signal=USR2@180", "--requeue", "--account=proj",
                      "--qos=high", "--constraint=h100", "--mem=0", "--exclude='bad[1-2]'", "--gres=gpu:8",
                      "--exclusive", "--job-name=dinospec-run", "--open-mode=append",
                      f"--output={run_dir}/slurm/%j_0_log.out"):
        assert f"#SBATCH {directive}" in lines, (directive, script)
    srun = [line for line in lines if line.startswith("srun ")]
    assert len(srun) == 1 and "--kill-on-bad-exit=1" in srun[0] and "-m submitit.core._submit" in srun[0]
    assert "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-10}" in lines
    assert not run_dir.exists(), "a dry run writes nothing"


def test_dry_run_cpu_tasks_and_defaults(tmp_path):
    cfg = load_config([DEMO], [f"train.output_dir={tmp_path / 'cpu'}"])
    script = sbatch_script(cfg, Resources(tasks_per_node=2, time_min=30, job_name="cpu"))
    lines = set(script.splitlines())
    assert "#SBATCH --ntasks-per-node=2" in lines and "#SBATCH --time=30" in lines
    assert not any("gpus" in line for line in lines)  # no GPU request at all on CPU, not gpus=0


def test_submit_refuses_bad_requests_before_anything_runs(tmp_path, capsys):
    base = ["submit", "--config", DEMO, f"train.output_dir={tmp_path / 'r'}", "--dry-run"]
    assert cli.main(base[:4] + ["student.arch=vit_huge"] + base[4:]) == 2  # the config is validated first
    assert "vit_huge" in capsys.readouterr().err
    assert cli.main(base + ["--gpus-per-node", "2", "--tasks-per-node", "4"]) == 2
    assert cli.main(base + ["--time", "1", "--signal-delay", "90"]) == 2
    assert cli.main(base + ["--slurm=--bad"]) == 2  # sbatch options are given without their dashes
    assert not (tmp_path / "r").exists()


def test_submit_checks_the_run_directory_it_would_resume(tmp_path, capsys):
    run_dir = tmp_path / "run"
    saved = load_config([DEMO], [f"train.output_dir={run_dir}", "student.embed_dim=96"])
    Checkpointer(run_dir).save(3, {"model": {"w": torch.zeros(2)}}, config_yaml=to_yaml(saved))
    argv = ["submit", "--config", DEMO, f"train.output_dir={run_dir}"]
    assert cli.main(argv + ["student.embed_dim=96", "--dry-run"]) == 0  # same model: it resumes
    assert cli.main(argv + ["--dry-run"]) == 2  # another model: refused before anything is queued
    assert "student.embed_dim" in capsys.readouterr().err


def test_config_round_trip_through_the_job():
    cfg = load_config([DEMO], ["spec=paper", "optim.base_lr=0.001"])
    again = config_from_yaml(to_yaml(cfg))
    assert to_yaml(again) == to_yaml(cfg)
    with pytest.raises(ConfigError, match="schema"):
        config_from_yaml(to_yaml(cfg) + "\nnot_a_section: {x: 1}\n")


def test_signal_log_records_signals_whatever_handler_runs():
    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda s, f: seen.append(s))
    try:
        with SignalLog() as log:
            os.kill(os.getpid(), signal.SIGUSR2)
            signal.raise_signal(signal.SIGUSR2)
        assert seen == [signal.SIGUSR2, signal.SIGUSR2]
        assert log.received == {signal.SIGUSR2}
        with SignalLog() as quiet:
            pass
        assert quiet.received == set()
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_strategy_alone_is_a_plain_module_unless_a_group_is_up(tmp_path):
    """auto on one rank: a plain module. An explicit ddp / fsdp on one rank is kept only when a real process group
    is up (a one-GPU check of FSDP2's numerics); with none there is nothing to shard over."""
    from dinospec.parallel import resolve_strategy

    cpu = torch.device("cpu")
    assert [resolve_strategy(s, cpu) for s in ("auto", "ddp", "fsdp", "none")] == ["none"] * 4
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert [resolve_strategy(s, cpu) for s in ("auto", "ddp", "fsdp", "none")] == ["none", "ddp", "fsdp", "none"]
    finally:
        torch.distributed.destroy_process_group()
