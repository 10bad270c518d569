"""The server: connections, the write engine, the store, subscriptions, liveness, admin.

Importing the package first decides whether the write path runs compiled (see `native`).
"""

from . import native

native.guard()
