"""What the multi-process (gloo) tests share."""
import socket


def free_port():
    """A free TCP port on the loopback address for a test's process group."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
