"""The ``kizuna-stream`` command line: one module per command, listed in ``main.COMMANDS``.

``common`` holds what every command shares (exit codes, errors, signals, status output).
"""
