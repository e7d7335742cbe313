"""Objectives: local tasks, metrics, scorers holding the merged model, normalization.

Import the submodules (``mergeopt.objectives.evaluate``, ``.scorers.hf``, ...) directly; this
package imports nothing heavy so that the CLI starts fast.
"""
