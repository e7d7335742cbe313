"""Scorers: a model resident on one device that merged weights are written into in place.

``base`` holds the protocol and ``create_scorer``; ``hf`` (transformers) and ``vllm`` import
their engines only when a scorer is built.
"""
