"""Model loading and adapters."""

from qe.models.base import EncodedSample, Modality, MODALITIES, ModelAdapter, SmoothingGroup
from qe.models.loading import LoadedModel, load_model

__all__ = ["EncodedSample", "Modality", "MODALITIES", "ModelAdapter", "SmoothingGroup", "LoadedModel", "load_model"]
