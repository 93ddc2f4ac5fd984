"""The inversion networks as plain ``nn.Module``s: per-layer inverters e_N, the image encoder E_f,
the hybrid encoder E (and its file format), the direct encoder of ablations b and c."""
