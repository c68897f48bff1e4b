"""The base quantization as a compressed-tensors checkpoint (the layout vLLM and transformers load).

Every qe :class:`~qe.quantizers.qlinear.QuantLinear` becomes an ``nn.Linear`` holding qe's
dequantized weight (after folding smoothing), the compressed-tensors scheme of its setting is
applied, its ``weight_scale`` and ``weight_zero_point`` are set to qe's, and the library's own
compressor packs the weight. qe stores unsigned codes ``c ∈ [0, 2^b)`` with a zero point
``z`` (``2^(b-1)`` on symmetric grids); compressed-tensors stores signed codes
``q = c − 2^(b-1)`` with a signed zero point ``z − 2^(b-1)`` (0 on symmetric grids, where it
is not written), so ``(q − zp) · scale = (c − z) · scale`` exactly. The packed codes are read
back and compared with qe's: a single differing code refuses the export.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from qe.checkpoint import split_into_shards, unique_tensors
from qe.errors import ModelError
from qe.export.plan import strategy
from qe.quantized import dequantize
from qe.quantizers.qlinear import QuantLinear


def scheme_key(ql: QuantLinear) -> tuple:
    strat, group = strategy(ql)
    return ql.bits, strat, group, ql.symmetric, ql.a_bits


def _scheme(key: tuple, targets: list[str]):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    bits, strat, group, symmetric, a_bits = key
    weights = QuantizationArgs(num_bits=bits, type="int", strategy=strat, group_size=group, symmetric=symmetric,
                               dynamic=False)
    acts = None
    if a_bits < 16:
        acts = QuantizationArgs(num_bits=a_bits, type="int", strategy="token", symmetric=True, dynamic=True)
    # vLLM's int8 W8A8 kernels read int-quantized (one int8 per weight); everything else is packed.
    fmt = "int-quantized" if bits == 8 and acts is not None else "pack-quantized"
    return QuantizationScheme(targets=targets, weights=weights, input_activations=acts, format=fmt)


def dense_linear(ql: QuantLinear, divisor: torch.Tensor | None) -> tuple[nn.Linear, torch.Tensor]:
    """An ``nn.Linear`` with qe's dequantized weight; with ``divisor`` its output rows are
    divided (scales and bias), as folding a following layer's smoothing needs. Returns the
    linear and its (folded) scales."""
    scales = ql.scales.detach().float()
    if divisor is not None:
        scales = scales / divisor.float()[:, None]
    lin = nn.Linear(ql.in_features, ql.out_features, bias=ql.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(dequantize(ql.codes(), scales, ql.zeros.detach().float(), ql.group_size))
        if ql.bias is not None:
            bias = ql.bias.detach().float()
            lin.bias.copy_(bias / divisor.float() if divisor is not None else bias)
    return lin, scales


def to_compressed(model: nn.Module, layers: dict[str, QuantLinear], folds: dict[str, tuple[str, torch.Tensor]],
                  progress: bool = False):
    """Replace qe's quantized linears in ``model`` by compressed-tensors modules (in place);
    return the :class:`ModelCompressor` that describes them. Plain linears that are the
    producers of a fold have their rows divided too."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    groups: dict[tuple, list[str]] = {}
    folded_scales: dict[str, torch.Tensor] = {}
    for name, ql in layers.items():
        divisor = folds[name][1] if name in folds else None
        lin, scales = dense_linear(ql, divisor)
        model.set_submodule(name, lin)
        folded_scales[name] = scales
        groups.setdefault(scheme_key(ql), []).append(name)
    for name, (_, divisor) in folds.items():
        if name in layers:
            continue
        lin = model.get_submodule(name)  # an unquantized (skipped) linear
        with torch.no_grad():
            lin.weight.div_(divisor.to(lin.weight)[:, None])
            if lin.bias is not None:
                lin.bias.div_(divisor.to(lin.bias))
    config_groups = {f"group_{i}": _scheme(key, [f"re:^{re.escape(n)}$" for n in names])
                     for i, (key, names) in enumerate(groups.items())}
    fmts = {g.format for g in config_groups.values()}
    config = QuantizationConfig(config_groups=config_groups, format=fmts.pop() if len(fmts) == 1 else "mixed-precision",
                                quantization_status="frozen")
    apply_quantization_config(model, config, show_progress=False)
    with torch.no_grad():
        for name, ql in layers.items():
            mod = model.get_submodule(name)
            half = 1 << (ql.bits - 1)
            mod.weight_scale.copy_(folded_scales[name].reshape(mod.weight_scale.shape).to(mod.weight_scale.dtype))
            zp = getattr(mod, "weight_zero_point", None)
            if zp is not None:
                zp.copy_((ql.zeros.detach().float() - half).round().reshape(zp.shape).to(zp.dtype))
    compressor = ModelCompressor.from_pretrained_model(model)
    if progress:
        compressor.compress_model(model)
    else:
        _without_progress(lambda: compressor.compress_model(model))
    for name, ql in layers.items():
        check_codes(name, ql, model.get_submodule(name))
    return compressor


def _without_progress(fn):
    """Run ``fn`` with compressed-tensors' per-module progress bar silenced."""
    from compressed_tensors.compressors.model_compressors import model_compressor as mc

    bar = mc.tqdm
    mc.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        return fn()
    finally:
        mc.tqdm = bar


def check_codes(name: str, ql: QuantLinear, mod: nn.Module) -> None:
    """The compressed module's signed codes (and zero points) must be qe's, shifted by 2^(b-1)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    half = 1 << (ql.bits - 1)
    expected = ql.codes().to(torch.int32) - half
    packed = getattr(mod, "weight_packed", None)
    if packed is not None:
        codes = unpack_from_int32(packed.data, ql.bits, torch.Size((ql.out_features, ql.in_features))).to(torch.int32)
    else:
        codes = mod.weight.data.to(torch.int32)
    if not torch.equal(codes, expected):
        bad = int((codes != expected).sum())
        raise ModelError(f"{name}: {bad} compressed-tensors codes differ from qe's after packing: this is a bug in "
                         "qe's export; report it with the checkpoint's qe_manifest.json")


def state_to_shards(state: dict[str, torch.Tensor], directory: Path, prefix: str = "model") -> list[str]:
    """Write tensors as safetensors shards (tensors sharing storage written once); return names."""
    # a tied alias (lm_head = embed_tokens) is left out: transformers re-ties it from the config
    unique, _ = unique_tensors(state)
    shards = split_into_shards({k: t.detach().cpu().contiguous() for k, t in unique.items()})
    if len(shards) == 1:
        names = [f"{prefix}.safetensors"]
    else:
        names = [f"{prefix}-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for name, shard in zip(names, shards):
        save_file(shard, str(directory / name), metadata={"format": "pt"})
    if len(names) > 1:
        import json

        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in unique.values())},
                 "weight_map": {k: n for n, shard in zip(names, shards) for k in shard}}
        (directory / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return names
