"""The ``matta`` command line, the top layer: it may import every package below it, none imports it."""
