"""Small helpers every layer uses: atomic file writes and the git provenance of results."""
