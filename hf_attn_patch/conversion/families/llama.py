"""Llama and Mistral: q_proj/k_proj/v_proj per layer, optional biases, num_key_value_heads."""

from __future__ import annotations

from ..errors import ConversionError
from ..plan import ConversionPlan, check_layer_count, check_num_groups, config_int, expect_tensor, find_prefix
from ..projections import SeparateKV
from ..source import TensorInfo

_KEY_PATTERN = r"^(?P<prefix>.*?)layers\.(?P<layer>\d+)\.self_attn\.k_proj\.weight$"


def plan_llama(
    config: dict, tensors: dict[str, TensorInfo], num_kv_heads: int, *, rewrite_attention: bool = False
) -> ConversionPlan:
    """rewrite_attention: the method also rewrites q_proj and o_proj (calibrated methods)."""
    num_heads = config_int(config, "num_attention_heads")
    num_layers = config_int(config, "num_hidden_layers")
    hidden = config_int(config, "hidden_size")
    head_dim = config_int(config, "head_dim", default=hidden // num_heads)
    prefix = find_prefix(tensors, _KEY_PATTERN, "model.layers.0.self_attn.k_proj.weight")
    check_layer_count(tensors, _KEY_PATTERN, num_layers)
    current = _current_kv_heads(
        config, tensors, f"{prefix}layers.0.self_attn.k_proj.weight", head_dim, num_heads
    )
    groups = check_num_groups(num_kv_heads, current, num_heads)
    if rewrite_attention:
        _check_full_rotary(config, head_dim)

    layers = []
    for layer in range(num_layers):
        base = f"{prefix}layers.{layer}.self_attn."
        expect_tensor(tensors, base + "q_proj.weight", (num_heads * head_dim, hidden))
        for proj in ("k_proj", "v_proj"):
            expect_tensor(tensors, f"{base}{proj}.weight", (current * head_dim, hidden), floating=True)
        has_bias = (
            bool(config.get("attention_bias"))
            or f"{base}k_proj.bias" in tensors
            or f"{base}v_proj.bias" in tensors
        )
        if has_bias:
            for proj in ("k_proj", "v_proj"):
                expect_tensor(tensors, f"{base}{proj}.bias", (current * head_dim,), floating=True)
        attention = {}
        if rewrite_attention:
            expect_tensor(tensors, base + "q_proj.weight", (num_heads * head_dim, hidden), floating=True)
            expect_tensor(tensors, base + "o_proj.weight", (hidden, num_heads * head_dim), floating=True)
            query_bias = base + "q_proj.bias" if base + "q_proj.bias" in tensors else None
            if query_bias:
                expect_tensor(tensors, query_bias, (num_heads * head_dim,), floating=True)
            attention = dict(
                query=base + "q_proj.weight",
                query_bias=query_bias,
                output=base + "o_proj.weight",
                num_query_heads=num_heads,
                rotary=True,
            )
        layers.append(
            SeparateKV(
                layer=layer,
                key=base + "k_proj.weight",
                value=base + "v_proj.weight",
                key_bias=base + "k_proj.bias" if has_bias else None,
                value_bias=base + "v_proj.bias" if has_bias else None,
                head_dim=head_dim,
                hidden_size=hidden,
                num_groups=groups,
                **attention,
            )
        )
    return ConversionPlan(
        family=config["model_type"],
        layout="separate q_proj/k_proj/v_proj",
        num_query_heads=num_heads,
        kv_heads_before=current,
        kv_heads_after=groups,
        head_dim=head_dim,
        new_config={**config, "num_key_value_heads": groups},
        layers=tuple(layers),
    )


def _check_full_rotary(config: dict, head_dim: int) -> None:
    """Calibrated methods map key heads by per-frequency rotations, which needs RoPE on every dim."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    factor = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if factor not in (None, 1, 1.0) or head_dim % 2:
        raise ConversionError(
            f"this model applies RoPE to part of each head (partial_rotary_factor {factor}, head_dim "
            f"{head_dim}); calibrated methods support full-head RoPE only; use method='mean'"
        )


def _current_kv_heads(
    config: dict, tensors: dict[str, TensorInfo], key: str, head_dim: int, num_heads: int
) -> int:
    """KV heads as the weights hold them; config.json, when it says, must agree.

    Read from the weights because a missing key means different things per family (Llama
    defaults to num_attention_heads, Mistral's config class to 8).
    """
    info = tensors.get(key)
    if info is None:
        raise ConversionError(f"tensor {key!r} is missing; the checkpoint is incomplete")
    rows = info.shape[0]
    if rows == 0 or rows % head_dim or num_heads % (rows // head_dim):
        raise ConversionError(
            f"tensor {key!r} has {rows} rows, not a whole number of KV heads of head_dim {head_dim} "
            f"dividing {num_heads} query heads; config and weights disagree"
        )
    from_weights = rows // head_dim
    stated = config.get("num_key_value_heads")
    if stated is not None and stated != from_weights:
        raise ConversionError(
            f"config.json says num_key_value_heads={stated} but {key!r} holds {from_weights} heads; "
            "config and weights disagree"
        )
    return from_weights
