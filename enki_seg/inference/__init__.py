"""Inference: the core shared by semantic and instance inference, and the two of them."""
