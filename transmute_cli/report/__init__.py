"""Rendering, the only place besides ``cli`` that prints.

- ``terminal``: progress on stderr and rich tables on stdout
- ``markdown``: report.md and the adapter's model card
- ``text``: the plain-text pieces both share
"""
