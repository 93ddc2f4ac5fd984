"""The ``python evaluate.py metric=<name>`` jobs (each module offers ``run(cfg)``) and the tables and
figures they write."""
