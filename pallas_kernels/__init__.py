"""Pallas GPU kernels for QuantSpec, each beside the `jnp` reference it must match."""
