"""The shipped job configs and cluster recipes: they parse, load, fit their GPUs and agree with the code.

Fast and offline: no Ray cluster is started (`--print-config` resolves a config without Ray).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from eagle_ray.job.config import JobConfig, load_job_config
from eagle_ray.pool.placement import replica_shape
from eagle_ray.ray_init import RAY_SYSTEM_CONFIG, ZERO_COPY_ENV

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
CLUSTER = ROOT / "cluster"
RAY_UP = CLUSTER / "ray-cluster-gpu.yaml"
RAYJOB = CLUSTER / "rayjob.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
CONFIG_8B = ROOT / "configs" / "llama3.1-8b-1node-8gpu.yaml"
CONFIG_70B = ROOT / "configs" / "llama3.3-70b-tp.yaml"
GPU_MEMORY_GB = 80  # the configs are sized for 80 GB GPUs


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _ray_start_params(command: str) -> dict[str, Any]:
    """`ray start` options of a shell command line, parsed by Ray's own CLI (nothing is started)."""
    from ray.scripts.scripts import start

    words = shlex.split(command)
    i = next(i for i in range(len(words) - 1) if words[i : i + 2] == ["ray", "start"])
    return start.make_context("start", words[i + 2 :]).params


def _kuberay_start_params(params: dict[str, str]) -> dict[str, Any]:
    """KubeRay writes each rayStartParams entry as `--key=value` into the pod's shell command."""
    return _ray_start_params("ray start " + " ".join(f"--{k}={v}" for k, v in params.items()))


def _quantity(q: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q))
    assert m, q
    return float(m[1]) * units.get(m[2], 1)


def _shm_bytes(run_options: list[str]) -> float:
    sizes = [re.search(r"--shm-size[= ]'?([0-9]+)([kmgt]?)", o) for o in run_options]
    sizes = [s for s in sizes if s]
    assert len(sizes) == 1, run_options
    return int(sizes[0][1]) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[sizes[0][2]]


def _node_shapes() -> dict[str, dict[str, float]]:
    """The GPU node each cluster recipe provides, as Ray advertises it."""
    up = _yaml(RAY_UP)["available_node_types"]["ray.worker.gpu"]["resources"]
    (group,) = _yaml(RAYJOB)["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    return {
        "ray up": {"CPU": up["CPU"], "GPU": up["GPU"]},
        "kuberay": {"CPU": _quantity(limits["cpu"]), "GPU": int(limits["nvidia.com/gpu"])},
    }


def _fits(c: JobConfig, nodes: int, node: dict[str, float]) -> bool:
    """Can Ray place the job on `nodes` such nodes? One STRICT_PACK bundle per replica (whole GPUs,
    or a fraction of one GPU when colocated) and one bundle per draft worker; first fit, largest first."""
    shape = replica_shape(c.placement.mode, c.target.tp_size, True, c.target.cpus_per_replica, c.placement.gpu_fraction)
    worker_gpus = c.training.gpus_per_worker
    if worker_gpus is None:
        worker_gpus = 1 - c.placement.gpu_fraction if c.placement.mode == "colocated" else 1.0
    bundles = [(shape.gpus, shape.cpus)] * c.target.replicas
    bundles += [(worker_gpus, c.training.cpus_per_worker)] * c.training.num_workers
    free = [{"CPU": node["CPU"], "GPU": [1.0] * int(node["GPU"])} for _ in range(nodes)]
    for gpus, cpus in sorted(bundles, reverse=True):
        for n in free:
            if n["CPU"] < cpus - 1e-9:
                continue
            if gpus >= 1:
                whole = [i for i, g in enumerate(n["GPU"]) if g >= 1 - 1e-9]
                if len(whole) < gpus:
                    continue
                for i in whole[: int(gpus)]:
                    n["GPU"][i] = 0.0
            else:
                part = next((i for i, g in enumerate(n["GPU"]) if g >= gpus - 1e-9), None)
                if part is None:
                    continue
                n["GPU"][part] -= gpus
            n["CPU"] -= cpus
            break
        else:
            return False
    return True


def _gpus_used(c: JobConfig) -> float:
    if c.placement.mode == "colocated":
        return c.target.replicas * c.placement.gpu_fraction + c.training.num_workers * (
            c.training.gpus_per_worker or 1 - c.placement.gpu_fraction
        )
    return c.target.replicas * c.target.tp_size + c.training.num_workers * (c.training.gpus_per_worker or 1)


