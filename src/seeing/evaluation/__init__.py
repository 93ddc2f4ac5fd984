"""Evaluation jobs run by ``python evaluate.py metric=<name>``; each module offers ``run(cfg)``."""
