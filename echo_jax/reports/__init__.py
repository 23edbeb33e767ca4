"""Sweeps and the result tables, plots and docs pages they write."""