def _documented_runs(path: Path) -> list[tuple[str, list[str]]]:
    """`jobs/train_eagle3.py --config X overrides...` command lines quoted in a file's comments."""
    runs = []
    for line in path.read_text().splitlines():
        m = re.search(r"jobs/train_eagle3\.py --config (\S+)(.*)$", line)
        if m:
            runs.append((m[1], [w for w in shlex.split(m[2].strip(" \\")) if "=" in w]))
    return runs


def _sglang_pin() -> str:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (pin,) = [d for d in extras["sglang"] if d.startswith("sglang")]
    assert re.fullmatch(r"sglang==[0-9.]+", pin), pin
    return pin


# ------------------------------------------------------------------------------------ every file


@pytest.mark.parametrize("path", [*CONFIGS, *sorted(CLUSTER.glob("*.yaml"))], ids=_rel)
def test_every_yaml_parses(path):
    assert isinstance(_yaml(path), dict)


def test_the_shipped_configs_are_there():
    assert {p.name for p in CONFIGS} >= {"tiny.yaml", CONFIG_8B.name, CONFIG_70B.name}


@pytest.mark.parametrize("path", CONFIGS, ids=_rel)
def test_config_loads_and_says_what_the_file_says(path):
    c = load_job_config(path).to_dict()
    for section, values in _yaml(path).items():
        for key, value in values.items():
            assert c[section][key] == (float(value) if isinstance(c[section][key], float) else value), (section, key)


@pytest.mark.parametrize("path", CONFIGS, ids=_rel)
def test_print_config_runs_without_ray_and_prints_the_file(path):
    proc = subprocess.run(
        [sys.executable, "jobs/train_eagle3.py", "--config", _rel(path), "--print-config"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)
    assert printed == json.loads(json.dumps(load_job_config(path).to_dict()))
    for section, values in _yaml(path).items():
        for key, value in values.items():
            assert printed[section][key] == value, (section, key)


def test_tiny_yaml_is_the_default():
    assert load_job_config(ROOT / "configs" / "tiny.yaml") == load_job_config(None)


# ----------------------------------------------------------------------------- the GPU configs


@pytest.mark.parametrize("path", [CONFIG_8B, CONFIG_70B], ids=_rel)
def test_gpu_configs_are_complete_cluster_runs(path):
    c = load_job_config(path)
    assert c.target.engine == "sglang" and c.target.dtype == "bfloat16"
    assert Path(c.target.model_path).is_absolute()
    assert c.placement.mode == "separate" and c.placement.use_gpu is True
    assert c.training.use_gpu is True and c.training.backend == "nccl"
    assert c.training.lr == 1e-4 and c.training.ttt_steps == 7
    assert c.checkpoint.storage_path.startswith("/mnt/cluster_storage/") and c.checkpoint.every == 500
    assert c.export.dtype == "bfloat16"
    assert c.ray.address is None  # ray job submit's RAY_ADDRESS
    assert c.data.chat_template == "llama3" and c.data.max_length in (2048, 4096)
    assert c.data.batch_tokens >= 2 * c.data.max_length
    assert 0 < c.target.engine_kwargs["mem_fraction_static"] < 1


def test_8b_fits_one_8gpu_node():
    c = load_job_config(CONFIG_8B)
    assert c.target.tp_size == 1
    assert c.target.replicas * c.target.tp_size + c.training.num_workers <= 8
    assert _gpus_used(c) == 8  # nothing idle
    assert c.data.batch_tokens == 16384
    for name, node in _node_shapes().items():
        assert node["GPU"] == 8, name
        assert _fits(c, 1, node), name
    # bf16 weights (~16 GB) inside SGLang's share of the GPU, with room for the KV cache
    assert 8e9 * 2 < 0.5 * c.target.engine_kwargs["mem_fraction_static"] * GPU_MEMORY_GB * 1e9


def test_8b_colocated_variant_shares_the_same_8_gpus():
    runs = [(cfg, ov) for cfg, ov in _documented_runs(CONFIG_8B) if "placement.mode=colocated" in ov]
    assert len(runs) == 1, "the colocated variant command is documented in the 8B config"
    cfg, overrides = runs[0]
    assert (ROOT / cfg).resolve() == CONFIG_8B
    c = load_job_config(CONFIG_8B, overrides)
    assert c.placement.mode == "colocated" and c.target.tp_size == 1
    assert c.target.replicas == c.training.num_workers == 8  # one replica and one worker per GPU
    assert c.target.replicas * c.placement.gpu_fraction + c.training.num_workers * (1 - c.placement.gpu_fraction) <= 8
    assert _gpus_used(c) == 8
    # SGLang must leave the draft worker its share of the memory (the pool defaults it to
    # 0.9 * gpu_fraction; the separate config's 0.85 must be overridden)
    assert c.target.engine_kwargs["mem_fraction_static"] <= 0.9 * c.placement.gpu_fraction
    assert 8e9 * 2 < 0.6 * c.target.engine_kwargs["mem_fraction_static"] * GPU_MEMORY_GB * 1e9
    assert c.data.batch_tokens < load_job_config(CONFIG_8B).data.batch_tokens
    for name, node in _node_shapes().items():
        assert _fits(c, 1, node), name


def test_70b_tensor_parallel_fits_two_8gpu_nodes():
    c = load_job_config(CONFIG_70B)
    assert c.target.tp_size == 4 and 8 % c.target.tp_size == 0  # a replica's ranks share one node
    assert c.target.tp_size * c.target.replicas + c.training.num_workers <= 16
    assert _gpus_used(c) == 16
    for name, node in _node_shapes().items():
        assert _fits(c, 2, node), name
        assert not _fits(c, 1, node), name
    # bf16 weights per rank (~35 GB) inside SGLang's share of the GPU, half of it left for KV
    assert 70e9 * 2 / c.target.tp_size < 0.6 * c.target.engine_kwargs["mem_fraction_static"] * GPU_MEMORY_GB * 1e9
    assert c.data.format == "messages" and all(Path(p).is_absolute() for p in c.data.paths)


def test_colocation_with_tensor_parallelism_is_refused():
    with pytest.raises(ValueError, match="colocated"):
        load_job_config(CONFIG_70B, ["placement.mode=colocated"])


def test_engine_kwargs_are_sglang_server_args():
    server_args = pytest.importorskip("sglang.srt.server_args")
    fields = set(server_args.ServerArgs.__struct_fields__)
    for path in CONFIGS:
        kwargs = load_job_config(path).target.engine_kwargs
        assert set(kwargs) <= fields, (path.name, set(kwargs) - fields)


# -------------------------------------------------------------------------------- cluster files


def test_ray_up_yaml_is_a_valid_cluster_config():
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema = pytest.importorskip("jsonschema")
    config = _yaml(RAY_UP)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))
    assert config["provider"]["type"] == "aws"
    head = config["available_node_types"][config["head_node_type"]]
    assert "GPU" not in head["resources"]
    assert config["file_mounts"] == {"~/eagle_ray": "."}


