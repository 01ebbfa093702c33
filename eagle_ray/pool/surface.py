"""`Pool`: what callers use, the same for a pool that owns its replicas (`PooledTargetModel`, `pooled.py`) and
for a shared pool's client (`PoolClient`, `shared.py`): stream, submit, generate, the NeMo surface, stats.

A pool is a dispatcher (`Dispatch`: shards, ledger, budget, each stream's owner side) over a replica set, and the
two differ only in the replica set: a `PooledTargetModel` starts, watches, replaces and scales its own
(`Lifecycle`); a client hears its host's through the relay and reports the deaths it finds. Each provides the
same few hooks: `_lost(r, err)` (a replica died), `_reconcile()`, `_none_left()`, and the public `weights_ref`,
`scale`, `pool_stats`, `shutdown`.

One thread owns the state (`owner.py`): it hears of each result, start-up and death as its ref resolves,
dispatches, and settles. A stream's caller pulls and validates its batches in its own thread, hands them over
when the owner asks for more, and yields what the owner sends back; `stats()` is the owner's snapshot.
"""

from __future__ import annotations

import queue
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import ray
import torch
from ray.exceptions import ObjectLostError

from eagle_ray.contract import InvalidBatchError, ModelInfo, PackedBatch, Supervision, validate_packed
from eagle_ray.generation import GenerationParams
from eagle_ray.pool.dispatch import _MORE, Dispatch, ShardResult, _Stream
from eagle_ray.target import NeMoSurface


