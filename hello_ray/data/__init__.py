"""Datasets: sources -> Ray Data, the demo digits, decoding, augmentations, image-set artifacts."""
