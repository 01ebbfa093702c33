"""The EAGLE-3 draft network, laid out as SGLang 0.5.23's `LlamaForCausalLMEagle3` reads it.

One decoder layer (`midlayer`) whose attention sees `[input_layernorm(embed(token)),
hidden_norm(h)]` (2H wide); `fc` maps the target's three concatenated aux states (3H) to
H for the first step; the final `norm` output feeds `lm_head` over the draft vocabulary and
the pre-norm output is the hidden state of the next step. Parameter names are the export's
names (`fc`, `midlayer.*`, `norm`, `lm_head`, `d2t`, `t2d`), so export is a state dict.

Training runs on packed slots (`TTTState`, no padding): a query at slot t of step k sees step 0's
keys at slots <= t of its sequence, and its own slot's keys from steps 1..k, the keys a chain of k
drafted tokens sees at inference (`draft/attention.py` computes it without a dense mask).
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from eagle_ray.contract import vllm_aux_layer_ids
from eagle_ray.draft.attention import PackedLayout, ttt_attention


@dataclass
class Eagle3DraftConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int  # the target's
    draft_vocab_size: int
    aux_layer_ids: list[int]  # "output of decoder layer i", as the target engines capture them
    target_hidden_size: int | None = None  # None: same as hidden_size
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    hidden_act: str = "silu"
    torch_dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)  # other HF fields carried through export

    @property
    def aux_width(self) -> int:
        return len(self.aux_layer_ids) * (self.target_hidden_size or self.hidden_size)

    @staticmethod
    def from_target(target_config: Any, draft_vocab_size: int, aux_layer_ids: list[int]) -> Eagle3DraftConfig:
        """A draft shaped like one layer of the target (the EAGLE-3 recipe); config as dict or HF config."""
        c = target_config.to_dict() if hasattr(target_config, "to_dict") else dict(target_config)
        c = c.get("text_config") or c
        heads = c["num_attention_heads"]
        rope = c.get("rope_parameters") or {}
        # an MLA target's head_dim is its rope part (DeepSeek-V3: 64 of 192); the draft is a plain Llama layer,
        # shaped as SpecForge's DeepSeek-V3 draft config is: hidden_size / heads
        head_dim = None if c.get("kv_lora_rank") else c.get("head_dim")
        return Eagle3DraftConfig(
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_attention_heads=heads,
            num_key_value_heads=c.get("num_key_value_heads", heads),
            head_dim=head_dim or c["hidden_size"] // heads,
            vocab_size=c["vocab_size"],
            draft_vocab_size=draft_vocab_size,
            aux_layer_ids=list(aux_layer_ids),
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
            max_position_embeddings=c.get("max_position_embeddings", 4096),
            hidden_act=c.get("hidden_act", "silu"),
        )

    def to_hf(self) -> dict[str, Any]:
        """config.json as SGLang 0.5.23 reads an EAGLE-3 draft (transformers LlamaConfig fields).

        The same file serves vLLM 0.33 (`--speculative-config '{"method": "eagle3", "model": DIR}'`): it
        reads the top-level `eagle_aux_hidden_state_layer_ids` (`contract.vllm_aux_layer_ids`) and
        `norm_before_residual` (and, with a full draft vocabulary, rejects the d2t/t2d `save_draft` writes).
        speculators 0.9 has its own layout: `export.save_speculators`.
        """
        return {
            **self.extra,
            "architectures": ["LlamaForCausalLMEagle3"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_hidden_layers": 1,
            "vocab_size": self.vocab_size,
            "draft_vocab_size": self.draft_vocab_size,
            "target_hidden_size": self.target_hidden_size or self.hidden_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": self.hidden_act,
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": self.torch_dtype,
            # SGLang's convention for these ids is ours ("output of layer i"); it adds 1 itself
            "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(self.aux_layer_ids)},
            # vLLM (V1 and V2 runners) reads the top-level key only, as hidden-state indices (ours + 1)
            "eagle_aux_hidden_state_layer_ids": vllm_aux_layer_ids(self.aux_layer_ids),
            # residual = the un-normalised hidden (MidLayer.forward); vLLM's speculators path defaults to True
            "norm_before_residual": False,
        }

    @staticmethod
    def from_hf(d: dict[str, Any]) -> Eagle3DraftConfig:
        if d.get("architectures") != ["LlamaForCausalLMEagle3"] or d.get("num_hidden_layers", 1) != 1:
            raise ValueError(f"not a one-layer LlamaForCausalLMEagle3 draft config: {d.get('architectures')}")
        ids = (d.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        if not ids:
            raise ValueError("draft config has no eagle_config.eagle_aux_hidden_state_layer_ids")
        top = d.get("eagle_aux_hidden_state_layer_ids")
        if top is not None and list(top) != vllm_aux_layer_ids(ids):
            raise ValueError(
                f"draft config's top-level eagle_aux_hidden_state_layer_ids {list(top)} (vLLM's convention, "
                f"hidden-state indices) must be eagle_config's {list(ids)} (ours: output of layer i) + 1, "
                f"i.e. {vllm_aux_layer_ids(ids)}"
            )
        if d.get("norm_before_residual"):
            raise ValueError("draft config has norm_before_residual true; this draft's residual is the raw hidden")
        names = {f.name for f in fields(Eagle3DraftConfig)} - {"aux_layer_ids", "extra"}
        known = {k: d[k] for k in names if k in d}
        required = [f.name for f in fields(Eagle3DraftConfig) if f.default is MISSING and f.name in names]
        absent = [k for k in required if k not in known]
        if absent:
            raise ValueError(f"draft config lacks {absent}")
        known["extra"] = {k: v for k, v in d.items() if k not in names and k not in _HF_KEYS}
        rope = d.get("rope_parameters") or {}
        if "rope_theta" in rope:
            known["rope_theta"] = float(rope["rope_theta"])
        if known.get("target_hidden_size") == known.get("hidden_size"):
            known["target_hidden_size"] = None
        return Eagle3DraftConfig(aux_layer_ids=list(ids), **known)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# keys `to_hf` writes itself; anything else in a config.json is carried in `extra`
_HF_KEYS = set(Eagle3DraftConfig(0, 0, 0, 0, 0, 0, 0, []).to_hf())


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 statistics, as Llama and SGLang compute them
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Neox-style rotary embedding (Llama's rotate_half) of x `[..., S, heads, d]` at `positions [..., S]`."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = positions.float()[..., None, None] * inv  # [..., S, 1, d/2]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


@dataclass
class TTTState:
    """Training-time test over packed slots `[N]`: the layout, and each step's keys/values so far
    (`kv[0]`: step 0, attended document-causally; `kv[j]`, j >= 1: step j, attended on the diagonal)."""

    layout: PackedLayout
    attention: str = "torch"
    kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


@dataclass
class KVCache:
    """Inference (serving-style decoding): keys/values of every slot run so far, one sequence.

    Before each forward the caller sets `mask [Sq, len + Sq]`: which cached slots and which new
    ones each new query sees (causal for an extend, ancestors for a tree step). `crop(n)` drops
    slots from `n` on (a round's tree slots, once it is verified).
    """

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def crop(self, n: int) -> None:
        if self.k is not None:
            self.k, self.v = self.k[:, :, :n], self.v[:, :, :n]


class Attention(nn.Module):
    def __init__(self, c: Eagle3DraftConfig):
        super().__init__()
        self.heads, self.kv_heads, self.hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.theta = c.rope_theta
        self.q_proj = nn.Linear(2 * c.hidden_size, self.heads * self.hd, bias=False)
        self.k_proj = nn.Linear(2 * c.hidden_size, self.kv_heads * self.hd, bias=False)
        self.v_proj = nn.Linear(2 * c.hidden_size, self.kv_heads * self.hd, bias=False)
        self.o_proj = nn.Linear(self.heads * self.hd, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: TTTState | KVCache) -> torch.Tensor:
        """`x [N, 2H]` packed slots under a `TTTState`, or `[B, S, 2H]` against a `KVCache`."""
        shape = (*x.shape[:-1], -1, self.hd)
        q = rope(self.q_proj(x).view(shape), positions, self.theta)
        k = rope(self.k_proj(x).view(shape), positions, self.theta)
        v = self.v_proj(x).view(shape)
        if isinstance(cache, TTTState):
            cache.kv.append((k, v))
            out = ttt_attention(q, cache.kv, cache.layout, self.hd**-0.5, cache.attention)
            return self.o_proj(out.flatten(-2))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, S, d]
        cache.k = k if cache.k is None else torch.cat([cache.k, k], dim=2)
        cache.v = v if cache.v is None else torch.cat([cache.v, v], dim=2)
        out = F.scaled_dot_product_attention(q, cache.k, cache.v, attn_mask=cache.mask[None, None], enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).flatten(-2))


class MLP(nn.Module):
    def __init__(self, c: Eagle3DraftConfig):
        super().__init__()
        if c.hidden_act != "silu":
            raise ValueError(f"draft hidden_act {c.hidden_act!r} unsupported; SGLang's Llama draft uses silu")
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MidLayer(nn.Module):
    def __init__(self, c: Eagle3DraftConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, embeds, hidden, positions, cache: TTTState | KVCache) -> torch.Tensor:
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        h = hidden + self.self_attn(x, positions, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3Draft(nn.Module):
    def __init__(self, config: Eagle3DraftConfig):
        super().__init__()
        c = self.config = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.fc = nn.Linear(c.aux_width, c.hidden_size, bias=False)
        self.midlayer = MidLayer(c)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(c.vocab_size, dtype=torch.bool))

    @staticmethod
    def from_target(
        config: Eagle3DraftConfig,
        embeddings: torch.Tensor,
        lm_head_weight: torch.Tensor,
        draft_ids: torch.Tensor,
        freeze_embeddings: bool = True,
        seed: int = 0,
    ) -> Eagle3Draft:
        """A fresh draft: target embeddings (frozen by default), lm_head from the target's draft-vocab rows."""
        if embeddings.shape != (config.vocab_size, config.hidden_size):
            raise ValueError(f"target embeddings {tuple(embeddings.shape)} do not fit the draft config")
        if draft_ids.numel() != config.draft_vocab_size:
            raise ValueError(f"{draft_ids.numel()} draft ids for draft_vocab_size {config.draft_vocab_size}")
        torch.manual_seed(seed)
        draft = Eagle3Draft(config)
        with torch.no_grad():
            draft.embed_tokens.weight.copy_(embeddings)
            draft.lm_head.weight.copy_(lm_head_weight[draft_ids])
            draft.d2t.copy_(draft_ids - torch.arange(draft_ids.numel()))
            draft.t2d.zero_()
            draft.t2d[draft_ids] = True
        draft.embed_tokens.weight.requires_grad_(not freeze_embeddings)
        return draft

    @property
    def draft_ids(self) -> torch.Tensor:
        """Target id of each draft id."""
        return self.d2t + torch.arange(self.d2t.numel(), device=self.d2t.device)

    def step(
        self, input_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, state: TTTState
    ) -> torch.Tensor:
        """One TTT step over packed slots `[N]`; returns the pre-norm hidden `[N, H]` (the next step's input).

        `hidden` is the target's concatenated aux states on the first step (empty `state`; `fc`
        projects them), else the previous step's output.
        """
        if not state.kv:
            hidden = self.fc(hidden)
        return self.midlayer(self.embed_tokens(input_ids), hidden, positions, state)

    def infer(
        self, input_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, cache: KVCache, aux: bool
    ) -> torch.Tensor:
        """One serving-style forward of new slots `[S]` of one sequence against `cache` (its mask set).

        `aux`: `hidden` is the target's aux states (an extend over verified tokens, `fc` projects them),
        else the draft's own hidden of each slot's parent (a tree step). Returns the pre-norm hidden `[S, H]`.
        """
        h = self.fc(hidden) if aux else hidden
        return self.midlayer(self.embed_tokens(input_ids)[None], h[None], positions[None], cache)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits of pre-norm hidden states."""
        return self.lm_head(self.norm(hidden))
