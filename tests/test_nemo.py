"""NeMo AutoModel 0.7.0's own trainer on eagle_ray's targets: per-step losses equal NeMo's reference.

Everything that trains is NeMo's released code (installed --no-deps into .peers/nemo by .ci/setup):
`Eagle3TrainerModule`, `LlamaEagle3DraftModel`, its token mapping and its packer. The reference
is NeMo's own `HFEagle3TargetModel` on the same tiny Llama (fp32, fixed seed). eagle_ray's HF
target, SGLang target and a 2-replica pool used from two client processes at once (two ranks)
each train the same draft for 20 steps with full logits, with the vocab mapping
(`set_vocab_mapping`: batches carry NeMo's precomputed encoding) and with packed rows, every
batch prefetched through `generate_batch_async` as NeMo's recipe does.
"""

from __future__ import annotations

import sys
from collections import deque
from pathlib import Path

import pytest
import ray
import torch
from ray import cloudpickle

from eagle_ray.pool.shared import serve_pool
from eagle_ray.tiny import markov_sequences

NEMO = Path(__file__).resolve().parents[1] / ".peers" / "nemo"  # nemo-automodel==0.7.0, by .ci/setup
STEPS, TTT, LR, B, T = 20, 3, 1e-3, 2, 48
DRAFT_VOCAB = 256
VARIANTS = ("logits", "mapping", "packed")
TOL = 1e-5

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the client actors run this module's code


def _nemo():
    if str(NEMO) not in sys.path:
        sys.path.insert(0, str(NEMO))
    import nemo_automodel.components.datasets.llm.eagle3 as data
    import nemo_automodel.components.speculative.eagle.core as core
    import nemo_automodel.components.speculative.eagle.draft_llama as draft
    import nemo_automodel.components.speculative.eagle.target as target

    return data, core, draft, target


def make_batches(variant: str) -> list[dict[str, torch.Tensor]]:
    """Right-padded rows (an 8-token prompt outside the loss), or NeMo-packed rows of two documents."""
    data = _nemo()[0]
    if variant == "packed":
        seqs = markov_sequences(STEPS * B * 2, (16, 23), seed=11)
        docs = [{"input_ids": s.tolist(), "loss_mask": [0] * 3 + [1] * (len(s) - 3)} for s in seqs]
        rows = data.build_packed_eagle3_dataset(docs, packed_sequence_size=T, pad_token_id=0)
        return [data._pack_collate(rows[i : i + B]) for i in range(0, len(rows) - B + 1, B)][:STEPS]
    out = []
    for i, s in enumerate(markov_sequences(STEPS * B, (T - 12, T), seed=12)):
        if i % B == 0:
            out.append({k: torch.zeros(B, T, dtype=torch.long) for k in ("input_ids", "attention_mask", "loss_mask")})
        row, n = out[-1], len(s)
        row["input_ids"][i % B, :n], row["attention_mask"][i % B, :n] = s, 1
        row["loss_mask"][i % B, 8:n] = 1
    return out


def token_mapping(batches, vocab_size: int, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    size = DRAFT_VOCAB if variant == "mapping" else None  # None: the whole vocabulary
    return _nemo()[0].build_eagle3_token_mapping(batches, target_vocab_size=vocab_size, draft_vocab_size=size)


def train(backend, config, batches, ids, mask, prefetch: int = 2) -> list[float]:
    """NeMo's draft + trainer for len(batches) steps on `backend`, as NeMo's recipe drives it."""
    _, core, draft_mod, _ = _nemo()
    torch.manual_seed(0)
    d = config.to_dict()
    d.update(draft_vocab_size=int(ids.numel()), target_hidden_size=config.hidden_size, tie_word_embeddings=False)
    d.update(architectures=["LlamaEagle3DraftModel"], attn_implementation="eager")
    d.update(fc_norm=False, norm_output=False, parallel_drafting=False)
    draft = draft_mod.LlamaEagle3DraftModel(type(config).from_dict(d)).to(torch.float32)
    draft.copy_embeddings_from_target(backend.get_input_embeddings())
    draft.set_vocab_mapping(ids)
    draft.freeze_embeddings()
    trainer = core.Eagle3TrainerModule(draft, selected_token_ids=ids, selected_token_mask=mask, ttt_steps=TTT)
    opt = torch.optim.AdamW([p for p in trainer.parameters() if p.requires_grad], lr=LR, betas=(0.9, 0.95))
    keys = ("input_ids", "attention_mask", "loss_mask", "position_ids", "seq_lens", "doc_remaining")
    if prefetch:  # the recipe's _prefetched_batches: keep `prefetch` requests in flight
        queue: deque = deque()
        it = iter(batches)

        def fill():
            for b in it:
                queue.append(backend.generate_batch_async(**{k: b[k] for k in keys if k in b}))
                if len(queue) >= prefetch:
                    return

        fill()
        source = []
        while queue:
            source.append(queue.popleft().result())
            fill()
    else:
        source = [backend.generate_batch(**{k: b[k] for k in keys if k in b}) for b in batches]
    losses = []
    for tb in source:
        metrics = trainer(**tb.to_trainer_inputs())
        metrics.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainer.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(metrics.loss))
    return losses


