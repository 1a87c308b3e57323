"""clipscrub: find backdoor-poisoned and noisy pairs in CLIP training data."""

__version__ = "0.1.0"
