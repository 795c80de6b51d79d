"""fastres's exception types: every problem with a model file or an input is one of these."""


class FastresError(Exception):
    """Base class of every error fastres raises on purpose."""


class ModelFormatError(FastresError):
    """The file is not a readable Keras model: not HDF5/zip, truncated, missing or mis-shaped weights, bad config."""


class UnsupportedLayerError(FastresError):
    """The model uses a layer (or a layer option) that fastres does not run; names the layer and its class."""


class InputError(FastresError, ValueError):
    """The array given to ``predict`` has the wrong rank, size, channels or dtype."""
