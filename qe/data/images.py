"""The built-in offline image-caption set and image loading.

Images come from sample data that ships inside installed packages (scikit-image,
scikit-learn, matplotlib); captions live in ``image_captions.json`` beside this module.
"""

from __future__ import annotations

import importlib.util
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

from qe.data.samples import Sample
from qe.errors import DataError

CAPTIONS_FILE = "image_captions.json"


@lru_cache(maxsize=1)
def _catalog() -> dict:
    return json.loads(resources.files("qe.data").joinpath(CAPTIONS_FILE).read_text())


def default_prompt() -> str:
    return _catalog()["prompt"]


def builtin_image_captions(split: str | None = None) -> list[Sample]:
    """All (image, caption) pairs, or those of one split (``calib`` or ``eval``).

    Calibration and held-out pairs never share an image. Pairs are ordered so that the first
    n samples cover n different images before any image repeats.
    """
    if split not in (None, "calib", "eval"):
        raise ValueError(f"split must be calib or eval, not {split!r}")
    entries = [e for e in _catalog()["images"] if split is None or e["split"] == split]
    n_caps = max(len(e["captions"]) for e in entries)
    out = []
    for c in range(n_caps):
        for e in entries:
            if c < len(e["captions"]):
                out.append(Sample(text=e["captions"][c], image=e["source"], origin=f"builtin:{e['id']}#{c}"))
    return out


def _load_reference(ref: str):
    from PIL import Image

    kind, _, name = ref.partition(":")
    if kind == "skimage":
        try:
            import skimage.data
        except ImportError:
            raise DataError(
                "built-in images need scikit-image (a dependency of qe): `pip install scikit-image`"
            ) from None
        array = getattr(skimage.data, name)()
        if array.dtype == bool:
            array = array.astype("uint8") * 255
        return Image.fromarray(array)
    if kind == "sklearn":
        # Read the JPEG that ships inside scikit-learn directly: importing sklearn takes seconds.
        spec = importlib.util.find_spec("sklearn")
        if spec is None or not spec.submodule_search_locations:
            raise DataError("built-in images need scikit-learn: `pip install scikit-learn`")
        path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "images" / name
        if not path.is_file():
            raise DataError(f"scikit-learn sample image {name} is missing at {path}: reinstall scikit-learn")
        return Image.open(path)
    if kind == "matplotlib":
        import matplotlib

        return Image.open(Path(matplotlib.get_data_path()) / "sample_data" / name)
    raise DataError(f"unknown built-in image reference {ref!r}")


def sample_image(sample: Sample):
    """The image of a sample, as RGB."""
    if sample.image is None:
        raise DataError(f"sample {sample.origin or sample.text[:30]!r} has no image")
    return load_image(sample.image, origin=sample.origin)


def load_image(ref: str, origin: str = ""):
    """Open an image (path or built-in reference) as RGB; name the record on failure."""
    from PIL import Image, UnidentifiedImageError

    where = f" ({origin})" if origin else ""
    if ":" in ref and ref.split(":", 1)[0] in ("skimage", "sklearn", "matplotlib"):
        image = _load_reference(ref)
    else:
        path = Path(ref)
        if not path.is_file():
            raise DataError(f"image file {ref} not found{where}: fix the path (relative paths are resolved against the JSONL file's folder)")
        try:
            image = Image.open(path)
            image.load()
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"cannot read image {ref}{where}: {e.__class__.__name__}; replace or remove the record") from None
    return to_rgb(image)


def to_rgb(image):
    """RGB copy of a PIL image; transparent parts are laid over white (as viewers show them)."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