def test_ray_up_head_carries_the_pools_system_config():
    config = _yaml(RAY_UP)
    (start,) = [cmd for cmd in config["head_start_ray_commands"] if "ray start" in cmd]
    params = _ray_start_params(start)
    assert params["head"] is True and params["num_gpus"] == 0
    assert params["system_config"] == RAY_SYSTEM_CONFIG
    # and the JSON as written on the command line, read back by hand
    written = re.search(r"--system-config='(\{.*?\})'", start)
    assert written and json.loads(written[1]) == RAY_SYSTEM_CONFIG
    for cmd in config["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert _ray_start_params(cmd)["system_config"] is None  # only the head takes it


def test_ray_up_shm_holds_the_object_store():
    config = _yaml(RAY_UP)
    docker = config["docker"]
    assert docker["image"].startswith("rayproject/ray:")
    for kind, options in (("head", "head_run_options"), ("worker", "worker_run_options")):
        shm = _shm_bytes(docker["run_options"] + docker[options])
        (start,) = [c for c in config[f"{kind}_start_ray_commands"] if "ray start" in c]
        store = _ray_start_params(start)["object_store_memory"]
        assert store and store < shm, (kind, store, shm)
    assert _shm_bytes(docker["worker_run_options"]) >= 64 * 2**30


def test_rayjob_is_a_kuberay_job_of_the_entrypoint():
    job = _yaml(RAYJOB)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    words = shlex.split(spec["entrypoint"])
    assert words[:2] == ["python", "jobs/train_eagle3.py"] and words[2] == "--config"
    assert (ROOT / words[3]).resolve() == CONFIG_8B
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env["env_vars"] == ZERO_COPY_ENV
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    head_params = _kuberay_start_params(head["rayStartParams"])
    assert head_params["system_config"] == RAY_SYSTEM_CONFIG and head_params["num_gpus"] == 0
    (group,) = cluster["workerGroupSpecs"]
    container = group["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert head["template"]["spec"]["containers"][0]["image"] == container["image"]


@pytest.mark.parametrize("group", ["head", "worker"])
def test_rayjob_pods_mount_memory_backed_dev_shm_bigger_than_the_store(group):
    cluster = _yaml(RAYJOB)["spec"]["rayClusterSpec"]
    g = cluster["headGroupSpec"] if group == "head" else cluster["workerGroupSpecs"][0]
    pod = g["template"]["spec"]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"
    shm = _quantity(volume["emptyDir"]["sizeLimit"])
    store = _kuberay_start_params(g["rayStartParams"])["object_store_memory"]
    assert store and store < shm
    assert shm < _quantity(pod["containers"][0]["resources"]["limits"]["memory"])  # it counts against it


def test_runtime_env_has_the_zero_copy_var():
    env = _yaml(CLUSTER / "runtime_env.yaml")
    assert env["env_vars"] == ZERO_COPY_ENV
    assert env["env_vars"]["RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"] == "1"


def test_cluster_files_pin_the_sglang_of_pyproject():
    pin = _sglang_pin()
    for path in (RAY_UP, DOCKERFILE):
        pins = re.findall(r"sglang==[0-9][0-9.]*[0-9]", path.read_text())
        assert pins and set(pins) == {pin}, (path.name, pins)
    assert "[sglang]" in RAY_UP.read_text() and "[sglang]" in DOCKERFILE.read_text()  # the project too


def test_cluster_images_match_the_ray_and_python_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (ray_pin,) = [d for d in project["dependencies"] if d.startswith("ray[")]
    ray_version = re.search(r"==([0-9.]+)", ray_pin)[1].rstrip(".")
    python = re.search(r">=3\.(\d+)", project["requires-python"])[1]
    base = re.search(r"^FROM (\S+)", DOCKERFILE.read_text(), flags=re.M)[1]
    for image in (base, _yaml(RAY_UP)["docker"]["image"]):
        m = re.fullmatch(r"rayproject/ray:([0-9.]+)-py3(\d+)-(gpu|cu\d+)", image)
        assert m and m[1].startswith(ray_version) and m[2] == python, image
    assert _yaml(RAYJOB)["spec"]["rayClusterSpec"]["rayVersion"].startswith(ray_version)


@pytest.mark.parametrize("path", [RAYJOB, RAY_UP, DOCKERFILE, ROOT / "README.md", *CONFIGS], ids=lambda p: p.name)
def test_paths_named_in_recipes_and_readme_exist(path):
    text = path.read_text()
    named = set(re.findall(r"(?<![\w/.-])((?:jobs|configs|cluster|benchmarks)/[\w.-]+\.(?:py|yaml))", text))
    named |= {cfg for cfg, _ in _documented_runs(path)}
    named |= set(re.findall(r"-f (cluster/\S+)", text))
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"{path.name} names {missing}"
    if path in (RAYJOB, RAY_UP):
        assert "jobs/train_eagle3.py --config configs/" in text


def test_documented_overrides_load():
    for path in [*CONFIGS, RAY_UP, RAYJOB, ROOT / "README.md"]:
        for cfg, overrides in _documented_runs(path):
            load_job_config(ROOT / cfg, overrides)


# ----------------------------------------------------------------------------- config errors


def _main_exit(argv: list[str], capsys) -> tuple[int, str]:
    from eagle_ray.job.run import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out + out.err


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("target:\n  replica: 4\n", "target.replica"),
        ("trainer:\n  max_steps: 10\n", "trainer"),
        ("training:\n  max_steps: many\n", "training.max_steps"),
        ("training:\n  use_gpu: 1\n", "training.use_gpu"),
        ("target:\n  engine_kwargs: [mem_fraction_static]\n", "target.engine_kwargs"),
        ("placement:\n  mode: shared\n", "placement.mode"),
        ("data:\n  max_length: 4096\n  batch_tokens: 2048\n", "data.batch_tokens"),
        ("target: 4\n", "target"),
    ],
)
def test_config_file_errors_exit_nonzero_and_name_the_key(tmp_path, capsys, text, names):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code, message = _main_exit(["--config", str(path), "--print-config"], capsys)
    assert code != 0
    assert names in message
    assert "{" not in message.split("error:")[0]  # nothing was printed as a config


def test_unknown_key_exits_nonzero_in_a_fresh_process(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(CONFIG_8B.read_text().replace("  ttt_steps: 7", "  ttt_step: 7"))
    proc = subprocess.run(
        [sys.executable, "jobs/train_eagle3.py", "--config", str(path), "--print-config"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0 and proc.stdout == ""
    assert "training.ttt_step" in proc.stderr


def test_override_errors_name_the_key(capsys):
    code, message = _main_exit(["--config", _rel(CONFIG_8B), "training.lr=fast", "--print-config"], capsys)
    assert code != 0 and "training.lr" in message


def test_help_lists_every_option_with_its_default(capsys):
    code, out = _main_exit(["--help"], capsys)
    assert code == 0
    assert "training.max_steps = 150" in out
    assert "placement.mode = 'separate'" in out and "target.replicas = 2" in out
    assert "checkpoint.every = 50" in out
