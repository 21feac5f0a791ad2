"""Ctrl-C and SIGTERM during a batch: the model's work stops at once, while no image is left half-written or
uncounted."""

import contextlib
import signal


class Interrupts:
    """Stop signals of a batch run, as a context manager that installs and restores their handlers.

    Ctrl-C and SIGTERM stop the model's work at once (KeyboardInterrupt), except that the bookkeeping of an image
    (inside `deferred()`) first ends; after `finishing()`, signals are only noted while the outputs being written
    are finished (`outputs.BackgroundWriter`) and the summary is written. Once stopped, further signals are ignored
    on the way out (the process then exits with 130). `stopped` tells whether a signal came.
    """

    def __init__(self):
        self.deferring, self.pending, self.stopped = False, False, False

    def __enter__(self) -> "Interrupts":
        self.previous = {number: signal.signal(number, self.stop) for number in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, signal.SIG_IGN if self.stopped else handler)

    def stop(self, number, frame) -> None:
        """The signal handler: stop now, or once the deferred bookkeeping ends."""
        self.stopped = True
        if self.deferring:
            self.pending = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self):
        """A stop signal inside waits until the block ends."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.pending:
            raise KeyboardInterrupt

    def finishing(self) -> None:
        """From now on signals are only noted."""
        self.deferring = True
