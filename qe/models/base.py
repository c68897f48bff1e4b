"""Model adapters: how qe reads a VLM's language model, block by block.

An adapter answers, for one model family: where the language model's decoder blocks are,
which linears each block has and which share an input (smoothing groups, with the norm
before them where there is one), and how a calibration sample becomes model inputs with a
per-token modality mask (vision / text prompt / answer).

All transformers 5.x VLM families this project supports keep a Llama-style decoder
(``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, ``input_layernorm``,
``post_attention_layernorm``) under different parents, so :class:`ModelAdapter` implements
that layout once and a family adapter names its parent module, its image token and its
prompt format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from qe.data.images import sample_image
from qe.data.samples import Sample
from qe.errors import DataError, ModelError
from qe.modality import MODALITIES, Modality
from qe.plugins import Plugin


@dataclass
class SmoothingGroup:
    """Linears that read the same input; ``norm`` is the module producing it, if foldable."""

    linears: list[str]  # names relative to the block, e.g. "self_attn.q_proj"
    norm: str | None = None  # name relative to the block, e.g. "input_layernorm"


@dataclass
class EncodedSample:
    """Model inputs for one sample (batch dimension 1) and its per-token modality."""

    inputs: dict[str, Any]
    modality: torch.Tensor  # (T,) int8, values of Modality
    origin: str = ""

    @property
    def num_tokens(self) -> int:
        return int(self.modality.numel())

    def modality_counts(self) -> dict[str, int]:
        return {name: int((self.modality == m).sum()) for name, m in zip(MODALITIES, Modality)}


LLAMA_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


class ModelAdapter(Plugin):
    """Base adapter for a Llama-style decoder behind a vision tower.

    Subclasses set ``model_types`` (``config.model_type`` values they serve) and
    ``language_model_path`` (attribute path from the top-level model to the module that owns
    ``layers``); override what differs.
    """

    kind: ClassVar[str] = "model_adapter"
    name: ClassVar[str]
    priority: ClassVar[int] = 10
    model_types: ClassVar[tuple[str, ...]] = ()
    language_model_path: ClassVar[str] = "model.language_model"
    blocks_attr: ClassVar[str] = "layers"
    image_placeholder: ClassVar[str] = "<image>"
    # The language model passes each decoder block its own keyword arguments (e.g. Gemma 3's
    # sliding-window and global layers get their own masks and rotary embeddings), so capture
    # keeps every block's arguments.
    kwargs_differ_by_block: ClassVar[bool] = False
    # Which stack of the model the adapter's blocks are: the language model here; the vision
    # tower or the projector for the stack adapters of --scope vision|all (qe.models.stacks).
    stack: ClassVar[str] = "language"
    # A decoder block's attention module: a quantized KV cache (KV<bits> in the setting) wraps it.
    attention_name: ClassVar[str] = "self_attn"
    # The norms whose outputs the attention and the MLP read (smoothing folds into them).
    attention_input_norm: ClassVar[str] = "input_layernorm"
    mlp_input_norm: ClassVar[str] = "post_attention_layernorm"
    # Where the vision tower's ModuleList of encoder blocks and the projector after it may be
    # (attribute paths from the top-level model; the first that exists is read), for
    # ``--scope vision|all`` (:mod:`qe.models.stacks`). Empty: the scope refuses the model.
    vision_blocks_paths: ClassVar[tuple[str, ...]] = ()
    projector_paths: ClassVar[tuple[str, ...]] = ()
    # What a rotation of the residual stream (the ``rotate`` transform) needs to know beyond the
    # blocks: the block linears that write into the residual stream (their outputs are rotated),
    # the norm before the LM head, and, for VLMs, where vision features enter the residual stream:
    # linears (fnmatch patterns of full names) whose outputs become language-model embeddings,
    # and parameters that are such embeddings themselves (LLaVA-OneVision's image newline).
    residual_output_linears: ClassVar[tuple[str, ...]] = ("self_attn.o_proj", "mlp.down_proj")
    final_norm_name: ClassVar[str] = "norm"
    vision_output_linears: ClassVar[tuple[str, ...]] = ()
    vision_output_vectors: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------------ recognition
    @classmethod
    def load_processor(cls, path: str, config=None):
        """The checkpoint's processor where the family needs its own loader (e.g. an image-only
        processor without torchvision), or None to let ``AutoProcessor`` load it."""
        return None

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return getattr(getattr(model, "config", None), "model_type", None) in cls.model_types

    # ------------------------------------------------------------------ structure
    def language_model(self, model: nn.Module) -> nn.Module:
        try:
            return model.get_submodule(self.language_model_path)
        except AttributeError:
            raise ModelError(
                f"{type(model).__name__}: adapter {self.name!r} looked for the language model at "
                f"{self.language_model_path!r} and found nothing"
            ) from None

    def blocks_prefix(self, model: nn.Module) -> str:
        return f"{self.language_model_path}.{self.blocks_attr}"

    def block_prefix(self, model: nn.Module, index: int) -> str:
        """The full name of block ``index`` (``model.language_model.layers.3``)."""
        return f"{self.blocks_prefix(model)}.{index}"

    def decoder_blocks(self, model: nn.Module) -> nn.ModuleList:
        blocks = getattr(self.language_model(model), self.blocks_attr, None)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise ModelError(f"{type(model).__name__}: no decoder blocks at {self.blocks_prefix(model)!r}")
        return blocks

    def prepare_model(self, model: nn.Module) -> None:
        """Restructure a freshly built model before qe reads it, the same way whether it was
        loaded for quantizing or rebuilt (on the meta device) from a checkpoint: fused
        mixture-of-experts modules become one set of linears per expert
        (:func:`qe.models.moe.unfuse_experts`)."""
        from qe.models.moe import unfuse_experts

        unfuse_experts(model)

    def block_linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        """The quantizable linears of one decoder block, by name relative to the block: the
        Llama layout's, and each routed expert's ``gate/up/down_proj`` in a sparse block."""
        from qe.models.moe import expert_linears

        out = {}
        for name in LLAMA_LINEARS:
            try:
                mod = block.get_submodule(name)
            except AttributeError:
                continue
            if isinstance(mod, nn.Linear):
                out[name] = mod
        out.update(expert_linears(block))
        if not out:
            raise ModelError(f"block {type(block).__name__} has none of the linears {', '.join(LLAMA_LINEARS)}")
        return out

    def block_attention(self, block: nn.Module, prefix: str) -> nn.Module:
        """The attention module of one decoder block (``attention_name``), whose KV cache a
        ``KV<bits>`` setting quantizes; one line naming the block (``prefix``) when it has none."""
        try:
            return block.get_submodule(self.attention_name)
        except AttributeError:
            raise ModelError(f"{prefix} has no attention module at {self.attention_name!r} (model adapter "
                             f"{self.name!r}), so its KV cache cannot be quantized: drop KV<bits> from the setting") from None

    def smoothing_groups(self, block: nn.Module) -> list[SmoothingGroup]:
        """Linears sharing one input, with the norm to fold smoothing scales into."""
        have = self.block_linears(block)
        groups = [
            SmoothingGroup(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], self.attention_input_norm),
            SmoothingGroup(["self_attn.o_proj"], None),
            SmoothingGroup(["mlp.gate_proj", "mlp.up_proj"], self.mlp_input_norm),
            SmoothingGroup(["mlp.down_proj"], None),
        ]
        out = []
        for g in groups:
            linears = [n for n in g.linears if n in have]
            if not linears:
                continue
            norm = g.norm if g.norm and _has_submodule(block, g.norm) else None
            out.append(SmoothingGroup(linears, norm))
        # A routed expert's gate/up read the MLP norm's output, which the router and the other
        # experts read too: its smoothing stays an explicit input scale, never folded.
        experts = sorted({n.rsplit(".", 1)[0] for n in have if n.endswith((".gate_proj", ".up_proj", ".down_proj"))
                          and n not in LLAMA_LINEARS}, key=_natural)
        for e in experts:
            pair = [f"{e}.{p}" for p in ("gate_proj", "up_proj") if f"{e}.{p}" in have]
            if pair:
                out.append(SmoothingGroup(pair, None))
            if f"{e}.down_proj" in have:
                out.append(SmoothingGroup([f"{e}.down_proj"], None))
        return out

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm the language model applies before its LM head."""
        try:
            return self.language_model(model).get_submodule(self.final_norm_name)
        except AttributeError:
            raise ModelError(f"{type(model).__name__}: no final norm at {self.language_model_path}.{self.final_norm_name}") from None

    def residual_rotation_issue(self, model: nn.Module) -> str | None:
        """Why the residual stream of this model cannot be rotated offline (a norm between a
        linear and the residual, vision features entering where the adapter does not say),
        or None. The ``rotate`` transform then only rotates inside the blocks (online)."""
        from qe.models.moe import RoutedExperts

        if any(isinstance(m, RoutedExperts) for m in model.modules()):
            return ("its decoder routes tokens to experts, whose down_proj outputs and router the rotation does not "
                    "cover yet")
        if self.image_token_id(model) is not None and not self.vision_output_modules(model):
            return (f"adapter {self.name!r} does not name where vision features enter the residual stream "
                    "(vision_output_linears)")
        return None

    def vision_output_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """The linears and embedding vectors through which vision features enter the residual
        stream, by full name (see :attr:`vision_output_linears`)."""
        import fnmatch

        out: dict[str, nn.Module] = {}
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and any(fnmatch.fnmatchcase(name, p) for p in self.vision_output_linears):
                out[name] = module
        return out

    def blockwise_issue(self, model: nn.Module) -> str | None:
        """Why this model cannot be run block by block from captured inputs, or None."""
        return None

    def between_blocks_inputs(self, language_model_kwargs: dict[str, Any]) -> dict[str, Any]:
        """What the language model adds to the hidden states between decoder blocks, taken from
        the keyword arguments of its call (captured with each calibration batch); none by default."""
        return {}

    def after_block(self, index: int, hidden: torch.Tensor, between: dict[str, Any]) -> torch.Tensor:
        """The next block's input from block ``index``'s output ``hidden`` ``(B, T, d)``: the
        output itself unless the model adds something between blocks (see
        :meth:`between_blocks_inputs`)."""
        return hidden

    def capture_modality(self, modality: torch.Tensor, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """The per-token modality of a captured batch of first-block inputs (``hidden`` and the
        block's keyword arguments), from the batch's samples' modality masks (the language
        model: those masks themselves)."""
        return modality

    def calibration_samples(self, encoded: list[EncodedSample]) -> list[EncodedSample]:
        """The calibration samples that reach this adapter's blocks (all, for the language model)."""
        return encoded

    def image_token_id(self, model: nn.Module) -> int | None:
        cfg = model.config
        for attr in ("image_token_id", "image_token_index"):
            value = getattr(cfg, attr, None)
            if value is not None:
                return int(value)
        return None

    # ------------------------------------------------------------------ data
    def format_prompt(self, processor, prompt: str) -> str:
        """The prompt text (with the image placeholder) that precedes the answer."""
        template = getattr(processor, "chat_template", None)
        if template:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            try:
                text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception:  # a template that cannot render image items: plain format
                text = ""
            if self._image_marker(processor) in text:
                return text
        return f"USER: {self._image_marker(processor)}\n{prompt} ASSISTANT:"

    def _image_marker(self, processor) -> str:
        return getattr(processor, "image_token", None) or self.image_placeholder

    def processor_kwargs(self) -> dict[str, Any]:
        return {}

    def encode(self, processor, sample: Sample, default_prompt: str, model: nn.Module | None = None) -> EncodedSample:
        """Turn a sample into model inputs and a modality mask.

        Image samples: prompt with image (processor) then the answer tokens appended, so the
        answer span is known exactly. Text samples: all tokens are ``TEXT``.
        """
        tokenizer = getattr(processor, "tokenizer", processor)
        if sample.token_ids is not None:
            ids = torch.tensor([list(sample.token_ids)], dtype=torch.long)
            return EncodedSample(
                {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                torch.full((ids.shape[1],), int(Modality.TEXT), dtype=torch.int8),
                sample.origin,
            )
        if not sample.has_image:
            ids = tokenizer(sample.text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            if ids.shape[1] == 0:
                raise DataError(f"{sample.origin}: text gives no tokens")
            return EncodedSample(
                {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                torch.full((ids.shape[1],), int(Modality.TEXT), dtype=torch.int8),
                sample.origin,
            )
        image = sample_image(sample)
        prompt_text = self.format_prompt(processor, sample.prompt or default_prompt)
        inputs = dict(processor(text=[prompt_text], images=[image], return_tensors="pt", **self.processor_kwargs()))
        answer = tokenizer(" " + sample.text.strip(), add_special_tokens=False, return_tensors="pt")["input_ids"]
        n_prompt = inputs["input_ids"].shape[1]
        n_answer = answer.shape[1]
        for key, value in list(inputs.items()):
            if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == (1, n_prompt):
                if key == "input_ids":
                    inputs[key] = torch.cat([value, answer.to(value.dtype)], 1)
                elif key == "attention_mask":
                    inputs[key] = torch.cat([value, torch.ones((1, n_answer), dtype=value.dtype)], 1)
                else:  # token type ids: answer tokens are text (0)
                    inputs[key] = torch.cat([value, torch.zeros((1, n_answer), dtype=value.dtype)], 1)
        modality = torch.full((n_prompt + n_answer,), int(Modality.TEXT), dtype=torch.int8)
        image_id = self.image_token_id(model) if model is not None else None
        if image_id is None:
            image_id = tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", self.image_placeholder))
        modality[:n_prompt][inputs["input_ids"][0, :n_prompt] == image_id] = int(Modality.VISION)
        modality[n_prompt:] = int(Modality.ANSWER)
        if not bool((modality == int(Modality.VISION)).any()):
            raise DataError(f"{sample.origin}: the processor produced no image tokens (id {image_id}) for this image")
        return EncodedSample(inputs, modality, sample.origin)


def _natural(name: str) -> list:
    """Sort key putting ``experts.2`` before ``experts.10``."""
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _has_submodule(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
        return True
    except AttributeError:
        return False
