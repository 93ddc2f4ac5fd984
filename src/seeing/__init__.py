"""seeing: show what a GAN cannot generate (Bau et al., ICCV 2019)."""
__version__ = "0.1.0"
