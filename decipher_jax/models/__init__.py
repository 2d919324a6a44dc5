"""Flax NNX models: the 3D ViT image encoder and the BERT report encoder."""
