"""Information-theoretic multimodal fusion models and the mutual-information estimators they share.

This package depends only on torch. Shared estimators live in :mod:`fusion.estimators`.
"""
