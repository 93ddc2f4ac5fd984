"""Benchmarks live in ``bench_*.py`` (kept out of the test suite's ``test_*.py`` pattern);
collect them when pytest is pointed at this folder: ``pytest bench --benchmark-only``."""


def pytest_configure(config):
    patterns = config.getini("python_files")  # the cached list pytest's collector reads
    if "bench_*.py" not in patterns:
        patterns.append("bench_*.py")
