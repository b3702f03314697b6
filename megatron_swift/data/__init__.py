"""Tokenizers, pretraining sample sources and the resumable data-parallel batch sampler."""
