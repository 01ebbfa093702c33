"""The training job, end to end: Ray, target, data, pool, Ray Train, export, evaluation, summary.

`jobs/train_eagle3.py` is the `ray job submit` entrypoint; it calls `main`. With no arguments it
runs the tiny default on a local Ray (see `config.py` for every option).

Stopping: Ctrl-C (SIGINT) or `ray job stop` (SIGTERM, then SIGKILL after the cluster's grace period) unwinds
the job through its `finally` blocks: the pool shuts down (engines closed, replica
actors killed, placement groups released) and Ray is shut down; the job prints one line saying so and exits
with 128 + the signal number. See `StopSignals`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eagle_ray.job.config import ConfigError, JobConfig, describe, load_job_config
from eagle_ray.job.inputs import end_tokens, held_out_prompts, job_batch_source, resolve_engine, tokenizer_spec
from eagle_ray.job.signals import StopSignals

if TYPE_CHECKING:
    import torch

log = logging.getLogger("eagle_ray.job")


def parse_args(argv: list[str] | None) -> tuple[JobConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        description="Train an EAGLE-3 draft on Ray: a pool of target replicas feeds Ray Train draft workers.",
        epilog="options (section.key=value overrides; defaults are the tiny laptop run):\n" + "\n".join(describe()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config (sections as below)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    try:
        return load_job_config(args.config, args.overrides), args
    except (ConfigError, OSError) as e:
        parser.error(str(e))


def _init_ray(c: JobConfig) -> None:
    from eagle_ray.data.source import DEFAULT_WORKERS
    from eagle_ray.ray_init import init_ray

    # logical CPUs enough for every replica and worker: on a laptop they share the cores
    need = c.target.replicas * (c.target.cpus_per_replica or c.target.tp_size)
    need += c.training.num_workers * c.training.cpus_per_worker + 1
    need += DEFAULT_WORKERS if c.data.workers is None else c.data.workers  # data tasks, one CPU each
    init_ray(
        c.ray.address, num_cpus=c.ray.num_cpus or max(os.cpu_count() or 1, int(need + 0.999)), num_gpus=c.ray.num_gpus
    )


def run(c: JobConfig, stop: StopSignals | None = None) -> dict[str, Any]:
    """The job; `stop`: the signal handlers `main` installed, re-installed after whoever replaces them."""
    import ray
    import torch

    from eagle_ray.data import load_tokenizer
    from eagle_ray.job.plot import plot_history
    from eagle_ray.offline import OfflineSupervision, dump_supervision
    from eagle_ray.tiny import default_target
    from eagle_ray.train import train_draft
    from eagle_ray.train.progress import target_rate

    t0 = time.monotonic()
    run_dir = c.run_dir()
    dump_dir = Path(c.offline.dir).expanduser() if c.offline.dir else run_dir / "supervision"
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(tokenizer_spec(c.target.model_path, c.data.tokenizer))
    model_path = c.target.model_path or default_target(tokenizer)

    def make_source(fmt: str, paths: list[str], index: str = "data_index.jsonl") -> Any:
        # restarts seek to a batch without re-tokenising
        return job_batch_source(c.data, tokenizer, fmt, paths, index_path=run_dir / index)

    # regenerating: the data is the target's answers, written once the pool is up
    source = None if c.regenerate.enabled else make_source(c.data.format, c.data.paths)
    _init_ray(c)  # before the data is read: Ray tasks prepare it (the counting pass below included)
    if stop is not None:
        stop.install()  # ray.init replaced our SIGTERM handler
    tr = c.training
    max_steps = tr.max_steps
    if tr.epochs is not None and source is not None:
        n = source.batches_per_epoch()
        max_steps = max(1, int(tr.epochs * n) // tr.num_workers)
        log.info("%d batches per epoch: %s epochs = %d steps", n, tr.epochs, max_steps)
    engine = resolve_engine(c.target.engine)
    dtype = getattr(torch, c.target.dtype) if c.target.dtype else None
    live = c.offline.mode != "from_dump"
    if live:
        log.info(
            "target %s on %s: %d replica(s) of TP %d starting; then %d Ray Train draft worker(s)",
            model_path,
            engine,
            c.target.replicas,
            c.target.tp_size,
            tr.num_workers,
        )
    pool = _serve_pool(c, model_path, engine, dtype) if live else None
    target = pool if live else OfflineSupervision(dump_dir)
    summary: dict[str, Any] = {"target": model_path, "engine": engine if live else "offline", "run_dir": str(run_dir)}
    try:
        if c.regenerate.enabled:  # train on the target's own answers: the data becomes their messages JSONL
            summary["regenerated"] = _regenerate(c, pool, tokenizer, run_dir)
            source = make_source("messages", [summary["regenerated"]["out"]], "data_index_regenerated.jsonl")
            if tr.epochs is not None:
                max_steps = max(1, int(tr.epochs * source.batches_per_epoch()) // tr.num_workers)
        if c.offline.mode == "dump":
            # one writer per training worker: each a client of the pool, writing its share of the batches
            manifest = dump_supervision(pool, source, dump_dir, max_steps * tr.num_workers, writers=tr.num_workers)
            summary.update(dump=str(dump_dir), batches=len(manifest.get("batches", [])))
            return summary
        gpus = tr.gpus_per_worker
        if tr.use_gpu and gpus is None:
            gpus = 1 - c.placement.gpu_fraction if c.placement.mode == "colocated" else 1.0
        resources = {"CPU": tr.cpus_per_worker, **({"GPU": gpus} if tr.use_gpu else {})}
        result = train_draft(
            target,
            source,
            c.train_config(max_steps),
            storage_path=Path(c.checkpoint.storage_path).expanduser(),
            name=c.checkpoint.name,
            num_workers=tr.num_workers,
            use_gpu=tr.use_gpu,
            resources_per_worker=resources,
            backend=tr.backend,
            draft_vocab_size=c.draft.vocab_size,
            special_token_ids=[i for i in end_tokens(tokenizer) if i < target.info.vocab_size],
            vocab_batches=c.draft.vocab_batches,
            queue_depth=tr.queue_depth,
            max_failures=tr.max_failures,
            resume_from=c.checkpoint.resume_from,
            export_dir=c.export.dir,
            export_dtype=getattr(torch, c.export.dtype) if c.export.dtype else None,
            progress=c.logging.progress,
            trackers=c.logging.trackers,
            tracker_config=c.to_dict(),
            cache=c.cache if live else None,
            # the end-of-run evaluation decodes on the target: keep one replica for it
            release_after_cache=(1 if c.eval.enabled else 0) if c.target.release_after_cache else None,
            sweep=c.sweep,
        )
        if stop is not None:
            stop.install()  # Ray Train's fit() replaced our SIGINT handler, and leaves its own installed
        last = result.history[-10:]
        summary.update(
            steps=result.steps,
            skipped_batches=result.skipped_batches,  # poison batches the pool gave up on (samples_rank*.jsonl: why)
            samples=result.history[-1]["samples"] if result.history else 0,
            tokens=result.history[-1]["tokens"] if result.history else 0,
            trainer_tokens_per_s=_rate(result.history),
            wait_fraction=sum(r["wait_s"] for r in last) / max(sum(r["step_s"] for r in last), 1e-9),
            loss=_mean(last, "loss"),  # the 0.8^k-weighted mean over TTT steps, nats (NeMo AutoModel's units)
            acc=[sum(col) / len(col) for col in zip(*(r["acc"] for r in last), strict=True)],  # per TTT step
            acceptance_chain=_mean(last, "acceptance_chain"),
            acceptance_product=_mean(last, "acceptance_product"),
            export=str(result.export_dir) if result.export_dir else None,
            # a sweep's arms, one export each (`export` and the evaluation below: arm 0's)
            **({"arms": _arms(result)} if len(result.arms) > 1 else {}),
            data=source.stats.summary(),  # what was read, skipped (by reason) and repaired so far
            data_counts=source.stats.to_dict(),
            data_task_processes=len(source.task_pids),  # 0: the data was prepared in the driver
        )
        summary["target_tokens_per_s"] = target_rate(result.history) if live else None
        summary["target_tokens"] = sum(r.get("target_tokens", 0) for r in result.history)  # computed by the target
        if result.cache is not None:
            summary["cache"] = {**result.cache, "cached_tokens": sum(r.get("cached_tokens", 0) for r in result.history)}
        if c.eval.enabled and result.export_dir is not None and live:  # a dump holds no target to verify with
            prompts = held_out_prompts(source, result.steps * tr.num_workers, c.eval.prompts)
            # off the driver: a task that is a client of the pool reads the export (on the run's shared storage)
            measure = ray.remote(num_cpus=1)(_measure).remote(
                pool.name, str(result.export_dir), prompts, c.eval.max_new_tokens, c.eval.num_draft_tokens
            )
            summary["measured"] = {**ray.get(measure), "step": result.steps}
        if c.logging.plot and result.history:
            plot = plot_history(result.history, run_dir / "training.png", summary.get("measured"))
            summary["plot"] = str(plot) if plot else None
        summary["wall_s"] = time.monotonic() - t0
        return summary
    finally:
        if stop is not None:
            stop.install()  # on the way out of fit() by an exception, Ray Train's SIGINT handler is still there
        if pool is not None:
            t_stop = time.monotonic()
            pool.shutdown()  # engines closed, replica actors killed, placement groups released
            log.info("target pool shut down in %.1f s", time.monotonic() - t_stop)


def _arms(result: Any) -> list[dict[str, Any]]:
    """A sweep's arms in the summary: each one's config overrides, last-10-step means, restarts and export."""
    out = []
    for k, cfg in enumerate(result.arms):
        rows = [r["arms"][k] for r in result.history[-10:] if "arms" in r]
        done = [r for r in rows if not r["failed"]]  # a failed step has no loss (NaN)
        out.append(
            {
                "lr": cfg.lr,
                "ttt_steps": cfg.ttt_steps,
                "seed": cfg.seed,
                "loss": _mean(done, "loss") if done else None,
                "acceptance_chain": _mean(done, "acceptance_chain") if done else None,
                "restarts": rows[-1]["restarts"] if rows else 0,
                "export": str(result.exports[k]) if k < len(result.exports) else None,
            }
        )
    return out


def _measure(pool_name: str, export_dir: str, prompts: list, max_new_tokens: int, draft_tokens: int) -> dict:
    """Speculative greedy decoding of `prompts` with the export against the pool's target: its summary."""
    import torch

    from eagle_ray.draft import load_draft, speculative_greedy
    from eagle_ray.pool import connect_pool

    target = connect_pool(pool_name)
    try:
        draft = load_draft(export_dir, dtype=torch.float32)
        return speculative_greedy(target, draft, prompts, max_new_tokens, draft_tokens).summary()
    finally:
        target.close()


