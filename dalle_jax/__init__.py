"""dalle_jax: DALL-E in JAX/Flax."""
