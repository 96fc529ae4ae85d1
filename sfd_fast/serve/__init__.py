"""Export and serving of the one-step generator: ONNX export, TensorRT engines, runners."""

from .onnx import ExportResult, to_onnx
from .runners import OnnxRuntimeRunner, TorchRunner, load_runner
from .tensorrt import TensorRTRunner, TensorRTUnavailable, build_engine, tensorrt_available

__all__ = ["ExportResult", "to_onnx", "OnnxRuntimeRunner", "TorchRunner", "load_runner", "TensorRTRunner",
           "TensorRTUnavailable", "build_engine", "tensorrt_available"]
