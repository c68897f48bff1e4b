"""lmms-eval bridge: score any model qe loads on lmms-eval's VLM benchmarks.

``QELMMs`` is an lmms-eval model ("simple" kind) that reads a quantized checkpoint written by
``qe quantize``, a ``tiny:<family>`` model, the embedded default or any local / hub model
:func:`qe.models.loading.load_model` reads. Prompts are built the way qe calibrates and
evaluates: the model family's adapter formats the prompt with its image placeholder
(:meth:`qe.models.base.ModelAdapter.format_prompt`) and the model's own processor turns
prompt and images into inputs.

Requests, in lmms-eval's "simple" form (``Instance.args``):

* ``loglikelihood``: ``(context, continuation | doc_to_target, doc_to_visual, doc_id, task,
  split)`` -> ``(sum of log p(continuation tokens), continuation is the greedy one)``;
* ``generate_until``: ``(context, generation_kwargs, doc_to_visual, doc_id, task, split)`` ->
  the text generated until a stop string of ``until`` (cut before it) or ``max_new_tokens``;
* ``generate_until_multi_round``: ``(context, generation_kwargs, doc_to_visual, doc_to_text,
  doc_id, task, split)`` -> the answers of each round, the task's ``doc_to_text`` giving the
  next round's images and text until it signals the end.

Register it for ``--model qe`` with :func:`register` (or run lmms-eval through this module:
``python -m qe.integrations.lmms_eval --model qe ...``); docs/lmms-eval.md has the recipe.
Requests run one at a time on one device (no data parallelism); images only (no video or
audio).
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qe.errors import ConfigError, DataError, QEError
from qe.integrations import LMMS_EVAL_MODEL_NAME

INSTALL_HINT = "pip install qe-quant[lmms]"

try:
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms as _LMMsBase
except ImportError as error:  # lmms-eval missing, or one of its own imports
    raise QEError(f"the lmms-eval bridge needs lmms-eval ({error.name or error} is missing): {INSTALL_HINT}") from None

log = logging.getLogger(__name__)

PROMPT_FORMATS = ("chat", "raw")


@dataclass(frozen=True)
class BridgeConfig:
    """The ``--model_args`` of ``--model qe`` (``key=value`` pairs, comma separated)."""

    pretrained: str = "default"  # checkpoint folder, tiny:<family>, local path or hub id; "default": embedded model
    device: str | None = None  # None: cuda when there is one, else cpu
    dtype: str = "float32"  # float32 | bfloat16 | float16; a qe checkpoint's float parts are cast after loading
    device_map: str | None = None  # e.g. "auto" to spread a large unquantized model over devices
    batch_size: int = 1  # accepted for lmms-eval; requests run one at a time
    max_new_tokens: int = 256  # when a task's generation_kwargs name none
    prompt_format: str = "chat"  # chat: the family adapter's prompt; raw: the task's text, image markers first
    max_rounds: int = 32  # safety stop for generate_until_multi_round
    progress: bool = True

    def __post_init__(self):
        if not str(self.pretrained).strip():
            raise ConfigError("--model qe needs pretrained=<checkpoint folder, tiny:<family> or model id>")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ConfigError(f"prompt_format={self.prompt_format!r}: use one of {', '.join(PROMPT_FORMATS)}")
        for name in ("batch_size", "max_new_tokens", "max_rounds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")


def _parse_flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false", "1", "0"):
        raise ValueError(value)
    return text in ("true", "1")


def _parse_count(value: Any) -> int:
    number = float(value)
    if number != int(number):
        raise ValueError(value)
    return int(number)


def _parse_batch_size(value: Any) -> int:
    """lmms-eval passes ``--batch_size`` as given: ``N``, ``auto`` or ``auto:N``."""
    text = str(value).strip().lower()
    if text.startswith("auto"):
        return 1
    return _parse_count(text)


# How each --model_args value (a string, number or bool after lmms-eval's parsing) becomes a field.
_TEXT, _COUNT = (str, "text"), (_parse_count, "a whole number")
_PARSERS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "pretrained": _TEXT, "device": _TEXT, "dtype": _TEXT, "device_map": _TEXT, "prompt_format": _TEXT,
    "batch_size": (_parse_batch_size, "a whole number or auto"), "max_new_tokens": _COUNT, "max_rounds": _COUNT,
    "progress": (_parse_flag, "true or false"),
}


def parse_model_args(model_args: dict[str, Any]) -> BridgeConfig:
    """``--model_args`` (already split into a dict) as a checked :class:`BridgeConfig`."""
    unknown = sorted(set(model_args) - set(_PARSERS))
    if unknown:
        raise ConfigError(f"unknown model_args for --model qe: {', '.join(unknown)}; known: {', '.join(_PARSERS)}")
    values = {}
    for name, value in model_args.items():
        if value is None:
            continue
        parse, expected = _PARSERS[name]
        try:
            values[name] = parse(value)
        except (TypeError, ValueError):
            raise ConfigError(f"model_args {name}={value!r}: give {expected}") from None
    return BridgeConfig(**values)


class QELMMs(_LMMsBase):
    """An lmms-eval model backed by a qe :class:`~qe.models.loading.LoadedModel`.

    ``QELMMs(pretrained="quantized/my-ckpt", device="cuda", dtype="bfloat16")`` loads a model;
    ``QELMMs(loaded=qe.load_quantized(...))`` wraps one already in memory (an in-memory
    quantized model too). lmms-eval builds it from ``--model_args`` through
    ``create_from_arg_string``, which passes ``batch_size``, ``max_batch_size`` and ``device``
    beside them.
    """

    is_simple = True

    def __init__(self, pretrained: str | None = None, *, loaded=None, max_batch_size: Any = None, **model_args: Any):
        super().__init__()
        if loaded is not None and pretrained is None:
            pretrained = loaded.name
        self.settings = parse_model_args({"pretrained": pretrained, **model_args})
        self.loaded = loaded if loaded is not None else self._load(self.settings)
        self.chat_template = None  # lmms-eval reads it; prompts are the adapter's
        self._forward_keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters

    # ------------------------------------------------------------------ loading
    @staticmethod
    def _load(settings: BridgeConfig):
        from qe.checkpoint import is_checkpoint
        from qe.models.loading import load_model, parse_dtype

        device = settings.device
        if device is None and settings.device_map is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device={device} but torch sees no CUDA device: pass device=cpu")
        dtype = parse_dtype(settings.dtype)
        loaded = load_model(settings.pretrained, dtype=dtype, device=device, device_map=settings.device_map)
        if is_checkpoint(settings.pretrained) and dtype != torch.float32:
            # A qe checkpoint loads in float32; packed codes are integers and stay as they are.
            loaded.model.to(dtype)
        return loaded

    # ------------------------------------------------------------------ what lmms-eval reads
    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    @property
    def processor(self):
        return self.loaded.processor

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def adapter(self):
        return self.loaded.adapter

    @property
    def device(self) -> torch.device:
        embeddings = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        if embeddings is not None and embeddings.weight.device.type != "meta":
            return embeddings.weight.device
        return next(p.device for p in self.model.parameters() if p.device.type != "meta")

    @property
    def batch_size(self) -> int:
        return self.settings.batch_size

    @property
    def eot_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    # ------------------------------------------------------------------ prompts and inputs
    @property
    def reads_images(self) -> bool:
        return getattr(self.processor, "image_processor", None) is not None

    def image_marker(self) -> str:
        """The text that stands for one image in this family's prompts."""
        return self.adapter._image_marker(self.processor)

    def format_prompt(self, context: str, n_images: int) -> str:
        """The prompt text for ``context`` with ``n_images`` images, ready for the processor.

        One image: the family adapter's own prompt. Other counts: the processor's chat
        template with that many image items, else the adapter's plain ``USER: ... ASSISTANT:``
        form. A context that already holds one marker per image keeps them where they are.
        """
        marker = self.image_marker()
        present = context.count(marker) if n_images else 0
        if present not in (0, n_images):
            raise DataError(
                f"the context holds {present} image markers {marker!r} but the request gives {n_images} images: "
                "give one marker per image, or none (qe then puts them before the text)"
            )
        missing = n_images - present
        if self.settings.prompt_format == "raw":
            return "".join(f"{marker}\n" for _ in range(missing)) + context
        if missing == 1:
            return self.adapter.format_prompt(self.processor, context)
        return self._chat_prompt(context, missing, marker)

    def _chat_prompt(self, text: str, n_images: int, marker: str) -> str:
        from jinja2 import TemplateError

        template = getattr(self.processor, "chat_template", None)
        if template:
            as_items = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
            # Processors' templates read content items; text-only tokenizers' templates often a string.
            contents = [as_items, text] if self.reads_images else [text, as_items]
            if n_images:
                contents = [as_items]
            for content in contents:
                try:
                    rendered = self.processor.apply_chat_template(
                        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
                    )
                except (TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError) as error:
                    log.debug("chat template cannot render %s content: %s", type(content).__name__, error)
                    continue
                if (
                    isinstance(rendered, str)
                    and text.strip() in rendered
                    and rendered.count(marker) == n_images + text.count(marker)
                ):
                    return rendered
        return "USER: " + "".join(f"{marker}\n" for _ in range(n_images)) + f"{text} ASSISTANT:"

    def encode_prompt(self, prompt: str, images: Sequence[Any]) -> dict[str, Any]:
        """Processor inputs (batch of one) for the prompt text and its images, on the model's device."""
        if images and not self.reads_images:
            raise DataError(f"model {self.loaded.name} reads no images, but the request gives {len(images)}")
        if images:
            inputs = self.processor(text=[prompt], images=list(images), return_tensors="pt",
                                    **self.adapter.processor_kwargs())
        else:
            call = self.processor.tokenizer if self.reads_images else self.processor
            inputs = call([prompt], return_tensors="pt")
        inputs = dict(inputs)
        if inputs["input_ids"].shape[1] == 0:
            # Nothing to condition on (raw format, empty context): start from the sequence start token.
            start = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eot_token_id
            inputs = {"input_ids": torch.tensor([[start]]), "attention_mask": torch.ones((1, 1), dtype=torch.long)}
        return self._to_device(inputs)

    def _to_device(self, inputs: dict[str, Any]) -> dict[str, Any]:
        device, dtype = self.device, next(self.model.parameters()).dtype
        out = {}
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor):
                value = value.to(device, dtype) if value.is_floating_point() else value.to(device)
            out[key] = value
        return out

    def _doc(self, doc_id, task, split):
        try:
            return self.task_dict[task][split][doc_id]
        except (KeyError, IndexError, TypeError):
            raise DataError(
                f"no document {doc_id!r} of task {task!r} split {split!r} in the model's task_dict: lmms-eval's "
                "evaluator fills it; a hand-made request needs model.task_dict[task][split][doc_id] = doc"
            ) from None

    def _visuals(self, doc_to_visual: Callable | None, doc_id, task, split) -> list:
        """The request's images (RGB PIL), from the task's document."""
        if doc_to_visual is None:
            return []
        return self._images(doc_to_visual(self._doc(doc_id, task, split)), f"task {task} document {doc_id}")

    @staticmethod
    def _images(visuals, where: str) -> list:
        from PIL import Image

        from qe.data.images import to_rgb

        flat: list = []
        stack = list(visuals or []) if isinstance(visuals, (list, tuple)) else [visuals]
        for item in stack:
            if isinstance(item, (list, tuple)):
                flat.extend(QELMMs._images(item, where))
            elif isinstance(item, Image.Image):
                flat.append(to_rgb(item))
            elif item is not None:
                raise DataError(
                    f"{where} gives a {type(item).__name__} visual: the qe bridge reads images (PIL) only, "
                    "not video or audio; pick an image task"
                )
        return flat

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def continuation_logprob(self, context: str, continuation: str, images: Sequence[Any] = ()) -> tuple[float, bool]:
        """(sum of log p(continuation tokens | prompt, images), every token is the argmax)."""
        prompt = self.encode_prompt(self.format_prompt(context, len(images)), images)
        target = self.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        if target.numel() == 0:
            return 0.0, True
        target = target.to(self.device)
        n_prompt, n_target = prompt["input_ids"].shape[1], target.numel()
        inputs = _append_tokens(prompt, target)
        extra = {"logits_to_keep": n_target + 1} if self._forward_keeps_logits else {}
        logits = self.model(**inputs, use_cache=False, **extra).logits[0]  # (kept positions, V)
        # Position t predicts token t + 1: the continuation's predictors are the positions
        # n_prompt - 1 .. T - 2, i.e. the last n_target + 1 positions less the final one.
        logits = logits[-(n_target + 1):-1].float()  # (n_target, V)
        logprobs = torch.log_softmax(logits, dim=-1)
        total = logprobs.gather(-1, target[:, None]).sum()
        greedy = bool((logits.argmax(-1) == target).all())
        assert logits.shape[0] == n_target and n_prompt >= 1
        return float(total), greedy

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        results = []
        for request in self._progress(requests, "qe loglikelihood"):
            args = request.args
            if len(args) == 2:  # unconditional choice scores (acc_mutual_info): no document, no image
                context, continuation, images = args[0], args[1], []
            else:
                context, target, doc_to_visual, doc_id, task, split = args
                if isinstance(target, str):
                    continuation = target
                else:
                    continuation = target(self._doc(doc_id, task, split))
                images = self._visuals(doc_to_visual, doc_id, task, split)
            result = self.continuation_logprob(context, continuation, images)
            results.append(result)
            self.cache_hook.add_partial("loglikelihood", (context, continuation), result)
        return results

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, context: str, images: Sequence[Any] = (), generation_kwargs: dict | None = None) -> str:
        """Generate for one prompt: greedy unless the task asks for sampling, cut before the
        first stop string of ``until``."""
        kwargs = dict(generation_kwargs or {})
        until = kwargs.pop("until", None)
        stops = [until] if isinstance(until, str) else [s for s in (until or []) if s]
        max_new_tokens = int(kwargs.pop("max_new_tokens", None) or self.settings.max_new_tokens)
        temperature = float(kwargs.pop("temperature", 0) or 0)
        kwargs.pop("do_sample", None)  # lmms-eval's convention: temperature 0 means greedy
        do_sample = temperature > 0
        top_p = kwargs.pop("top_p", None)
        num_beams = int(kwargs.pop("num_beams", 1) or 1)
        if kwargs:
            log.debug("qe lmms-eval bridge ignores generation kwargs %s", ", ".join(sorted(kwargs)))
        inputs = self.encode_prompt(self.format_prompt(context, len(images)), images)
        n_prompt = inputs["input_ids"].shape[1]
        options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "num_beams": num_beams}
        if do_sample:
            options["temperature"] = temperature
            if top_p is not None:
                options["top_p"] = float(top_p)
        if stops:
            options.update(stop_strings=stops, tokenizer=self.tokenizer)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        output = self.model.generate(**inputs, pad_token_id=pad, **options)
        text = self.tokenizer.decode(output[0, n_prompt:], skip_special_tokens=True)
        return cut_at_stop(text, stops)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        results = []
        for request in self._progress(requests, "qe generate_until"):
            context, generation_kwargs, doc_to_visual, doc_id, task, split = request.args
            images = self._visuals(doc_to_visual, doc_id, task, split)
            text = self.generate(context, images, generation_kwargs)
            results.append(text)
            self.cache_hook.add_partial("generate_until", (context, generation_kwargs), text)
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Rounds follow lmms-eval's protocol: after each answer the task's ``doc_to_text(doc,
        previous_output=..., round_idx=k, previous_round_info=...)`` returns ``(images, text,
        done, answers so far, round info)``."""
        results = []
        for request in self._progress(requests, "qe generate_until_multi_round"):
            context, generation_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            kwargs = {k: v for k, v in dict(generation_kwargs or {}).items() if k != "until"}
            doc = self._doc(doc_id, task, split)
            images = self._visuals(doc_to_visual, doc_id, task, split)
            answers: list[str] = []
            info = None
            for round_idx in range(self.settings.max_rounds):
                if round_idx > 0:
                    visuals, context, done, answers, info = doc_to_text(
                        doc, previous_output=list(answers), round_idx=round_idx, previous_round_info=info
                    )
                    answers = list(answers)
                    if done:
                        break
                    images = self._images(visuals, f"task {task} document {doc_id} round {round_idx}")
                answers.append(self.generate(context, images, kwargs))
            else:
                log.warning("task %s document %s: stopped after max_rounds=%d rounds",
                            task, doc_id, self.settings.max_rounds)
            results.append(answers)
            self.cache_hook.add_partial("generate_until_multi_round", (context, generation_kwargs), answers)
        return results

    def _progress(self, requests, desc: str):
        if not self.settings.progress or len(requests) < 2:
            return requests
        from tqdm import tqdm

        return tqdm(requests, desc=desc, disable=self.rank != 0)


def _append_tokens(inputs: dict[str, Any], tokens: torch.Tensor) -> dict[str, Any]:
    """The prompt inputs with ``tokens`` (1-D) appended as text tokens after the prompt."""
    ids = inputs["input_ids"]
    n_prompt, n_new = ids.shape[1], tokens.numel()
    out = dict(inputs)
    for key, value in inputs.items():
        if not (isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == (1, n_prompt)):
            continue
        if key == "input_ids":
            out[key] = torch.cat([value, tokens.to(value)[None]], 1)
        elif key == "attention_mask":
            out[key] = torch.cat([value, torch.ones((1, n_new), dtype=value.dtype, device=value.device)], 1)
        else:  # token-type ids (e.g. Qwen-VL's mm_token_type_ids): appended tokens are text (0)
            out[key] = torch.cat([value, torch.zeros((1, n_new), dtype=value.dtype, device=value.device)], 1)
    return out


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for stop in stops:
        at = text.find(stop)
        if 0 <= at < cut:
            cut = at
    return text[:cut]


# ---------------------------------------------------------------------- registration
def register() -> type[QELMMs]:
    """Make ``--model qe`` name :class:`QELMMs` in this process's lmms-eval registries."""
    from qe.integrations import lmms_eval_models

    try:  # lmms-eval 0.5+: the manifest registry that evaluator.get_model reads
        from lmms_eval import models

        registry = getattr(models, "MODEL_REGISTRY_V2", None)
        if registry is not None:
            registry.register_manifest(lmms_eval_models(), overwrite=True)
            available = getattr(models, "AVAILABLE_MODELS", None)
            if isinstance(available, dict):
                available[LMMS_EVAL_MODEL_NAME] = QELMMs.__name__
    except ImportError as error:
        raise QEError(f"lmms-eval's model registry cannot be imported ({error}): {INSTALL_HINT}") from None
    try:  # the decorator registry of older releases (still present, harmless where unused)
        from lmms_eval.api.registry import register_model

        register_model(LMMS_EVAL_MODEL_NAME)(QELMMs)
    except ImportError:
        pass
    return QELMMs


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m qe.integrations.lmms_eval <lmms-eval arguments>``: lmms-eval with ``--model qe``."""
    register()
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        from lmms_eval.cli.dispatch import main as lmms_eval_main
    except ImportError:  # releases before the subcommand dispatcher
        from lmms_eval.__main__ import cli_evaluate as lmms_eval_main
    lmms_eval_main()


if __name__ == "__main__":
    # Run as a script, this file is `__main__`; register the importable module's class instead.
    from qe.integrations.lmms_eval import main as _main

    _main()
