"""Reading blocks of a model that accelerate has offloaded to CPU or disk.

A model loaded with a ``device_map`` that places decoder blocks on ``"cpu"`` (with an
accelerator as execution device) or ``"disk"`` keeps those blocks' weights on the meta
device; accelerate's hooks load them for the length of one forward and drop them again.
qe's block loop needs more than one forward's worth: it reads the weights, runs the block
several times and reads its linears' outputs. :func:`onloaded` keeps one block's weights
real for the duration of a ``with`` statement, so the loop holds one block at a time.

Changes made to onloaded weights are discarded on exit (the offloaded copy is the source of
truth); a caller that replaces a block's linears must keep the new modules outside the
offloaded tree or write them back itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn


def _align_hooks(module: nn.Module, offloading_only: bool = True) -> list:
    """The accelerate AlignDevicesHooks attached directly to ``module`` (those that offload
    weights, unless ``offloading_only`` is False)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    try:
        from accelerate.hooks import AlignDevicesHook, SequentialHook
    except ImportError:  # accelerate absent: nothing can be offloaded
        return []
    hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
    return [h for h in hooks if isinstance(h, AlignDevicesHook) and (h.offload or not offloading_only)]


def is_offloaded(module: nn.Module) -> bool:
    """True when any part of ``module`` keeps its weights offloaded by accelerate."""
    return any(_align_hooks(m) for m in module.modules())


def execution_device(module: nn.Module) -> torch.device | None:
    """The device accelerate runs an offloaded ``module`` on (None for a plain module)."""
    for m in module.modules():
        for hook in _align_hooks(m):
            if hook.execution_device is not None:
                return torch.device(hook.execution_device) if not isinstance(hook.execution_device, int) \
                    else torch.device("cuda", hook.execution_device)
    return None


@contextlib.contextmanager
def onloaded(module: nn.Module, device: str | torch.device | None = None) -> Iterator[nn.Module]:
    """Keep an offloaded ``module``'s weights as real tensors on ``device`` inside the block.

    ``device`` defaults to accelerate's execution device for the module. Forward calls inside
    the block reuse the onloaded weights instead of reloading and dropping them per call.
    For a module without offloaded parts this is a no-op (it is not moved).
    """
    targets = [(m, h) for m in module.modules() for h in _align_hooks(m)]
    if not targets:
        yield module
        return
    changed: list[tuple[nn.Module, object, object]] = []
    try:
        for m, hook in targets:
            original_device = hook.execution_device
            if device is not None:
                hook.execution_device = torch.device(device)
            hook.pre_forward(m)  # materialise this module's weights on the execution device
            # With offload off, nested forwards neither reload nor drop the weights.
            hook.offload = False
            changed.append((m, hook, original_device))
        yield module
    finally:
        for m, hook, original_device in reversed(changed):
            hook.offload = True
            hook.post_forward(m, None)  # back to the meta device
            hook.execution_device = original_device


class SafetensorsMap(Mapping):
    """The tensors of one safetensors file, read on access (the file stays open, memory-mapped),
    as the lazy weights map accelerate's offload hooks read from."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        self._file = safe_open(str(path), framework="pt")
        self._keys = list(self._file.keys())
        self._key_set = set(self._keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._key_set:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def offload_to_file(module: nn.Module, path: str | Path, execution_device: str | torch.device) -> None:
    """Offload ``module`` (a finished, quantized block) to the safetensors file of its state dict.

    The module's earlier offload hooks (if any) are replaced: they point at its weights before
    quantization and smoothing. Afterwards every persistent tensor of the module is on the meta
    device and forwards read them from ``path``, one submodule at a time, as accelerate does for
    a model loaded with disk offload (:func:`onloaded` keeps them real for longer).
    """
    from accelerate.hooks import (
        AlignDevicesHook,
        add_hook_to_module,
        attach_align_device_hook,
        remove_hook_from_module,
    )

    from qe.quantizers.qlinear import QuantLinear

    remove_hook_from_module(module, recurse=True)
    for m in module.modules():
        if isinstance(m, QuantLinear):
            m.keep_dequantized = False  # a cached float weight would hold what offloading frees
    attach_align_device_hook(module, execution_device=execution_device, offload=True,
                             weights_map=SafetensorsMap(path), offload_buffers=True)
    # Inputs reach the execution device even though the block itself holds no tensors.
    add_hook_to_module(module, AlignDevicesHook(execution_device=execution_device), append=True)


def real_state_items(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` for every persistent tensor of ``model``, on the CPU and real: modules
    whose weights are offloaded are onloaded one at a time, so at most one module's offloaded
    weights are in memory at once. Keys follow ``model.state_dict()``; tied keys repeat."""
    owners: dict[str, nn.Module] = dict(model.named_modules(remove_duplicate=False))
    keys = list(model.state_dict(keep_vars=True))
    by_module: dict[str, list[str]] = {}
    for key in keys:
        by_module.setdefault(key.rpartition(".")[0], []).append(key)
    for module_name, module_keys in by_module.items():
        module = owners[module_name] if module_name else model
        hooks = _align_hooks(module)
        with _onloaded_direct(module, hooks):
            for key in module_keys:
                local = key.rpartition(".")[2]
                tensor = module._parameters.get(local)
                if tensor is None:
                    tensor = module._buffers[local]
                yield key, tensor.detach().to("cpu")


@contextlib.contextmanager
def _onloaded_direct(module: nn.Module, hooks: list) -> Iterator[None]:
    """One module's own offloaded tensors real (on the CPU) inside the ``with``."""
    changed = []
    try:
        for hook in hooks:
            device = hook.execution_device
            hook.execution_device = torch.device("cpu")
            hook.pre_forward(module)
            changed.append((hook, device))
        yield
    finally:
        for hook, device in reversed(changed):
            hook.post_forward(module, None)
            hook.execution_device = device


def copy_sharing_offload(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose accelerate hooks share the original's weight maps instead
    of copying them: with CPU offload one map holds every offloaded weight of the model, so a
    plain deep copy of an offloaded model would hold all of them twice. The maps are only read."""
    import copy

    memo: dict[int, object] = {}
    for m in module.modules():
        for hook in _align_hooks(m, offloading_only=False):
            for shared in (hook.weights_map, hook.tied_params_map):
                if shared is not None:
                    memo[id(shared)] = shared
    return copy.deepcopy(module, memo)


def in_memory_copy(module: nn.Module, device: str | torch.device | None = None) -> nn.Module:
    """A deep copy of ``module`` that holds its tensors itself, on ``device`` when given: for an
    offloaded module, call it inside :func:`onloaded` (the copy keeps the real tensors and drops
    accelerate's hooks, whose weight maps it shares: :func:`copy_sharing_offload`)."""
    from accelerate.hooks import remove_hook_from_module

    clone = copy_sharing_offload(module)
    remove_hook_from_module(clone, recurse=True)  # nothing to remove on a plain module
    return clone if device is None else clone.to(device)