def _regenerate(c: JobConfig, pool: Any, tokenizer: Any, run_dir: Path) -> dict[str, Any]:
    from types import SimpleNamespace

    from eagle_ray.job.regenerate import regenerate_file

    r = c.regenerate
    out = Path(r.out).expanduser() if r.out else run_dir / "regenerated.jsonl"
    log.info("regenerating the data's assistant turns with the target's own answers into %s", out)
    args = SimpleNamespace(
        **{k: getattr(r, k) for k in ("max_new_tokens", "temperature", "top_p", "seed", "block")},
        out=str(out),
        data=c.data.paths or None,
        format="auto" if c.data.format == "sharegpt" else c.data.format,
        max_records=c.data.max_records,
        max_length=c.data.max_length,
        chat_template=c.data.chat_template,
    )
    result = regenerate_file(pool, tokenizer, args)
    log.info(
        "regenerated %d records (%d turns) in %.0f s",
        result["records_written"],
        result.get("turns", 0),
        result["wall_s"],
    )
    return result


def _rate(rows: list[dict[str, Any]]) -> float:
    """Trainer tokens/s: tokens consumed over the time steps took (waiting included)."""
    if not rows:
        return 0.0
    return rows[-1]["tokens"] / max(sum(r.get("step_s", 0.0) for r in rows), 1e-9)


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    vals = [r[key] for r in rows if key in r]
    return sum(vals) / len(vals) if vals else 0.0


