"""cmae_jax: CMAE and MAE-CT self-supervised pretraining of Vision Transformers in JAX."""
