"""Neutral base modules that data/, models/, training/ and tools all import, and that import none of them: the
audio sample rate and conv-encoder geometry (audio.py), the counter-based RNG and its stream ids (rng.py), and the
stop-signal handling of helper processes (stop_signals.py)."""