def _serve_pool(c: JobConfig, model_path: str, engine: str, dtype: torch.dtype | None) -> Any:
    """The target pool, served under a name: the draft workers connect to it and stream their own batches."""
    from eagle_ray.pool import serve_pool

    return serve_pool(
        f"eagle-ray-{c.checkpoint.name}-{os.getpid()}",
        model_path,
        engine=engine,
        replicas=c.target.replicas,
        min_replicas=c.target.min_replicas,
        tp_size=c.target.tp_size,
        aux_layer_ids=c.target.aux_layer_ids,
        dtype=dtype,
        placement=c.placement.mode,
        engine_kwargs=c.target.engine_kwargs,
        use_gpu=c.placement.use_gpu,
        cpus_per_replica=c.target.cpus_per_replica,
        gpu_fraction=c.placement.gpu_fraction,
        max_inflight_bytes=c.target.max_inflight_bytes,
    )


def print_summary(s: dict[str, Any]) -> None:
    """What a person reads at the end: one labelled line per fact (`summary.json` has them all, by key)."""
    rows = [("target", f"{s.get('target')} ({s.get('engine')} engine)")]
    if s.get("dump"):
        rows.append(("dump", s["dump"]))
    if "steps" in s:
        skipped = s.get("skipped_batches") or 0
        rows.append(("trained", f"{s['steps']} steps, {s['samples']} samples, {s['tokens']} tokens"))
        if skipped:
            rows.append(("skipped", f"{skipped} poison batches (samples_rank*.jsonl says which and why)"))
        rate = f"trainer {s['trainer_tokens_per_s']:.0f} tok/s"
        if s.get("target_tokens_per_s") is not None:
            rate = f"target {s['target_tokens_per_s']:.0f} tok/s, " + rate
        rows.append(("throughput", f"{rate}; trainers waited {100 * s['wait_fraction']:.1f}% of each step"))
        acc = " ".join(f"{x:.2f}" for x in s["acc"])
        rows.append(("loss", f"{s['loss']:.3f} (last steps' mean); top-1 accuracy per TTT step {acc}"))
        m = s.get("measured")
        if m:
            rows.append(
                (
                    "acceptance",
                    f"{m['acceptance_length']:.2f} tokens per target forward, measured: greedy speculative "
                    f"decoding of held-out prompts ({m['verify_forwards']} verify forwards)",
                )
            )
        rows.append(
            (
                "simulated",
                f"{s['acceptance_chain']:.2f} (chain) / {s['acceptance_product']:.2f} (product): the draft's "
                "predictions scored on training text, not decoded",
            )
        )
    cache = s.get("cache")
    if cache:
        rows.append(
            (
                "epoch cache",
                f"{cache['batches']}/{cache['epoch_batches']} first-epoch batches, {cache['bytes'] / 2**20:,.1f} MiB, "
                f"{cache['bytes_per_token']:,.0f} bytes/token; served {cache['cached_tokens']} tokens, the target "
                f"computed {s.get('target_tokens', 0)}"
                + (f"; full from batch {cache['full_from_batch']}" if cache.get("full_from_batch") is not None else ""),
            )
        )
    for key in ("data", "export", "plot"):
        if s.get(key):
            rows.append((key, s[key]))
    if "wall_s" in s:
        rows.append(("wall time", f"{s['wall_s']:.0f} s"))
    rows.append(("summary", str(Path(s["run_dir"]) / "summary.json")))
    print("\n=== eagle_ray: draft training done ===")
    for label, value in rows:
        print(f"{label:>12}  {value}")
    sys.stdout.flush()


