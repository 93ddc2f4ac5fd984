"""Datasets: the embedded scenes world and image sources for tallies."""
from .datamodule import ScenesDataModule
from .scenes import CLASS_NAMES, NUM_CLASSES, ScenesDataset, export_image_folder, render_scene

__all__ = ["CLASS_NAMES", "NUM_CLASSES", "ScenesDataModule", "ScenesDataset", "export_image_folder", "render_scene"]
