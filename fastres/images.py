"""Images in, top classes out: file expansion, decoding, keras.applications preprocessing, and a
pipelined reader that decodes ahead of the engine in a small thread pool (Pillow releases the GIL while
it decodes and resizes), so a folder of JPEGs is classified at the engine's speed.

``fastres predict`` runs :func:`classify` in-process; :mod:`fastres.distributed` runs the same function on
each batch on its workers, so both give the same records.  Needs Pillow (``pip install 'fastres[images]'``).
"""
import glob
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .errors import FastresError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
PREPROCESS_MODES = ("caffe", "tf", "torch", "unit", "none")
CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)
TORCH_MEAN, TORCH_STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
NO_MATCH = "no file matches this pattern"


def expand(patterns):
    """Image paths from files, directories (sorted, not recursive) and glob patterns, in the order given.

    A glob pattern that matches nothing is yielded as it is, and reads as an error (:data:`NO_MATCH`).
    """
    for pattern in map(os.fspath, patterns):
        if os.path.isdir(pattern):
            for name in sorted(os.listdir(pattern)):
                if name.lower().endswith(IMAGE_SUFFIXES):
                    yield os.path.join(pattern, name)
        elif any(ch in pattern for ch in "*?[") and not os.path.exists(pattern):
            yield from sorted(glob.glob(pattern)) or [pattern]
        else:
            yield pattern


def preprocess(images, mode):
    """keras.applications preprocessing of RGB images (N, H, W, 3) in 0..255.

    Parameters
    ----------
    images : ndarray
        (N, H, W, 3), any real dtype.
    mode : {"caffe", "tf", "torch", "unit", "none"}
        caffe: RGB->BGR minus the ImageNet mean (ResNet50's); tf: [-1, 1]; torch: ImageNet mean/std;
        unit: [0, 1]; none: unchanged.

    Returns
    -------
    ndarray
        float32, the same shape.
    """
    x = images.astype(np.float32)
    if mode == "caffe":
        return x[..., ::-1] - CAFFE_MEAN_BGR
    if mode == "tf":
        return x / 127.5 - 1.0
    if mode == "torch":
        return (x / 255.0 - TORCH_MEAN) / TORCH_STD
    if mode == "unit":
        return x / 255.0
    return x


def read_image(path, size):
    """Decode ``path`` as RGB resized (bilinear) to ``size`` (H, W).

    Returns
    -------
    (ndarray or None, str or None)
        The uint8 (H, W, 3) image and None, or None and why the file could not be read.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8), None
    except FileNotFoundError:
        is_pattern = any(ch in os.fspath(path) for ch in "*?[")
        return None, NO_MATCH if is_pattern else "no such file"
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        return None, f"not a readable image ({exc.__class__.__name__}: {exc})"


def read_images(paths, size, readers=2, ahead=32):
    """Yield ``(path, image, error)`` for each path, in order, decoding up to ``ahead`` images early.

    Parameters
    ----------
    paths : iterable of str
    size : (int, int)
        (H, W) every image is resized to.
    readers : int
        Decoding threads; 0 decodes in the caller's thread, one image at a time.
    ahead : int
        At most this many images are decoded (or decoding) before the caller asks for them.
    """
    if readers <= 0:
        for path in paths:
            yield (path, *read_image(path, size))
        return
    pending = deque()
    with ThreadPoolExecutor(readers, thread_name_prefix="fastres-reader") as pool:
        try:
            for path in paths:
                pending.append((path, pool.submit(read_image, path, size)))
                if len(pending) > ahead:
                    done, future = pending.popleft()
                    yield (done, *future.result())
            while pending:
                done, future = pending.popleft()
                yield (done, *future.result())
        finally:
            for _, future in pending:  # the caller stopped early: drop what it will never ask for
                future.cancel()


def image_shape(model, input_size=None):
    """The (H, W, C) that ``model`` runs on: its declared input, or ``input_size`` (default 224) where free.

    Raises
    ------
    FastresError
        ``input_size`` contradicts the model's declared size.
    """
    declared = model.input_shape[1:]
    if input_size and None not in declared[:2] and declared[:2] != (input_size,) * 2:
        raise FastresError(f"{model.path} takes {declared[0]}x{declared[1]} images; "
                           f"--input-size {input_size} does not fit")
    return tuple((input_size or 224) if d is None else d for d in declared)


def top_classes(model, images, mode, top):
    """The ``top`` classes of each image as ``[{"class": i, "probability": p}, ...]``, most probable first.

    Parameters
    ----------
    model : fastres.Model
        A classifier; logits are turned into probabilities by a softmax.
    images : ndarray
        uint8 (N, H, W, 3) RGB images in 0..255.
    mode : str
        The preprocessing (:func:`preprocess`).
    top : int
    """
    scores = model.predict(preprocess(images, mode))
    if not model.output_is_probability:
        scores = np.exp(scores - scores.max(axis=1, keepdims=True))
        scores /= scores.sum(axis=1, keepdims=True)
    return [[{"class": int(i), "probability": float(row[i])} for i in np.argsort(-row, kind="stable")[:top]]
            for row in scores]


def classify(model, paths, preprocess="caffe", top=5, batch_size=16, input_size=None, readers=2):
    """Yield one record per path, in order: ``{"image": path, "top": [...]}`` or ``{"image": path, "error": why}``.

    Paths are taken ``batch_size`` at a time; the readable images of each run go through the model in one
    pass.  ``readers`` threads decode ahead of the engine (:func:`read_images`).
    """
    shape = image_shape(model, input_size)
    if shape[2] != 3:
        raise FastresError(f"{model.path} takes {shape[2]}-channel input; predict reads RGB images")
    batch = []
    for item in read_images(paths, shape[:2], readers, ahead=2 * batch_size):
        batch.append(item)
        if len(batch) == batch_size:
            yield from _classify_batch(model, batch, preprocess, top)
            batch = []
    yield from _classify_batch(model, batch, preprocess, top)


def _classify_batch(model, batch, mode, top):
    good = [image for _, image, error in batch if error is None]
    found = iter(top_classes(model, np.stack(good), mode, top) if good else [])
    return [{"image": path, "error": error} if error else {"image": path, "top": next(found)}
            for path, _, error in batch]
