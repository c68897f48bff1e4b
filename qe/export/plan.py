"""What an export can express, decided before anything is written.

* :func:`check_base` refuses a quantized linear whose setting compressed-tensors cannot
  express (one line listing what it can);
* :func:`fold_plan` finds, for every explicit smoothing scale (``QuantLinear.input_scale``),
  the preceding linear whose output rows absorb ``1/s`` (o_proj's into v_proj, down_proj's into
  up_proj), or refuses naming the layer;
* :func:`lowrank_terms` turns each compensator into the fixed low-rank term a PEFT LoRA
  adapter holds, or refuses one that is not such a term.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qe.compensators.modules import LowRankAdapter, QuantExpertsAdapter
from qe.errors import ConfigError
from qe.quantizers.qlinear import QuantLinear

BASE_CAN_EXPRESS = ("W2-W8 integer weights per output channel or per group (symmetric or asymmetric) with "
                    "A16 (weight-only) or with A8 int8 dynamic per-token symmetric activations, every group size "
                    "dividing the layer's input width, no activation-exempt columns under A8")
LORA_CAN_EXPRESS = ("a fixed low-rank term y = A(Bx) on the unquantized input: qe's lowrank, or qe's shared expert "
                    "(the routed experts and router are dropped), each with branch input bits 16")

# The linear whose output is a smoothed linear's input, by the linear's last two name parts.
PRODUCERS = {"self_attn.o_proj": "self_attn.v_proj", "mlp.down_proj": "mlp.up_proj"}


def check_base(name: str, ql: QuantLinear) -> None:
    """Refuse, in one line, a linear whose quantization compressed-tensors cannot express."""
    if ql.input_rotation is not None:
        raise ConfigError(f"{name}: its input is rotated online (the rotate transform), which no export format "
                          "expresses: export a checkpoint quantized without rotate, or load it with qe.load_quantized")
    problems = []
    if not 2 <= ql.bits <= 8:
        problems.append(f"W{ql.bits} weights")
    if ql.a_bits not in (8, 16):
        problems.append(f"A{ql.a_bits} activations")
    if ql.a_bits < 16 and ql.static_act_scale is not None:
        problems.append("a static per-tensor activation scale")
    if ql.a_bits < 16 and ql.act_keep is not None and not bool(ql.act_keep.all()):
        problems.append("activation-exempt columns (zeroed before the per-token activation quantizer)")
    if 0 < ql.group_size < ql.in_features and ql.in_features % ql.group_size:
        problems.append(f"group size {ql.group_size} that does not divide the input width {ql.in_features}")
    if problems:
        raise ConfigError(f"{name}: compressed-tensors cannot express {' and '.join(problems)}; it expresses "
                          f"{BASE_CAN_EXPRESS}: re-quantize with such a setting")


def check_kv_cache(manifest: dict | None) -> None:
    """Refuse, in one line, a checkpoint whose setting quantizes the KV cache: qe simulates that
    inside attention (:mod:`qe.quantizers.kv_cache`), with an online rotation of each head that
    no export format carries."""
    from qe.settings import parse_setting

    setting = ((manifest or {}).get("composition") or {}).get("setting")
    if isinstance(setting, str) and parse_setting(setting).quantizes_kv_cache:
        raise ConfigError(f"the checkpoint's setting {setting} quantizes the KV cache, which qe simulates inside "
                          "attention and no export format carries: export a checkpoint quantized without KV<bits>, "
                          "or load it with qe.load_quantized")


def strategy(ql: QuantLinear) -> tuple[str, int | None]:
    """compressed-tensors' weight strategy and group size (a group as wide as the row is a channel)."""
    if ql.group_size == 0 or ql.group_size >= ql.in_features:
        return "channel", None
    return "group", ql.group_size


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        return None
    getter = getattr(config, "get_text_config", None)
    return getter() if getter is not None else config


