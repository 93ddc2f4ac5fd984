"""Layer-wise GAN inversion: per-layer inverters e_N, an image encoder E_f, and the hybrid E."""
