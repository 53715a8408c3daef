"""The ``pipeline`` sub-commands: each module adds its commands with ``register(subparsers)``; none holds library code."""
