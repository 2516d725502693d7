"""Small helpers every layer may use: atomic file writes, progress lines, one-line error
reasons (telling out-of-memory failures from others), rounding a size up to a multiple, a Ctrl-C
that is not lost (ctrl_c), and child processes that end when their parent does (orphan_watch)."""
