"""jaxrm: reward-model pre-training (POLAR, CodePMP) and fine-tuning in JAX."""

__version__ = "0.1.0"
