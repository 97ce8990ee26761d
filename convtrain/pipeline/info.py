"""`convtrain info`: versions, the kernels' build and threads, the tracking store."""

from __future__ import annotations


def describe_installation() -> dict[str, str]:
    """What `convtrain info` prints."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import convtrain
    from convtrain.nn.backend import blas_summary, build_info
    from convtrain.tracking.store import resolve_tracking_uri

    info = {"convtrain": convtrain.__version__, "python": platform.python_version(),
            "platform": platform.platform()}
    for package in ("numpy", "scipy", "mlflow", "optuna"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = "not installed"
    try:
        build = build_info()
    except Exception as exc:  # e.g. the Cython extension was never compiled
        info["kernels"] = f"not available ({' '.join(str(exc).split())})"
    else:
        for key, value in build.items():
            if key == "blas":
                value = blas_summary(value)
            elif isinstance(value, list):
                value = ", ".join(map(str, value))
            info[key.replace("_", " ")] = str(value)
    info["tracking store"] = resolve_tracking_uri()
    return info
