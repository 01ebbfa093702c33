"""`eagle-ray regenerate` on a real local Ray: a pool of tiny HF replicas rewrites chat data with its own answers."""

from __future__ import annotations

import json

import pytest
import torch

from eagle_ray.data import load_tokenizer
from eagle_ray.data.templates import get_template
from eagle_ray.draft.decode import target_decode
from eagle_ray.engines.hf import HFEngine
from eagle_ray.job.regenerate import parse_args, prompt_ids, regenerate_file, resume_point, run
from eagle_ray.pool import PooledTargetModel
from eagle_ray.tiny import build_tiny_target

CONVS = [
    [("user", "Name three primary colours."), ("assistant", "Red, yellow and blue.")],
    [("user", "What is 2 + 2?"), ("assistant", "4."), ("user", "And 3 + 3?"), ("assistant", "6.")],
    [("user", "word " * 400), ("assistant", "Too long to answer here.")],  # the prompt alone exceeds --max-length
    [("system", "Be brief."), ("user", "Say hi."), ("assistant", "Hi!")],
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_ray):
    root = tmp_path_factory.mktemp("regen")
    tok = load_tokenizer("qwen")
    target = build_tiny_target(root / "target", "llama", vocab_size=-(-tok.vocab_size // 64) * 64)
    data = root / "chats.jsonl"
    rows = [{"messages": [{"role": r, "content": c} for r, c in conv]} for conv in CONVS]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    return root, str(target), data, tok


@pytest.fixture(scope="module")
def pool(setup):
    _, target, _, _ = setup
    with PooledTargetModel.from_pretrained(target, engine="hf", replicas=1, cpus_per_replica=1) as p:
        yield p


def args_for(root, target, data, out, *extra):
    _, args = parse_args(
        ["--target", target, "--data", str(data), "--out", str(out), "--max-new-tokens", "5", "--max-length", "200"]
        + ["--block", "2", "--engine", "hf", *extra]
    )
    return args


def test_each_assistant_turn_becomes_the_targets_own_answer_and_a_rerun_resumes(setup, pool):
    root, target, data, tok = setup
    out = root / "regen.jsonl"
    result = run(args_for(root, target, data, out))  # the job's own pool, once; the reruns share `pool`
    lines = out.read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert [r["record"] for r in recs] == [0, 1, 3]  # record 2 is too long; the bad line is skipped and counted
    assert result["too_long"] == 1 and result["records_written"] == 3 and result["turns"] == 4
    assert "5 records -> 4 samples" in result["data"] and "skipped 1 (bad_json 1)" in result["data"], result["data"]
    assert all(r["source"].startswith(str(data)) for r in recs)
    # the answers are the target's greedy continuations, turn 2 after its own turn 1 (SpecForge's semantics)
    encode = get_template("auto", tokenizer=tok).bind(tok)
    engine = HFEngine(target, dtype=torch.float32)
    for rec, conv in zip(recs, [CONVS[0], CONVS[1], CONVS[3]], strict=True):
        msgs = [(m["role"], m["content"]) for m in rec["messages"]]
        assert [m for m in msgs if m[0] != "assistant"] == [m for m in conv if m[0] != "assistant"]
        for t, (role, content) in enumerate(msgs):
            if role == "assistant":
                want = target_decode(engine, [prompt_ids(encode, msgs[:t])], 5)[0]
                assert content == tok.decode(want), (rec["record"], t)
    assert msgs != CONVS[3]  # the original answers are gone
    # a crash mid-write: a torn last line. The rerun drops it, keeps what was whole, and appends the rest once
    torn = lines[0] + "\n" + lines[1][:20]
    out.write_text(torn)
    assert resume_point(out) == 1 and out.read_text() == lines[0] + "\n"
    again = regenerate_file(pool, tok, args_for(root, target, data, out))
    assert again["resumed_at"] == 1 and again["records_written"] == 2
    assert out.read_text().splitlines() == lines  # nothing rewritten, nothing twice
    # sampled answers depend on the record and turn alone (its seed): the same on a rerun
    hot = root / "hot.jsonl"
    first = regenerate_file(pool, tok, args_for(root, target, data, hot, "--temperature", "1.0", "--seed", "3"))
    text = hot.read_text()
    hot.unlink()
    regenerate_file(pool, tok, args_for(root, target, data, hot, "--temperature", "1.0", "--seed", "3", "--block", "1"))
    assert hot.read_text() == text and first["records_written"] == 3 and text != out.read_text()


def test_regenerate_bad_input_is_a_usage_error(setup, capsys):
    from eagle_ray.job.regenerate import main

    root, target, data, _ = setup
    for argv, message in [
        (["--out", "x", "--data", str(root / "missing.jsonl")], "missing.jsonl: no such file"),
        (["--out", "x", "--target", str(root)], "not an HF checkpoint directory"),
        (["--out", "x", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--out", "x", "--temperature", "-1"], "--temperature >= 0"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err, argv


def test_the_jobs_switch_regenerates_then_serves_the_new_data(setup):
    """`regenerate.enabled=true`: the job rewrites its data on its own pool first, then runs on the rewrite
    (here `offline.mode=dump`, which stops after writing the supervision: the switch, not training, is under test)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import ray

    from eagle_ray.data import make_batch_source
    from eagle_ray.offline import MissingSupervisionError, OfflineSupervision

    root, target, data, tok = setup
    cmd = [sys.executable, "jobs/dump_supervision.py", f"target.model_path={target}", "target.engine=hf"]
    cmd += ["target.replicas=1", "data.format=messages", f"data.paths=[{data}]", "data.max_length=200"]
    cmd += [
        "data.batch_tokens=256",
        "data.workers=0",
        "data.shuffle_buffer=0",
        "training.max_steps=2",
        f"checkpoint.storage_path={root}",
    ]
    cmd += ["checkpoint.name=job", "regenerate.enabled=true", "regenerate.max_new_tokens=5", "logging.plot=false"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}  # this module's cluster
    proc = subprocess.run(cmd, cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    summary = json.loads((root / "job" / "summary.json").read_text())
    regen = summary["regenerated"]
    assert regen["records_written"] == 3 and regen["out"] == str(root / "job" / "regenerated.jsonl")
    rows = [json.loads(x) for x in (root / "job" / "regenerated.jsonl").read_text().splitlines()]
    assert [r["record"] for r in rows] == [0, 1, 3]
    # the dumped batches are the regenerated conversations' batches, not the original data's
    off = OfflineSupervision(root / "job" / "supervision")
    settings = dict(template="auto", max_length=200, batch_tokens=256, workers=0)
    regenerated, _ = make_batch_source("messages", [str(root / "job" / "regenerated.jsonl")], tok, **settings)
    original, _ = make_batch_source("messages", [str(data)], tok, **settings)
    assert len(off) == 2 and off.load(next(iter(regenerated(0)))).num_tokens > 0
    with pytest.raises(MissingSupervisionError):
        off.load(next(iter(original(0))))
