"""Resumable checkpoints, pre-emption and the output directory's lock."""
