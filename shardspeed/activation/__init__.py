"""Activation checkpointing: recompute a region's activations in backward instead of keeping them."""

from shardspeed.activation import checkpointing

__all__ = ["checkpointing"]
