"""Small helpers every layer may use: atomic file writes, progress lines, telling
out-of-memory failures from others."""
