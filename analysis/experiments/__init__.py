"""Reproducible experiments whose outputs (CSV + markdown under docs/) the README cites."""
