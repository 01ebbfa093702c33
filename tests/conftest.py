"""Shared fixtures: tiny targets built from config (never downloaded) and engine caches.

SGLang keeps its runtime config in process globals (one live engine per process), so
SGLang targets come from `sglang_target(...)`, which closes the previous one first.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
import ray
import torch

from eagle_ray import HFEagle3TargetModel, PackedBatch, SGLangEagle3TargetModel, build_tiny_target
from eagle_ray.ray_init import RAY_SYSTEM_CONFIG, init_ray
from eagle_ray.tiny import markov_sequences, pretrain_tiny_target

ARCHS = ["llama", "qwen3"]
# the head node of a `ray.cluster_utils.Cluster` whose other nodes hold the replicas: the pool's system config
CLUSTER_HEAD = {
    "num_cpus": 2,
    "num_gpus": 0,
    "object_store_memory": 128 * 2**20,
    "include_dashboard": False,
    "_system_config": RAY_SYSTEM_CONFIG,
}


def starting(start):
    """`start()` a Ray node (`ray.init` of a local Ray, a `Cluster` with its head, or `add_node`), again when it missed
    its registration deadline.

    Ray gives a starting node 30 s to register with the GCS (fixed in `ray._private.node.Node.__init__`). On a
    machine loaded far past its cores (a load average of 20 on 2 cores, with other test runs) a node missed it, and
    the cluster never started. Then that half-started node's own processes are stopped (its `Node` is found on the
    traceback: a raylet that registered later would join as a node no test counts on), and it starts again, up to
    3 times.
    """
    leave_shared_ray()  # one Ray per process: a module's own Ray or cluster ends the shared one
    for attempt in range(3):
        try:
            return start()
        except Exception as e:
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            tb = e.__traceback__
            while tb is not None:
                node = tb.tb_frame.f_locals.get("self")
                if isinstance(node, ray._private.node.Node):
                    node.kill_all_processes(check_alive=False, allow_graceful=False, wait=True)
                    break
                tb = tb.tb_next


# The one local Ray of the modules that can share one (`shared_ray`): logical CPUs for the most any module runs at once
# (8 target families' replicas, or 3 replicas and 2 draft workers), no GPUs (so `use_gpu=None` pools and jobs that
# join it stay on the CPU; test_pool.py's placement tests have a Ray with fake GPU ids of their own), and this
# directory on every process's path (Ray tasks unpickle test modules' helpers).
SHARED_RAY = {"num_cpus": 12, "num_gpus": 0, "store_mb": 256, "env": {"PYTHONPATH": os.path.dirname(__file__)}}
_shared = {"up": False}


def leave_shared_ray() -> None:
    """End the shared local Ray, if it is up: before a Ray of one's own (one Ray per process), and at the end."""
    if _shared["up"]:
        ray.shutdown()
        _shared["up"] = False


@pytest.fixture(scope="module")
def shared_ray():
    """A module's Ray: the session's one shared local Ray, started at the first module that asks (a start-up and
    shutdown cost ~10 s; nine modules share one). Those modules run last (`pytest_collection_modifyitems`), so no
    module with a Ray of its own comes after them; it ends with the session."""
    if not (_shared["up"] and ray.is_initialized()):
        _start_local_ray(**SHARED_RAY)
        _shared["up"] = True
    yield


def pytest_collection_modifyitems(items: list) -> None:
    """The modules on the shared Ray after all others (stable otherwise): one start-up for all of them."""
    shared = {item.nodeid.split("::")[0] for item in items if "shared_ray" in item.fixturenames}
    items.sort(key=lambda item: item.nodeid.split("::")[0] in shared)


@contextmanager
def local_ray(num_cpus: int, num_gpus: int | None = None, store_mb: int = 256, env: dict | None = None):
    """A private local Ray for one test module (`shared_ray` is the default; this is for a module whose tests depend on
    the Ray's own size, e.g. its object store): the pool's system config, zero-copy tensors, no dashboard.

    `num_cpus` is logical (replicas and workers mostly wait); `num_gpus` gives fake GPU ids.
    """
    _start_local_ray(num_cpus, num_gpus, store_mb, env)
    try:
        yield
    finally:
        ray.shutdown()


