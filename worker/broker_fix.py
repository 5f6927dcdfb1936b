"""A targeted fix for kombu's Redis transport (kombu 5.7.0, the newest release; no release fixes it).

A worker whose broker Redis goes away while a task is unacknowledged could exit with
`Unrecoverable error: AttributeError("'NoneType' object has no attribute 'hostname'")`:

1. Celery's `Consumer.on_connection_error_after_connected` calls `connection.collect()`, which
   closes the default channel. `redis.Channel.close()` first deletes the fanout bindings of its
   auto-delete queues (the remote-control mailbox) and reads a pending BRPOP reply; with the broker
   gone either one raises a `ConnectionError`, which aborts `close()` *before* the channel is marked
   closed. `Connection.maybe_close_channel` swallows the error, and `collect()` then detaches the
   transport (`transport.client = None`).
2. Celery then calls `connection.close()` (to release the socket before reconnecting). The
   channel, never marked closed, is closed again; this time it gets as far as restoring the
   unacknowledged messages, which builds a Redis pool from `transport.client.hostname`, and
   `transport.client` is None. An AttributeError is not a connection error, so `ignore_errors`
   lets it through and the worker stops.

The fix finishes an aborted close: when the Redis channel's own clean-up fails on a connection
error, it still drops its pools and clients and runs the generic close (which marks the channel
closed first), then re-raises the connection error as before. A second close is then a no-op.
"""

from __future__ import annotations

from contextlib import suppress

_applied = False


def close_channels_even_when_the_broker_is_gone() -> None:
    """Idempotent; called by the app factory, so every Celery process of the project has it."""
    global _applied
    if _applied:
        return
    from kombu.transport import redis as redis_transport
    from kombu.transport import virtual

    channel_class = redis_transport.Channel
    original_close = channel_class.close

    def close(self) -> None:
        try:
            original_close(self)
        except self.connection_errors:
            if not self.closed:
                with suppress(*self.connection_errors):
                    self._disconnect_pools()
                    self._close_clients()
                virtual.Channel.close(self)
            raise

    close.__doc__ = original_close.__doc__
    channel_class.close = close
    _applied = True
