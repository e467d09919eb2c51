"""Sub-commands of the ``usfmae`` CLI: each module defines ``register(subparsers)``.

A registered parser must set ``func`` (via ``set_defaults``) to a callable taking the parsed
namespace and returning an exit status (``0``/``None`` for success).
"""
