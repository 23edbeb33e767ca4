"""Small helpers every layer uses: atomic file writes, JSON-lines reads and the git provenance
of results."""
