"""The Jupyter kernel that executes report notebooks, and the environment it starts in.

Papermill starts kernels by kernelspec name. So that notebooks run in *this* interpreter (the
project venv, where ``thsrn_lib`` and torch are installed) the runner uses a dedicated kernelspec,
``thsrn``, installed into ``<sys.prefix>/share/jupyter/kernels/thsrn`` on first use (equivalent to
``python -m ipykernel install --sys-prefix --name thsrn``). The kernel gets:

- ``MPLBACKEND`` set to the inline backend. A process-wide ``MPLBACKEND=Agg`` (as the test
  suite sets) would otherwise be inherited by the kernel and drop every figure from the
  executed notebook.
- the project root prepended to ``PYTHONPATH``, so ``import thsrn_lib`` works even when the
  package is not pip-installed.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from ..errors import ConfigError

__all__ = ["INLINE_BACKEND", "ensure_kernel", "kernel_environment", "project_root"]

INLINE_BACKEND = "module://matplotlib_inline.backend_inline"


def project_root() -> Path:
    """The folder that contains the ``thsrn_lib`` package (the repository root in a checkout)."""
    return Path(__file__).resolve().parents[2]


def _same_python(argv0: str) -> bool:
    if argv0 in {"python", f"python{sys.version_info[0]}", f"python{sys.version_info[0]}.{sys.version_info[1]}"}:
        return True  # jupyter_client substitutes the running interpreter for a bare "python"
    try:
        return Path(argv0).resolve() == Path(sys.executable).resolve() or Path(argv0) == Path(sys.executable)
    except OSError:
        return False


def ensure_kernel(name: str = "thsrn", display_name: str = "Python (thsrn-workbench)") -> str:
    """Make sure a kernelspec ``name`` exists for this interpreter; install it under ``sys.prefix`` if not.

    Returns the kernelspec's directory. Only the project kernel is installed automatically; for
    any other name the kernelspec must already exist. Raises :class:`ConfigError` if the name
    resolves to a kernelspec that runs another Python (it would lack this project's packages).
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    ksm = KernelSpecManager()
    try:
        spec = ksm.get_kernel_spec(name)
    except NoSuchKernel:
        spec = None
    if spec is None:
        if name != "thsrn":
            raise ConfigError(f"Jupyter kernel {name!r} is not installed; install it (python -m ipykernel install "
                              f"--sys-prefix --name {name}) or use the default project kernel 'thsrn'")
        from ipykernel.kernelspec import install

        install(user=False, prefix=sys.prefix, kernel_name=name, display_name=display_name,
                env={"MPLBACKEND": INLINE_BACKEND})
        spec = KernelSpecManager().get_kernel_spec(name)
    if name == "thsrn" and spec.argv and not _same_python(spec.argv[0]):
        raise ConfigError(
            f"Jupyter kernel 'thsrn' at {spec.resource_dir} runs {spec.argv[0]}, not this interpreter "
            f"({sys.executable}); remove that folder or reinstall it with "
            f"`{sys.executable} -m ipykernel install --sys-prefix --name thsrn`"
        )
    return spec.resource_dir


@contextlib.contextmanager
def kernel_environment(threads: int | None = None) -> Iterator[None]:
    """Temporarily set the environment a kernel started inside the block inherits.

    Kernels are child processes that copy ``os.environ`` at launch; papermill offers no other
    way to pass an environment, so this swaps the variables around the call and restores them.
    ``threads`` caps the kernel's OpenMP/BLAS threads (torch reads ``OMP_NUM_THREADS`` at import)
    unless the user set ``OMP_NUM_THREADS`` already.
    """
    keys = ("MPLBACKEND", "PYTHONPATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {k: os.environ.get(k) for k in keys}
    root = str(project_root())
    try:
        os.environ["MPLBACKEND"] = INLINE_BACKEND
        parts = [p for p in (saved["PYTHONPATH"] or "").split(os.pathsep) if p]
        os.environ["PYTHONPATH"] = os.pathsep.join([root] + [p for p in parts if p != root])
        if threads is not None and saved["OMP_NUM_THREADS"] is None:
            os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
