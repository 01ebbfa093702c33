"""`eagle-ray`, the installed script: each command is its job's own parser and main; `evaluate` on a real export.

The script is the one `pip install -e .` put beside this interpreter (`[project.scripts]`), run in a fresh process
as a user runs it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from subprocess import PIPE

import pytest
import torch

from eagle_ray import Eagle3Draft, Eagle3DraftConfig, HFEagle3TargetModel, build_tiny_target, save_draft
from eagle_ray.cli import COMMANDS
from eagle_ray.cli import main as cli_main
from eagle_ray.hf_checkpoint import load_config
from eagle_ray.job import evaluate

SCRIPT = Path(sys.executable).with_name("eagle-ray")
# what each command's help must name: its usage line under the CLI's name, and options only that job has
HELP = {
    "train": ["usage: eagle-ray train", "--print-config", "training.max_steps", "eval.num_draft_tokens"],
    "dump": ["usage: eagle-ray dump", "--print-config", "offline.mode"],
    "evaluate": ["usage: eagle-ray evaluate", "--draft DIR", "--num-draft-tokens", "--topk TOPK", "--matrix"],
    "chaos": ["usage: eagle-ray chaos", "--kill-worker-at", "--tp-size"],
    "bench": ["usage: eagle-ray bench", "--quick", "--parts"],
    "regenerate": ["usage: eagle-ray regenerate", "--out FILE", "--max-new-tokens", "--replicas"],
}


def eagle_ray(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    assert SCRIPT.is_file(), f"{SCRIPT} missing: pip install -e . (it installs [project.scripts])"
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def test_every_command_has_its_help_case():
    assert sorted(HELP) == sorted(COMMANDS)


@pytest.fixture(scope="module")
def helps() -> dict[str, tuple[int, str, str]]:
    """`eagle-ray COMMAND --help` for every command, run side by side (each imports torch, most Ray)."""
    assert SCRIPT.is_file(), f"{SCRIPT} missing: pip install -e . (it installs [project.scripts])"
    procs = {c: subprocess.Popen([str(SCRIPT), c, "--help"], stdout=PIPE, stderr=PIPE, text=True) for c in HELP}
    outs = {c: p.communicate(timeout=600) for c, p in procs.items()}  # all started before any is read
    return {c: (procs[c].returncode, *outs[c]) for c in procs}


@pytest.mark.parametrize("command", list(HELP))
def test_command_help_is_the_jobs_own(helps, command):
    code, out, err = helps[command]
    assert code == 0, err[-3000:]
    for text in HELP[command]:
        assert text in out, (text, out[:2000])


def test_top_level_help_lists_each_command_on_a_line():
    proc = eagle_ray("--help")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for name, (_, summary) in COMMANDS.items():
        assert any(line.split() == [name, *summary.split()] for line in lines), (name, proc.stdout)


def test_unknown_command_exits_2_listing_the_valid_ones():
    proc = eagle_ray("trian", "training.max_steps=1")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "invalid choice: 'trian'" in proc.stderr
    assert all(f"'{name}'" in proc.stderr for name in COMMANDS), proc.stderr


def test_dump_is_train_with_offline_mode_dump_last_under_its_own_name(monkeypatch):
    import eagle_ray.job.run as run

    seen = []
    monkeypatch.setattr(run, "main", lambda argv: seen.append((sys.argv[0], argv)) or 0)
    argv0 = sys.argv[0]
    assert cli_main(["dump", "offline.mode=live", "training.max_steps=3"]) == 0
    assert seen == [("eagle-ray dump", ["offline.mode=live", "training.max_steps=3", "offline.mode=dump"])]
    assert sys.argv[0] == argv0  # restored


def test_bench_without_a_checkout_says_where_it_looked(monkeypatch, tmp_path, capsys):
    from eagle_ray.job import bench

    monkeypatch.setattr(bench, "SUITE", tmp_path / "benchmarks" / "suite.py")
    assert bench.main(["--quick"]) == 2
    assert str(tmp_path / "benchmarks" / "suite.py") in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- evaluate


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny Llama with Qwen's vocabulary (the tokenizer a target without its own gets) and a draft of it, exported."""
    from eagle_ray.data import load_tokenizer

    root = tmp_path_factory.mktemp("cli")
    vocab = -(-load_tokenizer("qwen").vocab_size // 64) * 64
    target_path = build_tiny_target(root / "target", "llama", vocab_size=vocab)
    with HFEagle3TargetModel.from_pretrained(str(target_path)) as target:
        info = target.info
        config = Eagle3DraftConfig.from_target(load_config(target_path), 4096, list(info.aux_layer_ids))
        emb, head = target.get_input_embeddings().weight, target.get_lm_head_weight()
        draft = Eagle3Draft.from_target(config, emb, head, torch.arange(4096), seed=0)
    return save_draft(draft, root / "draft"), target_path


def test_evaluate_measures_each_prompt_set_in_each_mode(export, tmp_path):
    draft, target = export
    data = tmp_path / "held_out.jsonl"
    convs = [("Name three primary colours.", "Red, yellow and blue."), ("What is 2 + 2?", "It is 4.")]
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in convs]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval.json"
    args = ["--draft", str(draft), "--target", str(target), "--data", str(data), "--json", str(out), "--matrix"]
    proc = eagle_ray("evaluate", *args, "--prompts", "3", "--max-new-tokens", "6", "--num-steps", "2", "--topk", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert list(r["modes"]) == ["chain greedy", "chain T=1", "tree k2 greedy", "tree k2 T=1"]
    assert r["modes"]["tree k2 T=1"] == {
        "topk": 2,
        "num_steps": 2,
        "num_draft_tokens": 3,
        "temperature": 1.0,
        "top_p": 1.0,
    }
    sets = r["sets"]
    assert (sets["sharegpt"]["prompts"], sets["humaneval"]["prompts"]) == (2, 3)  # the file's two conversations, once
    for name, row in sets.items():
        assert 1 <= row["simulated"]["acceptance_rounds"] <= row["simulated"]["acceptance_chain"] <= 3, name
        assert 1 <= row["simulated_on_target_text"]["acceptance_rounds"] <= 3, name
        for mode in r["modes"]:
            assert row[mode]["acceptance_length"] >= 1 and row[mode]["verify_forwards"] >= row["prompts"], (name, mode)
        # greedy speculative output equals target-only greedy, token for token; sampled output is not compared
        assert row["chain greedy"]["matches_target_greedy"] is True and row["tree k2 greedy"]["matches_target_greedy"]
        assert "matches_target_greedy" not in row["chain T=1"]
        line = f"{name:<10} {'chain greedy':<16} {row['chain greedy']['acceptance_length']:>10.3f}"
        assert line in proc.stdout, proc.stdout


def test_evaluate_bad_input_exits_2_naming_the_path(export, tmp_path, capsys):
    draft, target = export
    (tmp_path / "empty").mkdir()
    cases = [
        (["--draft", str(tmp_path / "nowhere")], f"--draft {tmp_path / 'nowhere'}: no such directory"),
        (["--draft", str(tmp_path / "empty")], f"--draft {tmp_path / 'empty'}: not a draft export (no config.json"),
        (["--draft", str(target)], f"--draft {target}: not a draft export: not a one-layer LlamaForCausalLMEagle3"),
        (["--draft", str(draft), "--target", str(tmp_path)], f"--target {tmp_path}: not an HF checkpoint"),
        (["--draft", str(draft), "--target", str(target), "--data", str(tmp_path / "x.jsonl")], "x.jsonl"),
        (["--draft", str(draft), "--num-steps", "0"], "--num-steps must be >= 1"),
        (["--draft", str(draft), "--num-steps", "3", "--num-draft-tokens", "6"], "num_steps + 1 = 4 tokens"),
        (["--draft", str(draft), "--sets", "sharegpt,mmlu"], "--sets: unknown ['mmlu']"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            evaluate.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err, (argv, err)