def _producer_scale(name: str, consumer: QuantLinear, producer: nn.Module, model: nn.Module) -> torch.Tensor:
    """The ``(producer.out_features,)`` vector that divides the producer's output rows."""
    s = consumer.input_scale.detach().float()
    d_out = producer.out_features
    if d_out == s.numel():
        return s
    cfg = _text_config(model)
    heads = getattr(cfg, "num_attention_heads", None)
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    if name.endswith("o_proj") and heads and kv and s.numel() % heads == 0 and heads % kv == 0:
        head_dim = s.numel() // heads
        if d_out == kv * head_dim:
            grouped = s.reshape(kv, heads // kv, head_dim)
            if torch.equal(grouped, grouped[:, :1].expand_as(grouped)):
                return grouped[:, 0].reshape(-1)
            raise ConfigError(
                f"{name}: its smoothing scales differ between the {heads // kv} query heads that share each "
                f"key-value head (grouped-query attention), so they cannot be folded into v_proj: re-quantize "
                "without smoothing on o_proj (a transform or alphas that leave it unsmoothed) to export it")
    raise ConfigError(f"{name}: its {s.numel()} smoothing scales do not match the {d_out} outputs of the linear "
                      "before it, so they cannot be folded: re-quantize without smoothing on this layer to export it")


def fold_plan(model: nn.Module, layers: dict[str, QuantLinear]) -> dict[str, tuple[str, torch.Tensor]]:
    """``{producer name: (consumer name, divisor)}`` for every explicit smoothing scale.

    The consumer's ``input_scale`` is dropped and the producer's output rows are divided by
    the divisor (its scales, bias and compensator output rows), which gives the consumer
    ``x̃ = x / s`` exactly as qe computed it."""
    plan: dict[str, tuple[str, torch.Tensor]] = {}
    for name, ql in layers.items():
        if ql.input_scale is None:
            continue
        parent, _, leaf = name.rpartition(".")
        grand, _, owner = parent.rpartition(".")
        key = f"{owner}.{leaf}"
        if key not in PRODUCERS:
            raise ConfigError(f"{name}: its smoothing scales (input_scale) follow no linear they could be folded into "
                              f"(only {', '.join(PRODUCERS)} are, into {', '.join(PRODUCERS.values())}): re-quantize "
                              "without smoothing on this layer to export it")
        producer_name = f"{grand}.{PRODUCERS[key]}" if grand else PRODUCERS[key]
        try:
            producer = model.get_submodule(producer_name)
        except AttributeError:
            producer = None
        if not isinstance(producer, (QuantLinear, nn.Linear)):
            raise ConfigError(f"{name}: its smoothing scales would fold into {producer_name}, which is not a linear "
                              "of this model: re-quantize without smoothing on this layer to export it")
        plan[producer_name] = (name, _producer_scale(name, ql, producer, model))
    return plan


@dataclass
class LowRankTerm:
    """``y = A (B x)`` on the layer's (folded) input: ``A`` ``(d_out, r)``, ``B`` ``(r, d_in)``."""

    A: torch.Tensor
    B: torch.Tensor
    source: str  # "lowrank" or "shared expert"
    dropped: dict[str, Any] = field(default_factory=dict)  # what the adapter leaves out (routed experts)

    @property
    def rank(self) -> int:
        return int(self.A.shape[1])


def compensator_record(name: str, manifest: dict | None) -> dict:
    layouts = (manifest or {}).get("layouts", {})
    return (layouts.get(name) or {}).get("compensator") or {}


def lowrank_term(name: str, ql: QuantLinear, manifest: dict | None = None) -> LowRankTerm | None:
    """The fixed low-rank term of ``ql``'s compensator (None without one or with rank 0), or a
    one-line refusal for a compensator PEFT LoRA cannot express."""
    comp = ql.compensator
    if comp is None:
        return None
    if isinstance(comp, (LowRankAdapter, QuantExpertsAdapter)) and comp.input_bits != 16:
        raise ConfigError(f"{name}: the compensator fake-quantizes its own input to {comp.input_bits} bits, which a "
                          f"PEFT LoRA adapter cannot; PEFT LoRA expresses {LORA_CAN_EXPRESS}: re-quantize with "
                          "branch_input_bits=16 or export --format compressed-tensors")
    if isinstance(comp, LowRankAdapter):
        if comp.rank == 0:
            return None
        # factor(): integer-stored factors come back dequantized, exactly as the module runs them
        return LowRankTerm(comp.factor("A").detach().float().clone(), comp.factor("B").detach().float().clone(), "lowrank")
    if isinstance(comp, QuantExpertsAdapter):
        dropped = {"num_experts": comp.num_experts, "expert_rank": comp.expert_rank, "routing": comp.routing}
        if comp.shared_rank == 0:
            return LowRankTerm(torch.zeros(comp.d_out, 0), torch.zeros(0, comp.d_in), "shared expert",
                               dropped)
        return LowRankTerm(comp.factor("A_s").detach().float().clone(), comp.factor("B_s").detach().float().clone(),
                           "shared expert",
                           dropped)
    record = compensator_record(name, manifest)
    plugin = record.get("plugin", "?")
    dist = record.get("distribution", "an unknown distribution")
    raise ConfigError(f"{name}: compensator module {comp.module_type!r} (plugin "
                      f"{plugin!r}, from {dist}) is not a fixed low-rank term, and PEFT LoRA expresses only "
                      f"{LORA_CAN_EXPRESS}: export --format compressed-tensors for the base alone")
