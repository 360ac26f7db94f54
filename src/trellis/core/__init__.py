"""The small core every wing uses: errors, reading recipes strictly, run records."""
