"""Offline tools (`python tools/NAME.py`); a package so that tests import their pieces from the repository root.
Nothing under megatron_speech/ imports from here."""
