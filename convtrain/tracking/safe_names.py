"""A run's or a sweep's name made safe to use as one folder or one MLflow model name.

Written once for every such use: a fit's --out folder, a sweep's default folder and the
logged model's name in `runs:/<run id>/<name>`.
"""

import re

# Anything else (separators, spaces, shell and URI characters) becomes one "-".
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name, fallback: str) -> str:
    """`name` in letters, digits, '.', '_' and '-' only, with no leading or trailing '-' or '.'
    (so never '..'); `fallback` when nothing is left."""
    return _UNSAFE.sub("-", str(name or "")).strip("-.") or fallback
