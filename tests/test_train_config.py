"""The trainer's config is the job's: one set of defaults, one validation; the fault hooks stay off unless asked.

Fast and offline: no Ray, no model.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from eagle_ray.job.config import ConfigError, load_job_config
from eagle_ray.testing import faults
from eagle_ray.train.config import DraftTrainConfig, OptimConfig, sweep_configs


def test_the_job_defaults_are_the_trainers():
    job = load_job_config(None)
    assert isinstance(job.training, OptimConfig)
    assert job.train_config() == DraftTrainConfig()  # a library caller gets the tiny run's defaults too
    assert DraftTrainConfig().lr == 3e-3 and job.checkpoint.every == DraftTrainConfig().checkpoint_every


def test_train_config_takes_every_training_field_and_the_cadences_from_their_sections():
    overrides = ["training.lr=1e-4", "training.warmup_steps=7", "training.weight_decay=0.1", "training.grad_clip=1"]
    overrides += ["training.ttt_steps=3", "training.step_decay=0.5", "training.seed=4", "training.max_steps=9"]
    overrides += ["checkpoint.every=3", "logging.log_every=2", "draft.freeze_embeddings=false"]
    job = load_job_config(None, overrides)
    t = job.train_config()
    assert t.optim_fields() == job.training.optim_fields()
    assert (t.checkpoint_every, t.log_every, t.freeze_embeddings) == (3, 2, False)
    assert job.train_config(max_steps=20).max_steps == 20  # training.epochs resolved by the job


def test_the_ttt_defaults_are_the_objectives():
    from eagle_ray.draft.ttt import DEFAULT_STEP_DECAY, DEFAULT_TTT_STEPS

    assert (OptimConfig().ttt_steps, OptimConfig().step_decay) == (DEFAULT_TTT_STEPS, DEFAULT_STEP_DECAY)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.max_steps=0", "training.max_steps: must be >= 1, got 0"),
        ("training.lr=0", "training.lr: must be > 0"),
        ("training.ttt_steps=0", "training.ttt_steps: must be >= 1"),
        ("checkpoint.every=0", "checkpoint.every: must be >= 1, got 0"),
        ("logging.log_every=0", "logging.log_every: must be >= 1, got 0"),
    ],
)
def test_out_of_range_values_name_the_job_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_job_config(None, [override])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("cache.mode=on", "cache.mode: must be one of off, auto, got True"),
        ("cache.mode=always", "cache.mode: must be one of off, auto, got 'always'"),
        ("cache.max_bytes=0", "cache.max_bytes: must be a positive number of bytes or None, got 0"),
        ("cache.max_bytes=10GB", "cache.max_bytes: expected int, got '10GB'"),
        ("cache.dir=[a]", "cache.dir: expected str, got"),
        ("cache.size=1", r"unknown key cache.size; cache has \['mode', 'dir', 'max_bytes', 'fp8'\]"),
        ("target.release_after_cache=yes_please", "target.release_after_cache: expected bool"),
    ],
)
def test_bad_epoch_cache_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_job_config(None, [override])


def test_the_epoch_cache_keys_read_as_written():
    c = load_job_config(None, ["cache.mode=off"])  # YAML 1.1 reads a bare off as false
    assert c.cache.mode == "off" and load_job_config(None, []).cache.mode == "auto"
    c = load_job_config(None, ["cache.max_bytes=1000000", "cache.dir=/tmp/c", "target.release_after_cache=true"])
    assert (c.cache.max_bytes, c.cache.dir, c.target.release_after_cache) == (1000000, "/tmp/c", True)
    with pytest.raises(ConfigError, match=r"target.release_after_cache: needs the epoch cache \(cache.mode: auto\)"):
        load_job_config(None, ["cache.mode=off", "target.release_after_cache=true"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_steps": 0}, "max_steps: must be >= 1"),
        ({"lr": -1.0}, "lr: must be > 0"),
        ({"checkpoint_every": 0}, "checkpoint_every: must be >= 1"),
        ({"log_every": 0}, "log_every: must be >= 1"),
        ({"max_skipped_batches": -1}, "max_skipped_batches: must be >= 0"),
    ],
)
def test_the_trainer_checks_the_same(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DraftTrainConfig(**kwargs)


def test_the_workers_rebuild_the_config_from_its_dict():
    cfg = DraftTrainConfig(max_steps=12, lr=1e-3, checkpoint_every=4, max_skipped_batches=0)
    assert DraftTrainConfig(**dataclasses.asdict(cfg)) == cfg


def test_lr_warms_up_then_decays_to_a_tenth():
    cfg = OptimConfig(max_steps=100, warmup_steps=10)
    assert cfg.lr_factor(0) == pytest.approx(0.1) and cfg.lr_factor(9) == pytest.approx(1.0)
    assert cfg.lr_factor(10) == pytest.approx(1.0) and cfg.lr_factor(100) == pytest.approx(0.1)
    assert OptimConfig(max_steps=100).lr_factor(4) == pytest.approx(1.0)  # default warm-up: 5% of the steps


def test_train_step_fault_fires_once_on_rank_0_at_its_step(tmp_path):
    assert faults.train_step_fault(0, tmp_path) is None  # off unless planned
    with pytest.raises(ValueError, match="fail_mode: must be one of"):
        faults.plan_train_fault(tmp_path, 3, "segfault")
    faults.plan_train_fault(tmp_path, 3)
    assert faults.train_step_fault(1, tmp_path) is None  # rank 0 only
    fire = faults.train_step_fault(0, tmp_path)
    fire(2)
    with pytest.raises(RuntimeError, match="injected train worker failure at step 3"):
        fire(3)
    assert (tmp_path / "injected_failure_step3").read_text() == "3"
    faults.train_step_fault(0, tmp_path)(3)  # the restarted group trains on


def test_replica_shard_fault_exits_only_on_the_poison_token():
    code = (
        "import torch; from eagle_ray.testing.faults import replica_shard_fault as f; "
        "f(torch.tensor([1, 2])); print('served', flush=True); f(torch.tensor([5, 7]))"
    )
    env = {"EAGLE_RAY_CHAOS_CRASH_TOKEN": "7", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3 and proc.stdout == "served\n", proc.stderr[-2000:]
    faults.replica_shard_fault(torch.tensor([7]))  # this process has no poison token: a no-op


# ------------------------------------------------------------------------------------------ a sweep's arms

SWEEP = [{"lr": 3e-3}, {"lr": 1e-2, "seed": 1}, {"lr": 1e-3, "ttt_steps": 3, "step_decay": 0.5}]


def test_sweep_configs_apply_each_arms_overrides():
    base = DraftTrainConfig(max_steps=6, ttt_steps=2, checkpoint_every=2)
    assert sweep_configs(base, None) == [base]
    arms = sweep_configs(base, SWEEP)
    assert [a.lr for a in arms] == [3e-3, 1e-2, 1e-3] and [a.seed for a in arms] == [0, 1, 0]
    assert arms[2].ttt_steps == 3 and arms[2].step_decay == 0.5 and arms[0].ttt_steps == 2
    assert all(a.max_steps == 6 and a.checkpoint_every == 2 for a in arms)  # the run's, shared by the arms


@pytest.mark.parametrize(
    ("sweep", "error"),
    [
        ([], "sweep: an empty list"),
        ({"lr": 1e-3}, "sweep: expected a list"),
        (["lr"], r"sweep\[0\]: expected a mapping"),
        ([{"lr": 1e-3}, {"max_steps": 9}], r"sweep\[1\].max_steps: not a per-arm field"),
        ([{"learning_rate": 1e-3}], r"sweep\[0\].learning_rate: not a per-arm field"),
        ([{"lr": -1.0}], r"sweep\[0\].lr: must be > 0"),
        ([{"lr": "fast"}], r"sweep\[0\].lr: expected a number"),
        ([{"ttt_steps": 0}], r"sweep\[0\].ttt_steps: must be >= 1"),
        ([{"ttt_steps": 2.5}], r"sweep\[0\].ttt_steps: expected an int"),
        ([{"seed": True}], r"sweep\[0\].seed: expected an int"),
        ([{"attention": "magic"}], r"sweep\[0\].attention: must be one of"),
    ],
)
def test_a_bad_sweep_is_refused_naming_the_arm_and_field(sweep, error):
    with pytest.raises(ValueError, match=error):
        sweep_configs(DraftTrainConfig(), sweep)


def test_the_jobs_sweep_section_is_checked_at_load(tmp_path):
    assert load_job_config().sweep is None and load_job_config().arm_configs() == [load_job_config().train_config()]
    path = tmp_path / "job.yaml"
    path.write_text("training:\n  lr: 1e-3\nsweep:\n  - {lr: 3e-4}\n  - {lr: 1e-3, seed: 2}\n")
    c = load_job_config(path)
    assert c.sweep == [{"lr": 3e-4}, {"lr": 1e-3, "seed": 2}]  # YAML 1.1's "3e-4" string read as a number
    assert [a.lr for a in c.arm_configs()] == [3e-4, 1e-3] and c.arm_configs()[1].seed == 2
    for bad, error in [
        ("sweep=[]", "sweep: an empty list"),
        ("sweep=[{momentum: 0.9}]", r"sweep\[0\].momentum: not a per-arm field"),
        ("sweep=[{lr: 0}]", r"sweep\[0\].lr: must be > 0"),
        ("sweep={lr: 1}", "sweep: expected a list"),
    ]:
        with pytest.raises(ConfigError, match=error):
            load_job_config(overrides=[bad])


def test_arm_fault_fires_once_for_its_arm_and_step(tmp_path):
    assert faults.arm_step_fault(0, tmp_path) is None  # off unless planned
    with pytest.raises(ValueError, match="mode"):
        faults.plan_arm_fault(tmp_path, 3, arm=1, mode="exit")
    faults.plan_arm_fault(tmp_path, 3, arm=1, mode="nan")
    assert faults.arm_step_fault(1, tmp_path) is None  # rank 0 only
    fire = faults.arm_step_fault(0, tmp_path)
    assert not fire(3, 0) and not fire(2, 1) and fire(3, 1) and not fire(3, 1)  # once
    faults.plan_arm_fault(tmp_path, 4, arm=0)
    with pytest.raises(RuntimeError, match="arm 0 at step 4"):
        faults.arm_step_fault(0, tmp_path)(4, 0)
