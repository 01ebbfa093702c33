"""The transformers engine: the reference target, runs anywhere transformers runs.

Aux states come from forward hooks on the decoder layers (the residual stream each aux
layer outputs); the last hidden state is the decoder's final-norm output. Any decoder-only
causal LM whose base model holds its blocks in `.layers` works: dense (Llama, Qwen2/3,
Mistral, Phi-3, Gemma-3), MoE (Qwen3-MoE, gpt-oss, Llama-4) and MLA (DeepSeek-V3); the
tested matrix is in docs/targets.md. Attention is transformers' own choice for the model: SDPA
where the model supports it, else eager (gpt-oss: its sinks have no SDPA kernel).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM

from eagle_ray.contract import ModelInfo, PackedBatch, Supervision, resolve_aux_layer_ids
from eagle_ray.engines.base import UnsupportedTargetError, forward_in_runs
from eagle_ray.generation import GenerationParams


def decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The base model that holds the decoder blocks in `.layers` and ends with the final norm.

    `get_decoder()` is the usual way in; some models return themselves from it (Llama-4 text in
    transformers 5.19), so `.model` is tried next.
    """
    candidates = [model.get_decoder() if hasattr(model, "get_decoder") else None, getattr(model, "model", None)]
    for c in candidates:
        if isinstance(getattr(c, "layers", None), torch.nn.ModuleList):
            return c
    raise ValueError(
        f"{type(model).__name__}: cannot find the decoder layers (looked for .get_decoder().layers and .model.layers)"
    )


class HFEngine:
    """A transformers causal LM with aux-state hooks. Not thread-safe (one forward at a time).

    Packed batches are right-padded internally into runs of at most `max_batch_tokens`
    padded tokens (SDPA needs a rectangle); pad rows are dropped before returning.
    """

    def __init__(
        self,
        model_path: str | torch.nn.Module,
        aux_layer_ids: list[int] | None = None,
        dtype: torch.dtype | None = None,
        trust_remote_code: bool = False,
        device: str | None = None,
        max_batch_tokens: int = 16384,
        attn_implementation: str | None = None,
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if isinstance(model_path, torch.nn.Module):  # already built (benchmarks): used as is, dtype and attn ignored
            model = model_path
        else:
            # None: transformers picks SDPA where the model supports it, else eager. Every implementation it
            # picks takes the padding mask, and pad rows are dropped before returning either way.
            model = AutoModelForCausalLM.from_pretrained(
                model_path,
                dtype=dtype or "auto",
                trust_remote_code=trust_remote_code,
                attn_implementation=attn_implementation,
            )
        self.model = model.to(self.device)
        self.model.eval().requires_grad_(False)
        self.max_batch_tokens = max_batch_tokens
        self.attn_implementation = self.model.config._attn_implementation
        self._decoder = decoder(self.model)
        layers = self._decoder.layers
        ids = resolve_aux_layer_ids(aux_layer_ids, len(layers))
        self._captured: dict[int, torch.Tensor] = {}
        self._hooks = [layers[i].register_forward_hook(self._capture_hook(i)) for i in ids]
        cfg = self.model.config.get_text_config()
        self.info = ModelInfo(
            hidden_size=cfg.hidden_size,
            vocab_size=cfg.vocab_size,
            num_layers=len(layers),
            aux_layer_ids=tuple(ids),
            dtype=self.model.dtype,
            max_context=cfg.max_position_embeddings,
            kv_capacity_tokens=max_batch_tokens,
        )

    def _capture_hook(self, layer_id: int):
        def hook(module, args, output):
            self._captured[layer_id] = output[0] if isinstance(output, tuple) else output

        return hook

    @torch.no_grad()
    def _run(self, batch: PackedBatch, return_logits: bool):
        lens = batch.cu_seqlens.diff()
        rows = torch.arange(int(lens.max())) < lens[:, None]  # [b, S] real-token positions
        ids = torch.zeros(rows.shape, dtype=torch.long)
        ids[rows] = batch.input_ids
        self._captured.clear()
        out = self._decoder(input_ids=ids.to(self.device), attention_mask=rows.long().to(self.device), use_cache=False)
        keep = rows.to(self.device)
        aux = torch.cat([self._captured[i][keep] for i in self.info.aux_layer_ids], dim=-1)
        last = out.last_hidden_state[keep]
        self._captured.clear()
        logits = self.model.get_output_embeddings()(last).float().cpu() if return_logits else None
        return aux.cpu(), last.cpu(), logits

    def new_cache(self) -> Any:
        """An empty KV cache shaped for this model's layers (for `extend`)."""
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    @torch.no_grad()
    def extend(
        self, input_ids: torch.Tensor, positions: torch.Tensor, visible: torch.Tensor, cache: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Serving-style forward of new tokens `[S]` of one sequence against a KV `cache` (a DynamicCache).

        `visible [S, len(cache) + S]` (bool): which cached and new tokens each new token attends to (causal
        for a prefill, ancestors for a tree verify). The new tokens' keys join `cache`. Returns their aux
        states `[S, 3H]` and full logits `[S, V]` (float32).
        """
        window = min((getattr(layer, "sliding_window", None) or 1 << 62 for layer in cache.layers), default=1 << 62)
        if visible.shape[1] > window:  # a tree mask cannot express a window: refuse rather than attend too far
            raise UnsupportedTargetError(
                f"{type(self.model).__name__} has sliding-window (or chunked) layers of {window} tokens; the cached "
                f"evaluator needs full attention over {visible.shape[1]} tokens (shorter prompts, or another target)"
            )
        mask = torch.zeros(visible.shape, dtype=self.model.dtype).masked_fill(
            ~visible, torch.finfo(self.model.dtype).min
        )
        self._captured.clear()
        out = self._decoder(
            input_ids=input_ids[None].to(self.device),
            position_ids=positions[None].to(self.device),
            attention_mask=mask[None, None].to(self.device),
            past_key_values=cache,
            use_cache=True,
        )
        aux = torch.cat([self._captured[i][0] for i in self.info.aux_layer_ids], dim=-1)
        self._captured.clear()
        logits = self.model.get_output_embeddings()(out.last_hidden_state[0]).float()
        return aux.cpu(), logits.cpu()

    @torch.no_grad()
    def generate(self, batch: PackedBatch, params: GenerationParams, first: int = 0) -> list[list[int]]:
        """transformers' `generate` per prompt (KV-cached; its own seed each, see `eagle_ray.generation`)."""
        out = []
        for i in range(batch.num_sequences):
            ids = batch.input_ids[batch.sequence(i)][None].to(self.device)
            kwargs = {"do_sample": False}
            if params.temperature > 0:
                kwargs = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": 0}
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(params.seed_of(first + i))
                seq = self.model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=params.max_new_tokens,
                    eos_token_id=list(params.stop_ids) or None,
                    pad_token_id=params.stop_ids[0] if params.stop_ids else 0,
                    **kwargs,
                )[0, ids.shape[1] :].tolist()
            if params.stop_ids:  # generate pads after a stop: cut there
                stop = next((k for k, t in enumerate(seq) if t in params.stop_ids), None)
                seq = seq if stop is None else seq[: stop + 1]
            out.append(seq)
        return out

    def forward(self, batch: PackedBatch, return_logits: bool = False) -> Supervision:
        return forward_in_runs(batch, return_logits, self._run, self.max_batch_tokens, padded=True)

    def input_embeddings(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight.detach().cpu()

    def lm_head_weight(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight.detach().cpu()

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self.model = None