class Pool(Dispatch, NeMoSurface):
    """The caller's surface of a pool or a pool's client (see the module's docstring)."""

    _async_workers = 16  # generate_batch_async: requests in flight at once, each a submit of its own

    @property
    def info(self) -> ModelInfo:
        if self._info is None:
            raise RuntimeError("no replica has started yet")
        return self._info

    def _weights_once(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._weights is None:
            try:
                self._weights = ray.get(self.weights_ref())
            except ObjectLostError:  # lost with its node (or its replica died before storing it): once more
                self._weights = ray.get(self.weights_ref(fresh=True))
        return self._weights

    def replica_actor(self, replica_id: int) -> Any:
        """The actor handle of a replica this pool knows (None if it knows none by that id): for fault tools."""
        return self._read(lambda: getattr(self._replicas.get(replica_id), "actor", None))

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return torch.nn.Embedding.from_pretrained(self._weights_once()[0].clone(), freeze=True)

    def get_lm_head_weight(self) -> torch.Tensor:
        return self._weights_once()[1]

    def replicas(self) -> list[dict[str, Any]]:
        """What each ready replica reported when it started (node, GPU ids, TP rank pids...)."""
        return self._read(lambda: [dict(r.desc) for r in self._ready() if r.desc])

    def stats(self) -> dict[str, Any]:
        """Per replica: state, node, tokens and shards done, in flight, failures; pool totals. A snapshot, taken
        by the owner thread between two of its steps."""
        return self._read(self._snapshot)

    def _read(self, fn: Any) -> Any:
        """`fn()` on the owner thread; once that has ended (shut down), here: nothing changes the state then."""
        return fn() if self._owner.stopped else self._owner.call(fn)

    def _snapshot(self) -> dict[str, Any]:
        return {
            "replicas": [
                {
                    "replica_id": r.replica_id,
                    "state": r.state,
                    "node_id": (r.desc or {}).get("node_id"),
                    "tokens_done": r.tokens_done,
                    "shards_done": r.shards_done,
                    "inflight_shards": len(r.inflight),
                    "inflight_tokens": r.inflight_tokens,
                    "others_inflight_tokens": r.others_tokens,
                    "failures": r.failures,
                }
                for r in self._replicas.values()
            ],
            "replicas_replaced": self._replaced,
            "inflight_bytes": self._inflight_bytes,
            "held_bytes": self._held_bytes,
            "bytes_delivered": self._bytes_delivered,
            "max_inflight_bytes": self._max_inflight_bytes,
            "shards_delivered": self._ledger.count("delivered"),
            "shards_quarantined": self._ledger.count("quarantined"),
        }

    def stream(
        self,
        batches: Iterable[PackedBatch],
        *,
        ordered: bool = True,
        return_logits: bool = False,
        node_id: str | None = None,
        stall_timeout_s: float = 600.0,
        count_held: bool = True,
        generate: GenerationParams | None = None,
        ahead: int | None = None,
    ) -> Iterator[ShardResult]:
        """Supervision for many batches, as `ShardResult`s holding object refs.

        Yields in submission order (`ordered=True`) or as shards complete. Dispatch waits
        while `max_inflight_bytes` are in flight or held by un-released results. Bad input
        raises `InvalidBatchError` when its batch is reached, before it is dispatched.
        `node_id`: serve from replicas on the consumer's node while it has any (others only when
        it has none). `generate`: each batch holds prompts, and each result's ref holds their answers
        (token id lists, see `eagle_ray.generation`) instead of supervision. Several streams and submits may
        run at once, from different threads: each gets its own shards, in its own order, and all share the
        replicas and the byte budget. `ahead`: at most this many of the stream's shards dispatched and not yet
        yielded (a consumer that reads in order gains nothing from more, and holds up the replicas' queues).
        """
        st = _Stream(return_logits, node_id, count_held, generate, ahead, stall_timeout_s)
        self._owner.call(self._open, st)
        try:
            yield from self._consume(st, iter(batches), ordered)
        finally:
            self._owner.post(self._close_stream, st)

    def _consume(self, st: _Stream, it: Iterator[PackedBatch], ordered: bool) -> Iterator[ShardResult]:
        """The caller's side of a stream: when the owner asks, pull a batch (the caller's data loader runs in the
        caller's thread), validate it and hand it over; yield what comes back, in order if asked."""
        order: deque[int] = deque()  # its shard ids in submission order, not yet yielded
        ready: dict[int, ShardResult] = {}
        unyielded: dict[int, int] = {}  # batch index -> its shards not yet yielded
        partial: set[int] = set()  # batches the consumer has some, not all, shards of
        exhausted, batch_index, bad_input = False, 0, None
        while not exhausted or order:
            msg = self._next_message(st)
            if msg is _MORE:
                try:
                    batch = validate_packed(next(it), self.info.vocab_size, self.info.max_context)
                    if st.gen is not None:
                        st.gen.check_fits(batch, self.info)
                except StopIteration:
                    exhausted = True
                    continue
                except InvalidBatchError as e:
                    bad_input, exhausted = e, True  # serve everything before it, then raise at its place
                    continue
                ids = self._owner.call(self._add_batch, st, batch, batch_index)
                unyielded[batch_index] = len(ids)
                batch_index += 1
                order.extend(ids)
                continue
            if isinstance(msg, BaseException):
                raise msg
            ready[msg.shard_id] = msg
            if not ordered:  # as it completes: it goes first
                order.remove(msg.shard_id)
                order.appendleft(msg.shard_id)
            msg = None
            while order and order[0] in ready:
                res = ready.pop(order.popleft())
                _yielded(res.batch_index, unyielded, partial)
                self._owner.post(self._took, st, bool(partial))
                yield res
            # what was yielded is the consumer's to hold or drop: this frame must not keep it alive while it
            # waits for the budget (a consumer that dropped it would wait on the stream, the stream on it)
            msg = res = None
        if bad_input is not None:
            raise bad_input

    def _next_message(self, st: _Stream) -> Any:
        while True:
            try:
                return st.inbox.get(timeout=1.0)
            except queue.Empty:
                if self._owner.stopped:
                    raise RuntimeError("the pool is shut down") from None

    def submit(self, batch: PackedBatch, return_logits: bool = False) -> list[ShardResult]:
        """Shard one batch across replicas; return its shards' results (refs) once all are stored.

        Validates first (`InvalidBatchError`, nothing dispatched). Failed replicas are replaced and
        their shards re-run. Quarantined shards come back with `error` set and `ref=None`.
        """
        # the whole batch is gathered by design: only what is in flight counts against the budget
        return list(self.stream([batch], return_logits=return_logits, count_held=False))

    def generate(self, prompts: list[list[int]], params: GenerationParams | None = None) -> list[list[int]]:
        """Each prompt's continuation (new token ids), served exactly once across the replicas.

        Bad prompts (`InvalidBatchError`) and bad params (`ValueError`) are refused before dispatch.
        """
        p = params or GenerationParams()
        batch = PackedBatch.from_sequences([torch.as_tensor(q, dtype=torch.long) for q in prompts])
        results = list(self.stream([batch], count_held=False, generate=p))
        bad = [r.error for r in results if r.error]
        if bad:
            raise RuntimeError("\n".join(bad))
        return [answer for part in ray.get([r.ref for r in results]) for answer in part]

    def forward_packed(self, batch: PackedBatch, return_logits: bool = False) -> Supervision:
        """Single-target compatibility: pulls the supervision to the caller."""
        results = self.submit(batch, return_logits)
        bad = [r.error for r in results if r.error]
        if bad:
            raise RuntimeError("\n".join(bad))
        return Supervision.concat(ray.get([r.ref for r in results]))

    @staticmethod
    def connect(name: str, **overrides: Any) -> Any:
        """A client (`PoolClient`) of the pool another process started with `serve_pool(name, ...)`: it dispatches
        to the replicas itself. `overrides`: its own dispatch settings (`max_inflight_bytes`, ...)."""
        from eagle_ray.pool.shared import connect_pool

        return connect_pool(name, **overrides)

    def close(self) -> None:
        """NeMo's name for `shutdown`."""
        self.shutdown()


def _yielded(batch_index: int, unyielded: dict[int, int], partial: set[int]) -> None:
    unyielded[batch_index] -= 1
    if unyielded[batch_index]:
        partial.add(batch_index)
    else:
        del unyielded[batch_index]
        partial.discard(batch_index)
