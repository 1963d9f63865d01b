"""mkdocs hooks (mkdocs.yml `hooks:`). The docstrings use Sphinx roles (:func:`x`, :meth:`x`, ...), which
mkdocstrings leaves as literal text before the code span; drop the role so the page shows just `x`."""

import re

_ROLE = re.compile(r":(?:func|meth|class|mod|attr|data|exc|obj):(?=<code>)")


def on_page_content(html, **kwargs):
    return _ROLE.sub("", html)
