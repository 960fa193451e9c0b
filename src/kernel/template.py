# The kernel template: a root process that has imported ipykernel and the
# scientific stack once, and forks each new kernel into an environment the
# server's sandbox wrapper has already prepared (see src/kernel/template.rs).
#
# It never runs session code. It reads one JSON request per line on stdin
# (a pipe only the server holds) and answers one JSON line on stdout. For a
# request it forks a helper that, still root and single-threaded:
#   - points stdin/stdout at /dev/null and stderr at the wrapper's stderr
#     (the server's per-kernel log pipe),
#   - joins the kernel's cgroups and sets its rlimits,
#   - enters the wrapper's network, mount and PID namespaces (setns),
#   - closes every other descriptor, and forks the kernel, which is then a
#     process of the wrapper's PID namespace (its parent, once the helper
#     exits, is the wrapper: the namespace's init).
# The kernel, before any of its own code runs: starts a session of its own,
# drops to its uid (no supplementary groups), sets its umask and
# no_new_privs, applies the Landlock ruleset the wrapper computed (rules.rs:
# the policy is Rust's, only its application is repeated here), reseeds every
# generator seeded at import, takes its environment, and only then starts
# ipykernel (whose threads start here, in the kernel).
#
# stdlib only, no threads: a thread alive at fork time would leave the
# kernel with locks nobody releases. The template checks before every fork
# that it has exactly one thread, and refuses otherwise.

import ctypes
import gc
import json
import os
import sys


def _fail(msg):
    sys.stderr.write(f"mcp-python-interpreter kernel template: {msg}\n")
    sys.stderr.flush()


# What a kernel's start imports besides (found by comparing sys.modules of a
# template and of a kernel just started): the debugger (debugpy, about a
# hundred modules), IPython's inspector and magics' helpers, tornado's
# queues. Imported here (about 50 ms), they are shared instead of private
# to each kernel (about 8 MB each).
_EXTRAS = [
    "IPython.core.completer",
    "IPython.core.completerlib",
    "IPython.core.debugger",
    "IPython.core.logger",
    "IPython.core.oinspect",
    "IPython.extensions.storemagic",
    "IPython.utils.wildcard",
    "ipykernel.debugger",
    "tornado.gen",
    "tornado.locks",
    "tornado.queues",
    "tornado.platform.asyncio",
    "faulthandler",
    "pdb",
    "resource",
    "encodings.idna",
    "encodings.latin_1",
]


def _preload(modules):
    # What a launched kernel gets from ipykernel: the inline backend as
    # matplotlib's default.
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    import ipykernel.kernelapp  # noqa: F401
    import ipykernel.ipkernel  # noqa: F401
    import ipykernel.zmqshell  # noqa: F401
    for name in modules:
        try:
            if name == "matplotlib":
                name = "matplotlib.pyplot"
            __import__(name)
        except Exception as e:  # a missing module is not the template's failure
            _fail(f"cannot import {name}: {e!r}")
    for name in _EXTRAS:
        try:
            __import__(name)
        except Exception as e:
            _fail(f"cannot import {name}: {e!r}")
    if "matplotlib.pyplot" in sys.modules:
        # Draw one figure without pyplot (whose backend stays unresolved), so
        # fonts and text layout caches are loaded once and shared.
        try:
            import io

            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure

            fig = Figure()
            FigureCanvasAgg(fig)
            ax = fig.add_subplot()
            ax.plot([1, 2, 3], [1, 4, 9], label="x")
            ax.set_title("t")
            ax.legend()
            fig.savefig(io.BytesIO(), format="png")
            # The backend a kernel uses, loaded here; pyplot switches to it
            # now (no IPython shell yet: its integration is made per kernel).
            import matplotlib.pyplot as plt
            import matplotlib_inline.backend_inline  # noqa: F401

            plt.switch_backend(os.environ["MPLBACKEND"])
        except Exception as e:
            _fail(f"matplotlib warm-up failed: {e!r}")


def _threads():
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return -1


_libc = ctypes.CDLL(None, use_errno=True)
_SYS_LANDLOCK = {  # x86_64 and the generic table (aarch64, riscv64) agree
    "create": 444,
    "add_rule": 445,
    "restrict": 446,
}
_CLONE_NEWNS = 0x00020000
_CLONE_NEWNET = 0x40000000
_CLONE_NEWPID = 0x20000000
_PR_SET_NO_NEW_PRIVS = 38


