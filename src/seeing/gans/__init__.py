"""Generators as named layer sequences (:class:`LayeredGenerator`) and their loaders."""
from .layered import LayeredGenerator
from .loading import LAYOUTS, MODELS, NVLABS_ARCHITECTURES, detect_layout, load_generator, save_generator
from .nvlabs_stylegan2 import NVlabsStyleGAN2Generator
from .progan import ProGANGenerator
from .rosinality import RosinalityStyleGAN2Generator
from .stylegan import StyleGANGenerator
from .stylegan2 import StyleGAN2Generator
from .stylegan3 import StyleGAN3Generator
from .stylegan_common import StyledState
from .wgangp import WGANGPGenerator

__all__ = [
    "LAYOUTS",
    "MODELS",
    "NVLABS_ARCHITECTURES",
    "LayeredGenerator",
    "NVlabsStyleGAN2Generator",
    "ProGANGenerator",
    "RosinalityStyleGAN2Generator",
    "StyleGAN2Generator",
    "StyleGAN3Generator",
    "StyleGANGenerator",
    "StyledState",
    "WGANGPGenerator",
    "detect_layout",
    "load_generator",
    "save_generator",
]
