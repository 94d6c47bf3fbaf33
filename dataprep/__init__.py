"""Data preparation: datasets read from disk, the embedded digits, split folders, a silo's data.

A layer of its own between ``common`` and the roles: it may import ``lssfl.common``; the
coordinator, the silo and the command line import it; ``common`` and ``training`` never do
(tests/test_imports.py). This file imports nothing, so a light module here (``catalog``)
stays light.
"""