def configure_logging() -> None:
    """The job's own INFO lines; every other library (matplotlib, transformers, Ray) only when something is wrong."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("eagle_ray").setLevel(logging.INFO)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # "Writing model shards" for a 10 MB tiny target


def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv)  # before Ray, torch and transformers load: --help and a bad key answer at once
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    configure_logging()
    import ray  # loaded here, before the signal handlers below, as the module's imports were
    import torch  # noqa: F401

    with StopSignals() as stop:
        try:
            summary = run(config, stop)
        except BaseException as e:
            # KeyboardInterrupt: ours or Python's; SystemExit: Ray Train's SIGINT handler or Ray's SIGTERM one
            if not stop.signals() and not isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise  # a failure, not an interruption (Ray is shut down at exit, as always)
            return _interrupted(stop, e)
    (config.run_dir() / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if ray.is_initialized():
        ray.shutdown()  # first: Ray forwards its workers' output (SGLang's lines) late, and none may follow the summary
    print_summary(summary)
    return 0


def _interrupted(stop: StopSignals, err: BaseException) -> int:
    """After an interruption has unwound `run` (pool shut down): check, shut Ray down, say so.

    Returns the exit code, 128 + the first signal's number (130 for Ctrl-C, 143 for SIGTERM).
    """
    import ray

    from eagle_ray.pool.placement import live_groups

    received = stop.signals() or [signal.SIGINT]  # an interruption with no signal seen: Ctrl-C's
    name = signal.Signals(received[0]).name
    problems = []
    if ray.is_initialized():
        try:
            left = live_groups()
            if left:
                problems.append(f"placement groups still reserved: {left}")
        except Exception as e:  # the cluster is going away too: Ray removes the job's groups when it ends
            log.warning("could not list placement groups: %s", e)
        try:
            ray.shutdown()
        except Exception as e:
            problems.append(f"ray.shutdown: {type(e).__name__}: {e}")
    line = f"interrupted: {name}; " + (
        "shutdown incomplete: " + "; ".join(problems) if problems else "shut down cleanly (target pool and Ray stopped)"
    )
    if not isinstance(err, (KeyboardInterrupt, SystemExit)):  # something failed while unwinding: say what
        line += f"; on the way out: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
    print(line, file=sys.stderr, flush=True)
    return 128 + received[0]


if __name__ == "__main__":
    sys.exit(main())
