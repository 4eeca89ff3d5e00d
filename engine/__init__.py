"""sana-wm-live engine: everything that touches torch.

Controls -> poses -> camera tensors, the SANA-WM stage-1 DiT, the LTX-2 refiner and VAE, the rollout
generator, the ZeroMQ server, recording, export, weights and the benchmark. Imports point down only:
`engine -> protocol, kernels`; nothing here imports `client`.
"""

__version__ = "0.1.0"
