"""Shared code of the 2D and 3D UMMKD networks: layers, losses, data, training, evaluation."""
