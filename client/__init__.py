"""pygame viewer/driver and headless clients. Imports `protocol` only, never torch."""
