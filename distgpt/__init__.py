"""distgpt: GPT-2-family models trained on CPUs with NumPy/BLAS, data-parallel over MPI."""


def __getattr__(name: str) -> str:
    # distgpt.__version__ on demand: importlib.metadata costs ~50 ms, which every rank and tool would
    # pay at start-up for a value only --version needs
    if name == "__version__":
        from distgpt.cli import version

        return version()
    raise AttributeError(f"module 'distgpt' has no attribute {name!r}")
