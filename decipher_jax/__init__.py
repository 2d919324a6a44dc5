"""decipher_jax: 3D MRI vision-language foundation models (Decipher-MR) in JAX / Flax NNX."""

__version__ = "0.1.0"
