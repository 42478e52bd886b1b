"""Evaluation of frozen encoders (k-NN now; linear probe and more build on it)."""
