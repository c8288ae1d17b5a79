"""File formats: safetensors, HF checkpoints, model families, the anchor, the expert bundle and its
validation, the artifact archive.
"""
