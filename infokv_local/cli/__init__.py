"""The command line: ``python -m infokv_local``'s one-user commands and the options every surface shares."""
