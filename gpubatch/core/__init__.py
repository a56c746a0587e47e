"""The ground floor: clocks, errors and exit codes, file helpers. Imports nothing else of gpubatch."""
