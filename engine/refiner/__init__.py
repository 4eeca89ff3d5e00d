"""The LTX-2 refiner (SANA-WM stage 2): video-only transformer, text connectors, chunk-causal AR recipe."""

from engine.refiner.ar import ARRefiner, RefinerKVWindow
from engine.refiner.config import ARConfig, ConnectorsConfig, RefinerConfig
from engine.refiner.connectors import TextConnectors, load_connector_weights
from engine.refiner.model import RefinerTransformer, is_audio_key, load_refiner_weights

__all__ = [
    "ARConfig",
    "ARRefiner",
    "ConnectorsConfig",
    "RefinerConfig",
    "RefinerKVWindow",
    "RefinerTransformer",
    "TextConnectors",
    "is_audio_key",
    "load_connector_weights",
    "load_refiner_weights",
]
