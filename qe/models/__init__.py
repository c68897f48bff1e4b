"""Model loading and adapters."""

from qe.modality import MODALITIES, Modality
from qe.models.base import EncodedSample, ModelAdapter, SmoothingGroup
from qe.models.loading import LoadedModel, load_model

__all__ = ["EncodedSample", "Modality", "MODALITIES", "ModelAdapter", "SmoothingGroup", "LoadedModel", "load_model"]