def run_variant(backend, config, variant: str) -> list[float]:
    batches = make_batches(variant)
    ids, mask = token_mapping(batches, config.vocab_size, variant)
    backend.set_vocab_mapping(ids, mask)  # the recipe calls it once; NeMo's own HF target ignores it
    return train(backend, config, batches, ids, mask)


@pytest.fixture(scope="module")
def model(markov_target):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(markov_target, dtype=torch.float32, attn_implementation="sdpa")
    return m.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def reference(model, markov_target, sglang_target) -> dict[str, list[float]]:
    """NeMo's own HF target (synchronous: it has no async path), the same draft, the same batches."""
    # NeMo's token mapping all-reduces over torch.distributed when it is initialised, and an in-process
    # SGLang engine initialises it: a TP-2 engine left open by an earlier module would hang that all-reduce
    # (its rank 1 waits for SGLang's own work). The TP-1 engine the SGLang run below uses is a world of one.
    sglang_target(markov_target)
    torch.set_num_threads(1)
    nemo_target = _nemo()[3].HFEagle3TargetModel(model)
    out = {}
    for v in VARIANTS:
        batches = make_batches(v)
        out[v] = train(nemo_target, model.config, batches, *token_mapping(batches, model.config.vocab_size, v), 0)
    return out


def check(losses: dict[str, list[float]], reference: dict[str, list[float]]) -> None:
    for v in VARIANTS:
        diff = max(abs(a - b) for a, b in zip(losses[v], reference[v], strict=True))
        print(f"\n{v}: max per-step |loss - NeMo's| over {STEPS} steps = {diff:.2e}")
        assert diff <= TOL, (v, diff, losses[v][:4], reference[v][:4])
    # the reference learns (the comparison is not between two constants)
    assert reference["logits"][-1] < reference["logits"][0] - 0.05, reference["logits"]


def test_reference_batches_are_what_nemo_packs(reference):
    packed = make_batches("packed")
    assert len(packed) == STEPS and all(int((b["seq_lens"] > 0).sum(1).min()) >= 2 for b in packed)


@pytest.mark.parametrize("engine", ["hf", "sglang"])
def test_nemo_trainer_on_our_target_equals_nemo_reference(engine, markov_target, model, reference, sglang_target):
    from eagle_ray import HFEagle3TargetModel

    target = HFEagle3TargetModel.from_pretrained(markov_target) if engine == "hf" else sglang_target(markov_target)
    assert target.supports_async
    try:
        losses = {v: run_variant(target, model.config, v) for v in VARIANTS}
    finally:
        target.set_vocab_mapping(None, None)  # the SGLang target is shared with other tests: full logits again
        if engine == "hf":
            target.close()
    check(losses, reference)


@ray.remote(num_cpus=0)
class Rank:
    """One rank of a trainer that is not ours: connects to the shared pool by name and trains."""

    def train(self, name: str, config_dict: dict) -> dict[str, list[float]]:
        from transformers import LlamaConfig

        from eagle_ray import PooledTargetModel

        torch.set_num_threads(1)
        from eagle_ray import InvalidBatchError

        client = PooledTargetModel.connect(name)
        try:
            ids = torch.ones(1, 4, dtype=torch.long)
            try:  # bad input is refused in this process, before anything is sent; the pool serves on
                client.generate_batch_async(ids, torch.ones_like(ids), None, None, torch.tensor([[2, 1]]))
                refused = None
            except InvalidBatchError as e:
                refused = e.code
            losses = {v: run_variant(client, LlamaConfig.from_dict(config_dict), v) for v in VARIANTS}
            return {"refused": refused, "stats": client.stats(), **losses}
        finally:
            client.close()


def test_two_ranks_share_one_pool_and_each_equals_nemo_reference(markov_target, model, reference, shared_ray):
    owner = serve_pool("nemo-ranks", markov_target, engine="hf", replicas=2, use_gpu=False, cpus_per_replica=1)
    try:
        ranks = [Rank.remote() for _ in range(2)]
        results = ray.get([r.train.remote("nemo-ranks", model.config.to_dict()) for r in ranks], timeout=600)
    finally:
        owner.close()
    tokens = delivered = 0
    for losses in results:
        assert losses.pop("refused") == "bad_packing"
        stats = losses.pop("stats")  # each rank dispatches (and counts) its own requests
        served = [r["shards_done"] for r in stats["replicas"]]
        assert len(served) == 2 and min(served) > 0, stats  # both replicas served this rank
        tokens += sum(r["tokens_done"] for r in stats["replicas"])
        delivered += stats["bytes_delivered"]
        check(losses, reference)
    shipped = delivered / tokens
    print(f"\nshipped per token, every encoding: {shipped:.0f} bytes (aux + last hidden, fp32: 16H)")
    assert shipped == 16 * model.config.hidden_size  # never logits (another 4V bytes)
