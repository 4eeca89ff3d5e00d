"""Wire format between the engine and its clients: typed, versioned messages and their codec.

Pure Python + msgpack. Never imports torch or pygame, so a laptop can drive a remote GPU.
"""
