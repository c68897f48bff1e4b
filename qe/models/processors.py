"""Image-only processors: the stock processors of some VLM families build a torchvision video
processor, which cannot be installed beside every torch; these subclasses leave it out."""

from __future__ import annotations

from functools import cache

from qe.errors import ModelError

# The image-sequence-length parameter each processor takes, where it has one.
_SEQ_PARAM = {"InternVLProcessor": "image_seq_length", "SmolVLMProcessor": "image_seq_len",
              "LlavaOnevisionProcessor": "num_image_tokens"}


def _image_only(processor_cls: type) -> type:
    """``processor_cls`` without a video processor (images only; no torchvision needed).

    transformers derives a processor's parts from its ``__init__`` signature (and the
    parameters ``from_pretrained`` passes on from its code object), so the subclass leaves
    ``video_processor`` out of the signature, hands ``None`` to the parent, and names the
    parent's other parameters explicitly.
    """
    seq_param = _SEQ_PARAM.get(processor_cls.__name__)
    if seq_param == "image_seq_length":

        class ImageOnly(processor_cls):
            def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256,
                         chat_template=None, **kwargs):
                kwargs.pop("video_processor", None)
                super().__init__(image_processor, tokenizer, None, image_seq_length=image_seq_length,
                                 chat_template=chat_template, **kwargs)
    elif seq_param == "image_seq_len":

        class ImageOnly(processor_cls):
            def __init__(self, image_processor=None, tokenizer=None, image_seq_len: int = 169,
                         chat_template=None, **kwargs):
                kwargs.pop("video_processor", None)
                super().__init__(image_processor, tokenizer, None, image_seq_len=image_seq_len,
                                 chat_template=chat_template, **kwargs)
    elif seq_param == "num_image_tokens":

        class ImageOnly(processor_cls):
            def __init__(self, image_processor=None, tokenizer=None, num_image_tokens: int | None = None,
                         vision_feature_select_strategy: str | None = None, chat_template=None, **kwargs):
                kwargs.pop("video_processor", None)
                super().__init__(image_processor, tokenizer, None, num_image_tokens=num_image_tokens,
                                 vision_feature_select_strategy=vision_feature_select_strategy,
                                 chat_template=chat_template, **kwargs)
    else:

        class ImageOnly(processor_cls):
            def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
                kwargs.pop("video_processor", None)
                super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    ImageOnly.__name__ = ImageOnly.__qualname__ = f"ImageOnly{processor_cls.__name__}"
    ImageOnly.__module__ = __name__
    ImageOnly.__doc__ = f"{processor_cls.__name__} without a video processor (images only; no torchvision)."
    return ImageOnly


# Processors whose stock class builds a torchvision video processor, by model type.
VIDEO_PROCESSOR_FAMILIES = {
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "qwen3_vl": "Qwen3VLProcessor",
    "qwen3_vl_moe": "Qwen3VLProcessor",
    "internvl": "InternVLProcessor",
    "smolvlm": "SmolVLMProcessor",
    "llava_onevision": "LlavaOnevisionProcessor",
}


@cache
def image_only_processor_class(model_type: str) -> type:
    import transformers

    if model_type not in VIDEO_PROCESSOR_FAMILIES:
        raise ModelError(f"no image-only processor for model type {model_type!r}")
    return _image_only(getattr(transformers, VIDEO_PROCESSOR_FAMILIES[model_type]))


@cache
def pixtral_processor_class() -> type:
    """Pixtral's processor (Mistral 3) on the PIL image processor.

    transformers' ``PixtralProcessor`` is declared to need torchvision (its module imports the
    torchvision image processor for one resize helper), though with the PIL image processor
    it needs none: this class repeats its few lines. Each image becomes rows of ``[IMG]``
    tokens (one per merged patch), each row ended by ``[IMG_BREAK]``, the last by ``[IMG_END]``.
    """
    from transformers.processing_utils import ProcessorMixin

    class PixtralImageOnlyProcessor(ProcessorMixin):
        text_kwargs = {"return_tensors": "pt"}
        images_kwargs = {"return_tensors": "pt"}

        def __init__(self, image_processor=None, tokenizer=None, patch_size: int = 16, spatial_merge_size: int = 1,
                     chat_template=None, image_token="[IMG]", image_break_token="[IMG_BREAK]",
                     image_end_token="[IMG_END]", **kwargs):
            super().__init__(image_processor, tokenizer, chat_template=chat_template)
            self.patch_size, self.spatial_merge_size = patch_size, spatial_merge_size
            self.image_token, self.image_break_token, self.image_end_token = image_token, image_break_token, image_end_token
            self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)

        def _process_images(self, images, **images_kwargs):
            images_kwargs["patch_size"] = self.patch_size * self.spatial_merge_size
            return super()._process_images(images, **images_kwargs)

        def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
            patch = self.patch_size * self.spatial_merge_size
            height, width = image_inputs["image_sizes"][image_idx]
            row = [self.image_token] * (int(width) // patch) + [self.image_break_token]
            tokens = row * (int(height) // patch)
            tokens[-1] = self.image_end_token
            return "".join(tokens)

        @property
        def model_input_names(self):
            return self.tokenizer.model_input_names + self.image_processor.model_input_names + ["image_sizes"]

    PixtralImageOnlyProcessor.__module__ = __name__
    return PixtralImageOnlyProcessor