def _start_local_ray(num_cpus: int, num_gpus: int | None, store_mb: int, env: dict | None) -> None:
    """Started again if it missed Ray's registration deadline on a loaded machine (`starting`)."""

    def start() -> None:
        try:  # a private local Ray, never one another process left running (RAY_ADDRESS would join one)
            init_ray(
                "local", num_cpus=num_cpus, num_gpus=num_gpus, object_store_memory=store_mb * 2**20, dashboard=False,
                env=env,
            )  # fmt: skip
        except Exception:
            ray.shutdown()  # what this process set up for the failed start: a next ray.init starts afresh
            raise

    starting(start)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny matmuls: as fast alone on a shared 2-core machine, ~10x faster under
    load (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("targets")
    return {arch: str(build_tiny_target(root / arch, arch)) for arch in ARCHS}


@pytest.fixture(scope="session")
def markov_target(tmp_path_factory) -> str:
    """A tiny llama pretrained on `markov_sequences` (seed 1): a target with peaked, learnable predictions.

    Measured on the shared 2-core CPU machine (one torch thread): 150 steps x 16 sequences take 6-10 s
    (first loss 7.01, mean of the last ten 1.09; the chain's entropy is 1.02 nats/token). On fresh text
    (seed 7, 64 sequences, 2,954 tokens) its argmax is the successor map's choice at 100% of positions,
    and 128/128 greedy-continuation tokens (8 prompts x 16) follow the map (80 steps: 99.8% / 99.2%).
    """
    path = build_tiny_target(tmp_path_factory.mktemp("targets") / "markov", "llama")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: with other work on the 2 cores, two threads ran ~10x slower
    try:
        pretrain_tiny_target(path, markov_sequences(2048, (32, 64), seed=1), steps=150, batch_size=16)
    finally:
        torch.set_num_threads(threads)
    return str(path)


@pytest.fixture(scope="session")
def sglang_target():
    live: dict = {}

    def get(path: str, **kwargs) -> SGLangEagle3TargetModel:
        key = (path, repr(sorted(kwargs.items())))
        if live.get("key") != key:
            if live:
                live["target"].close()
                live.clear()
            live["target"] = SGLangEagle3TargetModel.from_pretrained(path, **kwargs)
            live["key"] = key
        return live["target"]

    yield get
    if live:
        live["target"].close()


@pytest.fixture(scope="session")
def hf_target():
    cache: dict = {}

    def get(path: str, **kwargs) -> HFEagle3TargetModel:
        key = (path, repr(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = HFEagle3TargetModel.from_pretrained(path, **kwargs)
        return cache[key]

    return get


def random_draft(aux_ids: list[int], draft_vocab: int, seed: int = 0):
    """A draft for the tiny target with every tensor random (norms near 1: a weight of ones would hide a
    mix-up) and a random draft vocabulary: what the export tests write and read back."""
    from eagle_ray.draft.model import Eagle3Draft, Eagle3DraftConfig
    from eagle_ray.tiny import TINY_SHAPE

    shape = {
        k: TINY_SHAPE[k]
        for k in (
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "vocab_size",
            "max_position_embeddings",
        )
    }
    draft = Eagle3Draft(Eagle3DraftConfig(**shape, draft_vocab_size=draft_vocab, aux_layer_ids=aux_ids))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in draft.parameters():
            t.copy_(torch.randn(t.shape, generator=g) * 0.05 + (1.0 if t.ndim == 1 else 0.0))
    vocab = shape["vocab_size"]
    hot = torch.randperm(vocab, generator=g)[:draft_vocab].sort().values
    draft.d2t.copy_(hot - torch.arange(draft_vocab))
    draft.t2d.zero_()
    draft.t2d[hot] = True
    return draft


def random_batch(lengths: list[int], vocab: int = 1024, seed: int = 0) -> PackedBatch:
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    masks = [(torch.rand(n, generator=g) > 0.3).long() for n in lengths]
    return PackedBatch.from_sequences(ids, masks)


def pytest_unconfigure(config) -> None:
    """End the process once pytest is done, skipping the interpreter's own teardown.

    Every test has shut down what it started by then (fixtures stop their Ray clusters and engines). Once,
    after all tests had passed and the summary was printed, that teardown crashed (exit 139, no Python
    frame: a native library's destructor, with SGLang, NeMo's imports and Ray all loaded in one process),
    which would fail a green run. The exit status stays pytest's own.
    """
    import sys

    status = getattr(config, "_eagle_ray_exitstatus", None)
    if status is None:  # the session never ran (a usage error): pytest reports it its own way
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def pytest_sessionfinish(session, exitstatus) -> None:
    leave_shared_ray()
    session.config._eagle_ray_exitstatus = int(exitstatus)
