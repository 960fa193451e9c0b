# Run silently in every kernel before the user's first line (as a cell, or,
# in a kernel forked from the template, as `_mcp_startup.setup()`).
def __mcp_interpreter_setup():
    import warnings

    # plotly 6 warns on every export that kaleido 0.2 is deprecated; the
    # project pins kaleido 0.2.1 on purpose because it ships its own Chromium.
    warnings.filterwarnings("ignore", message=r"(?s).*Kaleido versions less than 1")

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

    _coalesce_streams(ip, OutStream)
    _return_free_memory(ip)

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


def _return_free_memory(ip):
    # What a cell frees stays in the C heap as pages of this kernel's own (a
    # plot's image buffers alone are over 1 MB, and in a forked kernel each
    # page of the heap it writes is a copy of the template's). After every
    # cell (after the inline backend's flush of its figures, registered
    # before), the free pages go back to the system: glibc's malloc_trim,
    # about 0.1 ms after a plot and microseconds after most cells.
    try:
        import ctypes

        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return  # not glibc
    trim.argtypes = [ctypes.c_size_t]

    def give_back(*args, **kwargs):
        trim(0)

    ip.events.register("post_execute", give_back)


def _coalesce_streams(ip, OutStream):
    # ipykernel sends one iopub message per flush, and an explicit flush
    # (print(..., flush=True), logging, progress bars) waits for a round trip
    # to the IOPub thread: a cell printing 300 000 flushed lines spends
    # minutes in messages. While a cell runs, an explicit flush therefore
    # only schedules ipykernel's own buffered flush, which the IOPub thread
    # runs `interval` after the first unsent write and which sends everything
    # written until then as one message per stream. Every write schedules
    # that flush too (ipykernel's 0.2 s becomes `interval`), so output still
    # shows within milliseconds in progress reports. 5 ms: at most 200
    # messages a second per stream, each costing the kernel and the server
    # some tens of microseconds, against a delay nobody reading progress
    # every 500 ms can see.
    #
    # Order is kept where it was before:
    # - every other iopub message a thread sends (displays, clear_output,
    #   results, errors, the `idle` status) first really flushes what the
    #   streams hold, so text written before it arrives before it;
    # - a write to one stream while the other holds text it was asked to
    #   flush sends that text first, so flushed stdout/stderr lines
    #   interleave as they were written;
    # - outside cells (the kernel's flush before its reply and `idle`, input
    #   prompts) a flush is the original synchronous one.
    # A stream that holds `chunk` characters is flushed at once (and waits),
    # so a message stays bounded however fast a cell writes, and one huge
    # write (print('x' * 10**9)) is split into bounded messages.
    import os
    import sys
    import threading

    interval = 0.005
    chunk = 64 * 1024
    # (`_buffers`, `_schedule_flush` and `_flush` are ipykernel 6.2x/7's;
    # other versions keep their own writes and flushes.)
    if not all(hasattr(OutStream, a) for a in ("_schedule_flush", "_flush", "_is_master_process")):
        return
    OutStream.flush_interval = interval
    original_write = OutStream.write
    original_flush = OutStream.flush
    original_send_pending = OutStream._flush
    in_cell = [False]
    streams = [s for s in (sys.stdout, sys.stderr) if isinstance(s, OutStream)]
    other = {id(a): b for a in streams for b in streams if a is not b}

    def holds_text(stream):
        # Text not yet handed to the IOPub thread. Checked in this order: a
        # flush rotates the buffers first and queues its message last, and
        # `_mcp_sending` covers the time in between.
        buffers = getattr(stream, "_buffers", None)
        return bool(buffers) or getattr(stream, "_mcp_sending", False)

    def send_pending(self):
        self._mcp_sending = True
        self._mcp_asked = False
        self._mcp_held = 0
        try:
            return original_send_pending(self)
        finally:
            self._mcp_sending = False

    def write(self, string):
        if not isinstance(string, str) or not string or getattr(self, "_buffers", None) is None:
            return original_write(self, string)
        # (Checked at the write, not at the flush: a write schedules a send.)
        send_asked_peer(self)
        for i in range(0, len(string), chunk):
            piece = string[i : i + chunk] if len(string) > chunk else string
            original_write(self, piece)
            held = getattr(self, "_mcp_held", 0) + len(piece)
            self._mcp_held = held
            if held >= chunk:
                original_flush(self)
        return len(string)

    def send_asked_peer(self):
        # Text the other stream was asked to flush goes before this stream's
        # next text.
        peer = other.get(id(self))
        if peer is not None and getattr(peer, "_mcp_asked", False) and holds_text(peer):
            original_flush(peer)

    def flush_now(self):
        send_asked_peer(self)
        return original_flush(self)

    def flush(self):
        if getattr(self, "_buffers", None) is None or getattr(self, "echo", None) is not None:
            return original_flush(self)
        if not holds_text(self):
            # Nothing to wait for: text rotated out earlier is queued on the
            # IOPub thread before anything sent after this returns.
            return None
        if in_cell[0] and self._is_master_process():
            self._mcp_asked = True
            self._schedule_flush()
            return None
        return flush_now(self)

    OutStream._flush = send_pending
    OutStream.write = write
    OutStream.flush = flush

    iopub = getattr(ip.kernel, "iopub_thread", None)
    if iopub is not None and hasattr(iopub, "send_multipart"):
        send = iopub.send_multipart

        def send_multipart(*args, **kwargs):
            thread = iopub.thread
            if thread is not None and thread.is_alive() and thread.ident != threading.get_ident():
                for stream in streams:
                    if holds_text(stream):
                        flush_now(stream)
            return send(*args, **kwargs)

        iopub.send_multipart = send_multipart

    # A forked child (multiprocessing) starts with copies of the buffers and
    # would send their text again: hand it to the IOPub thread first.
    def before_fork():
        for stream in streams:
            if stream._is_master_process() and holds_text(stream):
                flush_now(stream)

    os.register_at_fork(before=before_fork)

    def cell_starts(*args, **kwargs):
        in_cell[0] = True

    def cell_ends(*args, **kwargs):
        in_cell[0] = False

    ip.events.register("pre_execute", cell_starts)
    ip.events.register("post_execute", cell_ends)


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
            # kaleido's Chromium writes its page to /tmp whatever TMPDIR says.
            # Where the sandbox could not give this kernel a private /tmp, it
            # is closed: say so now instead of letting Chromium fail slowly.
            if getattr(self, "_proc", None) is None:
                import os
                import tempfile

                try:
                    fd, probe = tempfile.mkstemp(prefix=".kaleido-", dir="/tmp")
                    os.close(fd)
                    os.unlink(probe)
                except OSError:
                    raise RuntimeError(
                        "plotly's image export (kaleido) needs a writable /tmp, which this "
                        "kernel does not have: the server cannot give kernels a private /tmp "
                        "here (it needs CAP_SYS_ADMIN, e.g. --cap-add SYS_ADMIN in a "
                        "container). Save the figure as HTML instead: fig.write_html('fig.html')"
                    ) from None
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


if __name__ == "_mcp_startup":
    # Loaded once by the kernel template (template.py): a kernel forked from
    # it runs this function as its whole start-up cell, instead of having
    # IPython tokenize, hash and compile this file again.
    setup = __mcp_interpreter_setup
else:
    __mcp_interpreter_setup()
    del __mcp_interpreter_setup, _coalesce_streams, _guard_kaleido
