"""The server's configuration file (``kizuna-stream serve --config server.toml``).

Pure code: the loader takes the file's text and name and returns the msgspec models the
supervisor already takes (``shared.models.StreamConfig`` and friends), or raises one
``ConfigError`` that names the file and the line of the offending key.  Reading the file and
starting the streams is the CLI's job (``actors.cli.serve``).

- ``schema``: the file's tables as msgspec Structs (unknown keys refused, bounds as msgspec
  ``Meta`` constraints, so a bad value is reported at its own key).
- ``locate``: where each key of a TOML document is (``tomllib`` keeps no positions).
- ``loader``: text -> ``ServerConfig``, and the error messages.
"""

from shared.config.loader import ServerConfig, StreamSpec, load_server_config

__all__ = ["ServerConfig", "StreamSpec", "load_server_config"]
