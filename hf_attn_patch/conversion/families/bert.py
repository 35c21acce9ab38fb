"""BERT: query/key/value per layer, always with biases -> GQA-BERT.

Stock BertModel cannot hold fewer key/value heads than query heads, so the converted config
records `num_key_value_heads` and hf_attn_patch's patch layer builds the smaller projections.
"""

from __future__ import annotations

from ..errors import ConversionError
from ..plan import ConversionPlan, check_layer_count, check_num_groups, config_int, expect_tensor, find_prefix
from ..projections import SeparateKV
from ..source import TensorInfo

_KEY_PATTERN = r"^(?P<prefix>.*?)encoder\.layer\.(?P<layer>\d+)\.attention\.self\.key\.weight$"


def plan_bert(
    config: dict, tensors: dict[str, TensorInfo], num_kv_heads: int, *, rewrite_attention: bool = False
) -> ConversionPlan:
    """rewrite_attention: the method also rewrites query and attention.output.dense (calibrated methods)."""
    num_heads = config_int(config, "num_attention_heads")
    num_layers = config_int(config, "num_hidden_layers")
    hidden = config_int(config, "hidden_size")
    if hidden % num_heads:
        raise ConversionError(
            f"config.json: hidden_size {hidden} is not a multiple of num_attention_heads {num_heads}"
        )
    head_dim = hidden // num_heads
    current = config_int(config, "num_key_value_heads", default=num_heads)
    if num_heads % current:
        raise ConversionError(
            f"config.json: num_key_value_heads {current} does not divide num_attention_heads {num_heads}"
        )
    groups = check_num_groups(num_kv_heads, current, num_heads)
    if rewrite_attention:
        _check_calibratable(config, current, num_heads)
    prefix = find_prefix(tensors, _KEY_PATTERN, "bert.encoder.layer.0.attention.self.key.weight")
    check_layer_count(tensors, _KEY_PATTERN, num_layers)

    layers = []
    for layer in range(num_layers):
        base = f"{prefix}encoder.layer.{layer}.attention.self."
        expect_tensor(tensors, base + "query.weight", (hidden, hidden))
        for proj in ("key", "value"):
            expect_tensor(tensors, f"{base}{proj}.weight", (current * head_dim, hidden), floating=True)
            expect_tensor(tensors, f"{base}{proj}.bias", (current * head_dim,), floating=True)
        attention = {}
        if rewrite_attention:
            output = f"{prefix}encoder.layer.{layer}.attention.output.dense.weight"
            expect_tensor(tensors, base + "query.weight", (hidden, hidden), floating=True)
            expect_tensor(tensors, base + "query.bias", (hidden,), floating=True)
            expect_tensor(tensors, output, (hidden, hidden), floating=True)
            attention = dict(
                query=base + "query.weight",
                query_bias=base + "query.bias",
                output=output,
                num_query_heads=num_heads,
                rotary=False,
            )
        layers.append(
            SeparateKV(
                layer=layer,
                key=base + "key.weight",
                value=base + "value.weight",
                key_bias=base + "key.bias",
                value_bias=base + "value.bias",
                head_dim=head_dim,
                hidden_size=hidden,
                num_groups=groups,
                **attention,
            )
        )
    stock = groups == num_heads
    return ConversionPlan(
        family="bert",
        layout="separate query/key/value",
        num_query_heads=num_heads,
        kv_heads_before=current,
        kv_heads_after=groups,
        head_dim=head_dim,
        new_config={**config, "num_key_value_heads": groups},
        layers=tuple(layers),
        stock_loadable=stock,
        notes=()
        if stock
        else (
            "GQA-BERT: stock BertModel cannot load this checkpoint (its key/value projections are "
            "smaller than its query projection); load it through hf_attn_patch, see docs/conversion.md",
        ),
    )


def _check_calibratable(config: dict, current: int, num_heads: int) -> None:
    if current != num_heads:
        raise ConversionError(
            f"this is already a GQA-BERT ({current} KV heads): calibrated methods run the original "
            "model with stock transformers, which cannot build it; convert it with method='mean', "
            "or convert the original multi-head BERT instead"
        )
    position = config.get("position_embedding_type", "absolute")
    if position not in (None, "absolute"):
        raise ConversionError(
            f"position_embedding_type {position!r}: its relative position terms read the key and "
            "query heads directly, which calibrated methods transform; only absolute positions are "
            "supported, use method='mean'"
        )
