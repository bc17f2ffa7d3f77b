"""igpt_jax: Image GPT (Chen et al., "Generative Pretraining from Pixels", 2020) in JAX/Flax NNX."""

__version__ = "0.1.0"
