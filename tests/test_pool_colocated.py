"""placement="colocated": a target replica and a real Ray Train worker share one (fake) GPU."""

from __future__ import annotations

import json
import os

import pytest
import ray
from conftest import local_ray, random_batch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from eagle_ray.pool import PooledTargetModel


@pytest.fixture(scope="module")
def one_gpu_cluster():
    # workers import this module to unpickle the train function
    with local_ray(num_cpus=4, num_gpus=1, store_mb=128, env={"PYTHONPATH": os.path.dirname(__file__)}):
        yield


def _train_worker(config: dict) -> None:
    """A Ray Train worker: reads one shard of supervision from the object store, reports its GPU."""
    sup = ray.get(config["refs"][0])
    report = {
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        "tokens": sup.num_tokens,
        "aux_shape": list(sup.aux_hidden_states.shape),
        "aux_sum": float(sup.aux_hidden_states.double().sum()),
    }
    with open(config["out"], "w") as f:
        json.dump(report, f)


def test_colocated_replica_shares_gpu_with_train_worker(one_gpu_cluster, tiny_paths, tmp_path):
    with PooledTargetModel.from_pretrained(
        tiny_paths["llama"], engine="hf", replicas=1, placement="colocated", gpu_fraction=0.5
    ) as pool:
        (desc,) = pool.replicas()
        assert desc["gpu_ids"] == ["0"]
        assert ray.available_resources().get("GPU") == 0.5  # the other half is the trainer's
        batch = random_batch([11, 7])
        results = pool.submit(batch)
        out = tmp_path / "worker.json"
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={"refs": [results[0].ref], "out": str(out)},
            torch_config=TorchConfig(backend="gloo"),  # fake GPUs: no CUDA, no NCCL here
            scaling_config=ScalingConfig(num_workers=1, use_gpu=True, resources_per_worker={"CPU": 1, "GPU": 0.5}),
            run_config=RunConfig(storage_path=str(tmp_path / "ray_train")),
        )
        trainer.fit()
        report = json.loads(out.read_text())
        expected = ray.get(results[0].ref)
    assert report["gpu_ids"] == desc["gpu_ids"]  # same GPU id: colocated
    assert report["tokens"] == expected.num_tokens and report["aux_shape"] == list(expected.aux_hidden_states.shape)
    assert report["aux_sum"] == pytest.approx(float(expected.aux_hidden_states.double().sum()), rel=0, abs=1e-9)


def test_colocated_rejects_tensor_parallel(one_gpu_cluster, tiny_paths):
    with pytest.raises(ValueError, match="colocated"):
        PooledTargetModel.from_pretrained(tiny_paths["llama"], engine="sglang", tp_size=2, placement="colocated")
    assert os.environ.get("CUDA_VISIBLE_DEVICES") in (None, "")  # the driver itself pins nothing


def test_draft_training_colocated_with_the_replica(one_gpu_cluster, tiny_paths, tmp_path):
    """The whole trainer on one (fake) GPU: replica and Ray Train worker each take half of it."""
    from eagle_ray.pool import serve_pool
    from eagle_ray.train.loop import DraftTrainConfig
    from eagle_ray.train.trainer import train_draft

    batches = [random_batch([9, 14, 5], seed=s) for s in range(4)]
    # the worker is a client of the pool and reads its own node's replica (colocated placement)
    with serve_pool("colocated", tiny_paths["llama"], engine="hf", replicas=1, placement="colocated") as pool:
        result = train_draft(
            pool,
            batches,
            DraftTrainConfig(max_steps=6, lr=1e-3, ttt_steps=3, checkpoint_every=3, log_every=3),
            storage_path=tmp_path,
            name="colocated",
            use_gpu=True,
            resources_per_worker={"CPU": 1, "GPU": 0.5},
            backend="gloo",  # fake GPUs: no CUDA here
        )
    assert result.steps == 6 and [r["step"] for r in result.history] == list(range(1, 7))
    assert result.history[-1]["samples"] == 6 * 3  # 6 steps of one 3-sequence batch
    assert (result.export_dir / "model.safetensors").exists()