def _check(ret, what):
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return ret


def _landlock(plan):
    """Applies the ruleset computed by rules.rs, masked to this Linux's ABI."""
    syscall = _libc.syscall
    syscall.restype = ctypes.c_long
    abi = syscall(ctypes.c_long(_SYS_LANDLOCK["create"]), None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return  # no Landlock here: the launched path would enforce nothing either
    fs_mask = (1 << 13) - 1
    if abi >= 2:
        fs_mask |= 1 << 13  # REFER
    if abi >= 3:
        fs_mask |= 1 << 14  # TRUNCATE
    if abi >= 5:
        fs_mask |= 1 << 15  # IOCTL_DEV
    net_mask = 0b11 if abi >= 4 else 0
    scope_mask = 0b11 if abi >= 6 else 0
    handled_fs = plan["handled_fs"] & fs_mask
    handled_net = plan["handled_net"] & net_mask
    scoped = plan["scoped"] & scope_mask

    class Attr(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("fd", ctypes.c_int32)]

    class NetPort(ctypes.Structure):
        _fields_ = [("allowed", ctypes.c_uint64), ("port", ctypes.c_uint64)]

    attr = Attr(handled_fs, handled_net, scoped)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    rs = _check(
        syscall(ctypes.c_long(_SYS_LANDLOCK["create"]), ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0)),
        "landlock_create_ruleset",
    )
    try:
        for path, access, file_access in plan["paths"]:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # as the crate does: a missing path grants nothing
            try:
                import stat

                is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
                allowed = (access if is_dir else file_access) & handled_fs
                if allowed:
                    rule = PathBeneath(allowed, fd)
                    _check(
                        syscall(ctypes.c_long(_SYS_LANDLOCK["add_rule"]), ctypes.c_int(rs), ctypes.c_int(1), ctypes.byref(rule), ctypes.c_uint32(0)),
                        f"landlock rule for {path}",
                    )
            finally:
                os.close(fd)
        if handled_net:
            for port, access in plan["ports"]:
                rule = NetPort(access & handled_net, port)
                _check(
                    syscall(ctypes.c_long(_SYS_LANDLOCK["add_rule"]), ctypes.c_int(rs), ctypes.c_int(2), ctypes.byref(rule), ctypes.c_uint32(0)),
                    f"landlock rule for port {port}",
                )
        _check(
            syscall(ctypes.c_long(_SYS_LANDLOCK["restrict"]), ctypes.c_int(rs), ctypes.c_uint32(0)),
            "landlock_restrict_self",
        )
    finally:
        os.close(rs)


def _become_kernel(req, report):
    """In the kernel (root until the drop): every layer, then ipykernel."""
    plan = req["plan"]
    os.setsid()
    user = plan.get("user")
    if user is not None:
        os.setgroups([])
        os.setresgid(user["gid"], user["gid"], user["gid"])
        os.setresuid(user["uid"], user["uid"], user["uid"])
        if os.getuid() != user["uid"] or os.geteuid() != user["uid"] or os.getgroups():
            raise OSError("could not drop privileges")
        os.umask(0o077)
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    if plan.get("landlock") is not None:
        _landlock(plan["landlock"])
    os.chdir(req["cwd"])

    # No state shared with siblings: every generator seeded at import gets
    # fresh entropy. (Python's hash secret cannot change after start: all
    # kernels of one template share it; it only orders dicts of str keys.)
    import random

    random.seed()
    np = sys.modules.get("numpy")
    if np is not None:
        try:
            np.random.seed()
        except Exception:
            pass
    # multiprocessing's authentication key (made from os.urandom when it is
    # imported) guards a Manager's or Listener's connections: a sibling must
    # not know it.
    mp = sys.modules.get("multiprocessing.process")
    if mp is not None:
        try:
            mp.current_process().authkey = os.urandom(32)
        except Exception:
            pass
    os.environ.update(req["env"])
    site = req["env"].get("PYTHONPATH")
    # `python -m` puts the working folder first; PYTHONPATH comes next.
    sys.path[0:1] = [req["cwd"]] + ([site] if site else [])
    sys.argv = ["ipykernel_launcher"] + req["argv"]
    # The template's objects stay frozen (never scanned by the cyclic GC),
    # or a kernel's first full collection would write every one of them,
    # copying their pages. Only the kernel's own objects are collected.
    gc.enable()
    os.write(report, f"ok {os.getpid()}\n".encode())
    os.close(report)

    from ipykernel.kernelapp import IPKernelApp

    app = IPKernelApp.instance()
    app.initialize()
    # matplotlib's inline backend, chosen in the template, is wired to this
    # kernel's shell now, as its import does in a launched kernel.
    inline = sys.modules.get("matplotlib_inline.backend_inline")
    if inline is not None:
        try:
            inline._enable_matplotlib_integration()
        except Exception:
            pass
    app.start()


