"""Model surgery: measure how much each decoder layer and MLP channel does, and cut the least.

    scores = layer_importance(model, tok, texts)          # angular distance in/out of each layer
    model = keep_layers(model, select_layers(scores, 15))
    model = prune_mlp(model, tok, texts, intermediate_size=768)

Every function works in place on a llama-family transformers model; the compress stage (distill/compress.py)
chains them and recovers the loss with KD.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from nestling.core.config import check

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast


def _batches(tok: PreTrainedTokenizerFast, texts: Sequence[str], batch_size: int, max_len: int):
    tok.padding_side = "right"
    for i in range(0, len(texts), batch_size):
        yield tok(
            list(texts[i : i + batch_size]),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_len,
        )


def _calibrate(
    model: LlamaForCausalLM,
    tok: PreTrainedTokenizerFast,
    texts: Sequence[str],
    register: Callable[[int, Any, dict], Any],
    batch_size: int,
    max_len: int,
) -> None:
    """Run `texts` through `model` with one hook per decoder layer, ``register(i, layer, state)`` -> handle.
    state["mask"] is the batch's (B, T) float attention mask, so hooks can ignore padding."""
    import torch

    check(len(texts) > 0, "calibration needs at least one text")
    state: dict[str, Any] = {}
    handles = [register(i, layer, state) for i, layer in enumerate(model.model.layers)]
    try:
        model.eval()
        with torch.no_grad():
            for enc in _batches(tok, texts, batch_size, max_len):
                state["mask"] = enc["attention_mask"].float()  # (B, T)
                model(**enc, use_cache=False)
    finally:
        for h in handles:
            h.remove()


def layer_importance(
    model: LlamaForCausalLM,
    tok: PreTrainedTokenizerFast,
    texts: Sequence[str],
    batch_size: int = 8,
    max_len: int = 256,
) -> list[float]:
    """Mean angular distance arccos(cos(h_in, h_out)) / pi between each decoder layer's input and output
    hidden states over the real tokens of `texts` (Gromov et al. 2024, one layer at a time): a layer
    that barely turns the residual stream is the cheapest to drop."""
    import torch

    sums = [0.0] * len(model.model.layers)
    count = [0.0]

    def register(i: int, layer: Any, state: dict) -> Any:
        def hook(_mod, args, kwargs, out):
            h_in = args[0] if args else kwargs["hidden_states"]  # (B, T, C)
            h_out = out[0] if isinstance(out, tuple) else out  # (B, T, C)
            cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)  # (B, T)
            sums[i] += float((torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi * state["mask"]).sum())
            count[0] += float(state["mask"].sum()) if i == 0 else 0.0

        return layer.register_forward_hook(hook, with_kwargs=True)

    _calibrate(model, tok, texts, register, batch_size, max_len)
    return [s / max(count[0], 1.0) for s in sums]


def select_layers(importance: Sequence[float], keep: int) -> list[int]:
    """The first and last layer, plus the keep - 2 middle layers of largest importance, in order."""
    n = len(importance)
    check(2 <= keep <= n, f"keep_layers={keep}: must be between 2 and the model's {n} layers")
    middle = sorted(range(1, n - 1), key=lambda i: importance[i], reverse=True)[: keep - 2]
    return sorted({0, n - 1, *middle})


def keep_layers(model: LlamaForCausalLM, idx: Sequence[int]) -> LlamaForCausalLM:
    """Keep decoder layers `idx` (in order); in place."""
    import torch

    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList(layers[i] for i in idx)
    for new_i, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_i  # the KV cache is indexed by position in the list
    model.config.num_hidden_layers = len(idx)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in idx]
    return model


def mlp_importance(
    model: LlamaForCausalLM,
    tok: PreTrainedTokenizerFast,
    texts: Sequence[str],
    batch_size: int = 8,
    max_len: int = 256,
    by_write: bool = True,
) -> list[Any]:
    """Per layer, each MLP channel's mean |act(gate(x)) * up(x)| over real tokens times the norm of its
    down-projection column: what the channel writes into the residual stream (by_write=False: activation
    alone, as Minitron ranks). With the column norm a half-width SmolLM2 keeps clearly more held-out accuracy
    before any recovery than ranked by activation alone: benchmarks/results/prune_before_recovery.json
    (benchmarks/bench_prune.py)."""
    import torch

    sums = [torch.zeros(layer.mlp.down_proj.in_features) for layer in model.model.layers]

    def register(i: int, layer: Any, state: dict) -> Any:
        def hook(_mod, args):
            act = args[0].float().abs()  # (B, T, I): the down projection's input
            sums[i] += (act * state["mask"].unsqueeze(-1)).sum((0, 1))

        return layer.mlp.down_proj.register_forward_pre_hook(hook)

    _calibrate(model, tok, texts, register, batch_size, max_len)
    if not by_write:
        return sums
    return [
        s * layer.mlp.down_proj.weight.detach().float().norm(dim=0)
        for s, layer in zip(sums, model.model.layers, strict=True)
    ]


def prune_mlp(
    model: LlamaForCausalLM,
    tok: PreTrainedTokenizerFast,
    texts: Sequence[str],
    intermediate_size: int,
    by_write: bool = True,
) -> LlamaForCausalLM:
    """Keep the `intermediate_size` MLP channels of every layer that write most into the residual stream
    (mlp_importance; one size for all layers, as the llama config requires); in place."""
    import torch

    current = model.config.intermediate_size
    check(
        0 < intermediate_size <= current,
        f"intermediate_size={intermediate_size}: must be in 1..{current} (the model's MLP width)",
    )
    if intermediate_size == current:
        return model
    for layer, score in zip(
        model.model.layers, mlp_importance(model, tok, texts, by_write=by_write), strict=True
    ):
        idx = torch.topk(score, intermediate_size).indices.sort().values
        mlp = layer.mlp
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            new = torch.nn.Linear(old.in_features, intermediate_size, bias=False, dtype=old.weight.dtype)
            new.weight.data = old.weight.data[idx].clone()
            setattr(mlp, name, new)
        old = mlp.down_proj
        new = torch.nn.Linear(intermediate_size, old.out_features, bias=False, dtype=old.weight.dtype)
        new.weight.data = old.weight.data[:, idx].clone()
        mlp.down_proj = new
        mlp.intermediate_size = intermediate_size
    model.config.intermediate_size = intermediate_size
    return model
