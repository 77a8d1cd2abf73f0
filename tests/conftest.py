"""pytest configuration shared by the test files."""


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one); select with -m gpu")