def _helper(req, report):
    """The forked helper: enters the prepared environment and forks the kernel."""
    plan = req["plan"]
    wrapper = int(req["wrapper_pid"])
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    err = os.open(f"/proc/{wrapper}/fd/2", os.O_WRONLY)
    os.dup2(err, 2)
    os.close(err)
    for procs in plan.get("cgroup_procs", []):
        with open(procs, "w") as f:
            f.write("0")
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if plan.get("file_size_bytes") is not None:
        b = plan["file_size_bytes"]
        resource.setrlimit(resource.RLIMIT_FSIZE, (b, b))
    if plan.get("data_bytes") is not None:
        b = plan["data_bytes"]
        resource.setrlimit(resource.RLIMIT_DATA, (b, b))
    # Opened first, entered after: the mount namespace changes what /proc is.
    spaces = [(os.open(f"/proc/{wrapper}/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC), flag) for ns, flag in (("net", _CLONE_NEWNET), ("pid", _CLONE_NEWPID), ("mnt", _CLONE_NEWNS))]
    for fd, flag in spaces:
        _check(_libc.setns(fd, flag), f"setns {flag:#x}")
        os.close(fd)
    # Nothing of the template's survives but stdio and the report pipe.
    os.closerange(3, report)
    os.closerange(report + 1, 65536)
    # setns(CLONE_NEWPID) places our children, not us: the first child is in
    # the namespace, but its parent (we) is not, so an orphan of ours would go
    # to the host's init. That child therefore forks the kernel and exits at
    # once: the kernel's parent is then the namespace's init, the wrapper.
    middle = os.fork()
    if middle == 0:
        kid = os.fork()
        if kid == 0:
            _run_kernel(req, report)
        os._exit(0)
    os.waitpid(middle, 0)


def _run_kernel(req, report):
    code = 1
    try:
        _become_kernel(req, report)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException as e:
        try:
            os.write(report, f"error {e!r}\n".encode())
        except OSError:
            pass
    finally:
        # The kernel never returns into the template's loop: it ends here,
        # after what a normal interpreter exit would run.
        try:
            import atexit

            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            pass
        os._exit(code)


def _fork(req):
    if _threads() != 1:
        return {"ok": False, "error": f"the template has {_threads()} threads; refusing to fork"}
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 0
        try:
            _helper(req, w)
        except BaseException as e:
            code = 1
            try:
                os.write(w, f"error {e!r}\n".encode())
            except OSError:
                pass
        os._exit(code)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 4096)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    os.waitpid(pid, 0)
    line = b"".join(chunks).decode(errors="replace").strip().splitlines()
    if line and line[0].startswith("ok "):
        return {"ok": True, "ns_pid": int(line[0][3:])}
    return {"ok": False, "error": line[0] if line else "the kernel ended before it was confined"}


def main():
    modules = [m for m in sys.argv[2:] if m]  # after our name (a marker)
    # The control pipe gets its own descriptors; whatever an import prints
    # goes to stderr. (Both are closed in every kernel.)
    control_in = os.fdopen(os.dup(0), "rb")
    out = os.fdopen(os.dup(1), "wb")
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    gc.disable()
    _preload(modules)
    if _threads() != 1:
        _fail(f"{_threads()} threads after the imports; forking would be unsafe")
        sys.exit(3)
    gc.collect()
    gc.freeze()
    out.write(b'{"ready": true}\n')
    out.flush()
    for raw in control_in:
        try:
            reply = _fork(json.loads(raw))
        except Exception as e:
            reply = {"ok": False, "error": repr(e)}
        out.write(json.dumps(reply).encode() + b"\n")
        out.flush()


if __name__ == "__main__":
    main()
