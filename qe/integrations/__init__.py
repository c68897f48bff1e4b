"""Bridges from qe models to other projects' evaluation harnesses.

Each bridge lives in its own module and imports its harness only when that module is
imported, so ``import qe`` never needs them:

* :mod:`qe.integrations.lmms_eval`: lmms-eval (``--model qe``), ``pip install qe-quant[lmms]``.
"""

from __future__ import annotations

LMMS_EVAL_MODEL_NAME = "qe"
LMMS_EVAL_CLASS_PATH = "qe.integrations.lmms_eval.QELMMs"


def lmms_eval_models():
    """The model manifest lmms-eval (0.5+) reads from the ``lmms_eval.models`` entry-point group.

    Kept here, away from the bridge module, so that lmms-eval can read it while its own model
    registry is still being built: it names the class by path and imports nothing of qe's.
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=LMMS_EVAL_MODEL_NAME, simple_class_path=LMMS_EVAL_CLASS_PATH)
