"""Release numbers of torchgrab's dependencies: parsed once here for the checks that name them (watch()'s
torch floor, capture/_compat.py; the integrations' tested releases of transformers and Lightning)."""

from __future__ import annotations

import re
import warnings
from typing import Tuple


def major_minor(version: str) -> Tuple[int, int]:
    """(major, minor) of a version string ("2.5.1+cu124", "2.11.0a0+git1234": (2, 5), (2, 11))."""
    m = re.match(r"(\d+)\.(\d+)", str(version))
    if m is None:  # a build that does not say: taken as new enough
        return (99, 0)
    return int(m.group(1)), int(m.group(2))


def warn_if_untested(package: str, version: str, oldest: Tuple[int, int], what: str) -> None:
    """Warn that ``what`` runs with a release of ``package`` older than any it is tested with (an
    integration: the framework internals it relies on move between releases)."""
    if major_minor(version) < oldest:
        need = ".".join(map(str, oldest))
        warnings.warn(
            f"{what} is tested with {package} {need} or newer (this process has {version}), and some of its "
            f"tests fail with older releases. Upgrade {package} (pip install 'torchgrab[huggingface]' or "
            "'torchgrab[lightning]' asks for tested versions)",
            RuntimeWarning,
            stacklevel=3,
        )
