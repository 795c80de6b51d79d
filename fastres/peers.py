"""The peer engines that ``fastres bench`` and the benchmarks time beside fastres.

Every peer starts from the same Keras file: TensorFlow runs it through Keras under ``tf.function``;
ONNX Runtime and OpenVINO run it converted to ONNX by tf2onnx (``export_onnx``), OpenVINO pinned to
fp32 (``openvino``) or asked for bf16 (``openvino-bf16``: ``INFERENCE_PRECISION_HINT`` bf16, which it
honours where the CPU has AVX512-BF16 or AMX and otherwise runs in fp32).
Install them with ``pip install 'fastres[bench]'``; nothing in fastres's core imports this module.

This module imports nothing from fastres, so that ``first_result_script`` can load it on its own in a
fresh process: a peer's start-up is then measured through the same ``peer_forward`` that is timed,
without fastres's own imports (numpy's and Numba's) counted against it.
"""
import os
import tempfile

PEERS = ("tensorflow", "onnxruntime", "openvino", "openvino-bf16")
ONNX_PEERS = ("onnxruntime", "openvino", "openvino-bf16")  # run the model converted to ONNX
PEER_PRECISION = {"tensorflow": "fp32", "onnxruntime": "fp32", "openvino": "fp32", "openvino-bf16": "bf16"}


def _keras_model(path, threads):
    """TensorFlow and the Keras model of ``path`` (tf_keras where installed, else Keras 3)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    try:
        import tf_keras as keras_module
    except ImportError:
        import keras as keras_module
    return tf, keras_module.models.load_model(path, compile=False)


def _onnx_proto(path, threads=None):
    tf, model = _keras_model(path, threads)
    import tf2onnx

    spec = (tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="input"),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17)
    return proto


def export_onnx(path, folder, threads=None):
    """Convert the Keras file ``path`` to ONNX as the ONNX peers run it; returns the ``.onnx`` file (in ``folder``).

    Raises ImportError when TensorFlow or tf2onnx is not installed.
    """
    onnx_path = os.path.join(folder, "model.onnx")
    with open(onnx_path, "wb") as fh:
        fh.write(_onnx_proto(path, threads).SerializeToString())
    return onnx_path


def peer_forward(name, path, threads=None, onnx=None):
    """A forward function for a peer engine on a Keras model file.

    Parameters
    ----------
    name : {"tensorflow", "onnxruntime", "openvino", "openvino-bf16"}
        The engine.
    path : str
        A Keras ``.h5`` or ``.keras`` file.
    threads : int, optional
        Intra-op threads of the engine; default: the engine's own choice.
    onnx : str, optional
        For ONNX Runtime and OpenVINO: ``path`` already converted by ``export_onnx`` (else it is
        converted here, through TensorFlow).

    Returns
    -------
    callable
        ``forward(x)`` with x a float32 (N, H, W, C) array, returning the model's output as an array.

    Raises
    ------
    ImportError
        The engine (or TensorFlow, which reads the Keras file) is not installed.
    ValueError
        ``name`` is not a peer.
    """
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")
    if name == "tensorflow":
        tf, model = _keras_model(path, threads)
        forward = tf.function(lambda t: model(t, training=False))
        return lambda x: forward(tf.constant(x)).numpy()
    if onnx is None:
        with tempfile.TemporaryDirectory() as folder:
            onnx_path = export_onnx(path, folder, threads)
            return peer_forward(name, path, threads, onnx_path)  # both engines read the file while starting
    if name == "onnxruntime":
        return _onnxruntime(onnx, threads)
    return _openvino(onnx, threads, "bf16" if name == "openvino-bf16" else "f32")


def _onnxruntime(onnx_path, threads):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    return lambda x: session.run(None, {input_name: x})[0]


def _openvino(onnx_path, threads, precision="f32"):
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": precision}  # f32 unless asked for bf16 (which it would pick here)
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = core.compile_model(core.read_model(onnx_path), "CPU", config)
    return lambda x: compiled(x)[0]


def first_result_script(name, path, shape, threads=None, onnx=None):
    """Python source that starts ``name`` on ``path`` and runs one batch-1 pass of zeros of ``shape`` (H, W, C).

    For a fresh interpreter (``python -c``): it loads this file alone (not the fastres package) and calls
    ``peer_forward``, so the start-up measured is the one of the engine that is timed.  The script
    leaves its output in ``out``; the caller wraps it with its clock and its peak-memory reading.
    """
    return (
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('fastres_peers', {os.path.abspath(__file__)!r})\n"
        "peers = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(peers)\n"
        "import numpy as np\n"
        f"forward = peers.peer_forward({name!r}, {str(path)!r}, {threads!r}, {onnx!r})\n"
        f"out = forward(np.zeros((1, {', '.join(map(str, shape))}), np.float32))\n"
    )
