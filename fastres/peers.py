"""The peer engines that ``fastres bench`` and the benchmarks time beside fastres.

Every peer starts from the same Keras file through TensorFlow: TensorFlow runs it through Keras under
``tf.function``; ONNX Runtime and OpenVINO run it converted by tf2onnx, OpenVINO pinned to fp32
(``openvino``) or asked for bf16 (``openvino-bf16``: ``INFERENCE_PRECISION_HINT`` bf16, which it
honours where the CPU has AVX512-BF16 or AMX and otherwise runs in fp32).  Install them
with ``pip install 'fastres[bench]'``; nothing in fastres's core imports this module.
"""
import os
import tempfile

PEERS = ("tensorflow", "onnxruntime", "openvino", "openvino-bf16")
PEER_PRECISION = {"tensorflow": "fp32", "onnxruntime": "fp32", "openvino": "fp32", "openvino-bf16": "bf16"}


def peer_forward(name, path, threads=None):
    """A forward function for a peer engine on a Keras model file.

    Parameters
    ----------
    name : {"tensorflow", "onnxruntime", "openvino", "openvino-bf16"}
        The engine.
    path : str
        A Keras ``.h5`` or ``.keras`` file.
    threads : int, optional
        Intra-op threads of the engine; default: the engine's own choice.

    Returns
    -------
    callable
        ``forward(x)`` with x a float32 (N, H, W, C) array, returning the model's output as an array.

    Raises
    ------
    ImportError
        The engine (or TensorFlow, which reads the file for every peer) is not installed.
    ValueError
        ``name`` is not a peer.
    """
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf  # every peer starts from the Keras file through TensorFlow

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    try:
        import tf_keras as keras_module
    except ImportError:
        import keras as keras_module
    model = keras_module.models.load_model(path, compile=False)
    if name == "tensorflow":
        forward = tf.function(lambda t: model(t, training=False))
        return lambda x: forward(tf.constant(x)).numpy()
    import tf2onnx

    spec = (tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="input"),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17)
    if name == "onnxruntime":
        return _onnxruntime(proto, threads)
    return _openvino(proto, threads, "bf16" if name == "openvino-bf16" else "f32")


def _onnxruntime(proto, threads):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    return lambda x: session.run(None, {input_name: x})[0]


def _openvino(proto, threads, precision="f32"):
    import openvino as ov

    core = ov.Core()
    with tempfile.TemporaryDirectory() as folder:
        onnx_path = os.path.join(folder, "model.onnx")
        with open(onnx_path, "wb") as fh:
            fh.write(proto.SerializeToString())
        config = {"INFERENCE_PRECISION_HINT": precision}  # f32 unless asked for bf16 (which it would pick here)
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        compiled = core.compile_model(core.read_model(onnx_path), "CPU", config)
    return lambda x: compiled(x)[0]
