"""Preloaded by the fork server of the DataLoader workers (``ShardStream``), and imported
nowhere else: the server dies with the rank that started it.

The workers are the server's children, not the rank's, and each holds the server's keep-alive
pipe, so neither notices on its own that the rank is gone (kill -9, or a rank that leaves
without the interpreter's teardown): the server gets SIGKILL when the rank dies, and each
worker when the server does (``stream._die_with_server``)."""

import signal

from ..launcher import die_with_parent

die_with_parent(signal.SIGKILL)
