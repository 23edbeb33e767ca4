"""Offline training: the jitted train step, its loop, run folders, evaluation, processes."""
