# Run silently in every kernel before the user's first line.
def __mcp_interpreter_setup():
    import warnings

    # plotly 6 warns on every export that kaleido 0.2 is deprecated; the
    # project pins kaleido 0.2.1 on purpose because it ships its own Chromium.
    warnings.filterwarnings("ignore", message=r"(?s).*Kaleido versions less than 1")

    # One huge write (print('x' * 10**9)) would become one huge iopub message
    # that the server must hold whole: split big writes into bounded messages.
    import contextlib
    import sys

    try:
        from ipykernel.iostream import OutStream
    except ImportError:
        return
    ip = get_ipython()  # noqa: F821 (defined in every IPython kernel)

    # A PUB socket drops messages beyond its high-water mark (1000) when the
    # server reads more slowly than the kernel prints: output would be lost.
    # Lift the mark (libzmq applies it to existing connections too); the
    # kernel's memory stays bounded by its memory limit instead.
    try:
        import zmq

        iopub = ip.kernel.iopub_thread
        iopub.schedule(lambda: iopub.socket.setsockopt(zmq.SNDHWM, 0))
    except Exception:
        pass
    # ipykernel sleeps 0.5 ms after each cell before replying, so that a
    # client reading the shell reply does not miss output still on its way
    # over iopub. The server ends a call at the iopub `idle` status instead,
    # which the kernel sends after every output on the same socket, in order:
    # the sleep would only add latency to every call.
    try:
        ip.kernel._execute_sleep = 0
    except Exception:
        pass
    # IPython 9 "tees" every write of a cell into the history (in memory, for
    # %history -o) by patching each stream's `write` for the cell. That keeps
    # all output of a flood in the kernel's memory and hides our class-level
    # patch; we need neither, so the tee becomes a no-op.
    ip._tee = lambda channel: contextlib.nullcontext()

    chunk = 64 * 1024
    original = OutStream.write

    def write(self, string):
        if isinstance(string, str) and len(string) > chunk:
            for i in range(0, len(string), chunk):
                original(self, string[i : i + chunk])
                self.flush()
            return len(string)
        return original(self, string)

    OutStream.write = write

    # Every cell ends with sys.stdout.flush() and sys.stderr.flush(); each is
    # a round trip to the IOPub thread even when nothing was written. With an
    # empty buffer there is nothing to wait for: output rotated out earlier is
    # sent by the IOPub thread before anything scheduled later (the `idle`
    # status included), so skipping the wait keeps every output before idle.
    original_flush = OutStream.flush

    def flush(self):
        # (`_buffers` is ipykernel 6.2x/7's; other versions keep their flush.)
        buffers = getattr(self, "_buffers", None)
        if buffers is not None and not buffers and getattr(self, "echo", None) is None:
            return None
        return original_flush(self)

    OutStream.flush = flush

    # Code that sets sys.stdout/sys.stderr to None (or to something that
    # cannot be written) would silence every later cell, results included:
    # give such a stream back before the next cell. A working redirection
    # (to a file, say) is left alone.
    streams = (sys.stdout, sys.stderr)

    def restore_streams(*args, **kwargs):
        for name, stream in zip(("stdout", "stderr"), streams):
            current = getattr(sys, name)
            if current is None or not callable(getattr(current, "write", None)):
                setattr(sys, name, stream)
                # The kernel tagged the streams with this cell's request
                # before this hook ran; tag the restored one too, or its
                # output would be filed under an earlier request.
                parent = getattr(ip, "parent_header", None)
                if parent and hasattr(stream, "set_parent"):
                    stream.set_parent(parent)

    ip.events.register("pre_execute", restore_streams)

    def unpin(*args, **kwargs):
        # This start-up cell's tee restores an instance-level `write` when it
        # ends; drop it before the first user cell so the class method is used.
        for stream in (sys.stdout, sys.stderr):
            stream.__dict__.pop("write", None)
        ip.events.unregister("pre_execute", unpin)

    ip.events.register("pre_execute", unpin)

    _guard_kaleido()


def _guard_kaleido():
    # kaleido 0.2 waits for its Chromium's first line with no time limit, so
    # a Chromium that cannot start (no writable /tmp, a missing library, a
    # memory limit) would hang the cell until the call's time limit. When
    # kaleido is imported, give its start-up a bound: past it, its process
    # tree is killed and kaleido raises its own "Failed to start" error with
    # Chromium's messages.
    import importlib.abc
    import importlib.util
    import sys
    import threading

    limit = 20.0

    def guard(base):
        original = base.BaseScope._ensure_kaleido

        def ensure(self):
            done = threading.Event()

            def watchdog():
                if done.wait(limit):
                    return
                proc = getattr(self, "_proc", None)
                if proc is None:
                    return
                try:
                    import psutil

                    for child in psutil.Process(proc.pid).children(recursive=True):
                        child.kill()
                except Exception:
                    pass
                proc.kill()
                try:
                    self._std_error.write(
                        f"\n[mcp-python-interpreter: Chromium did not start within {limit:.0f} s and was stopped]\n".encode()
                    )
                except Exception:
                    pass

            threading.Thread(target=watchdog, daemon=True).start()
            try:
                return original(self)
            finally:
                done.set()

        base.BaseScope._ensure_kaleido = ensure

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "kaleido.scopes.base":
                return None
            sys.meta_path.remove(self)  # once: the module is then cached
            spec = importlib.util.find_spec(name)
            if spec is None or spec.loader is None:
                return spec
            exec_module = spec.loader.exec_module

            def exec_and_guard(module):
                exec_module(module)
                try:
                    guard(module)
                except Exception:
                    pass

            spec.loader.exec_module = exec_and_guard
            return spec

    sys.meta_path.insert(0, Finder())


__mcp_interpreter_setup()
del __mcp_interpreter_setup, _guard_kaleido
