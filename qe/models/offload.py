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
from collections.abc import Iterator

import torch
from torch import nn


def _align_hooks(module: nn.Module) -> list:
    """The accelerate AlignDevicesHooks attached directly to ``module`` that offload weights."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    try:
        from accelerate.hooks import AlignDevicesHook, SequentialHook
    except ImportError:  # accelerate absent: nothing can be offloaded
        return []
    hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
    return [h for h in hooks if isinstance(h, AlignDevicesHook) and h.offload]


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
