"""Torch-free types shared by every component (the bottom of the import graph)."""
