# The kernel template: a root process that has imported ipykernel and the
# scientific stack once, and forks each new kernel into an environment the
# server's sandbox wrapper has already prepared (see src/kernel/template.rs).
#
# It never runs session code. It reads one JSON request per line on stdin
# (a pipe only the server holds) and answers one JSON line on stdout.
#
# Its start (main): the imports a kernel needs (ipykernel, --preload, what
# a kernel's start imports), the server's start-up code compiled as a module
# (_load_startup), and ipykernel's application and kernel object made, with
# its IPython shell (_prepare); then `ready`. A forked kernel only makes its
# connection, sockets and threads (_finish_prepared). The first request is
# served at once (a desktop client's first call); then the shell is warmed
# by two cells of our own (_warm_up), on Python 3.12+ every object the
# template holds is made immortal (_immortalize: kernels then copy far fewer
# of its pages), and later requests wait for that (about 0.15 s; 1 s more
# with 3.12+).
#
# For a request it points its children's PID namespace at the wrapper's,
# forks the kernel (so the kernel is a process of that namespace) and
# points it back. The kernel is the template's child: the template reaps it
# when it ends and tells its wrapper the exit code (see _KERNELS). The
# kernel, still root and single-threaded:
#   - points stdin/stdout at /dev/null and stderr at the wrapper's stderr
#     (the server's per-kernel log pipe),
#   - joins the kernel's cgroups and sets its rlimits,
#   - enters the wrapper's network and mount namespaces (setns),
#   - closes every other descriptor.
# Then, before any of its own code runs, it starts a session of its own,
# drops to its uid (no supplementary groups), sets its umask and
# no_new_privs, applies the Landlock ruleset the wrapper computed (rules.rs:
# the policy is Rust's, only its application is repeated here), reseeds every
# generator seeded at import, takes its environment (and forgets folders the
# template memoised from its own), and only then starts ipykernel (whose
# threads start here, in the kernel).
#
# stdlib only, no threads: a thread alive at fork time would leave the
# kernel with locks nobody releases. The template checks before every fork
# that it has exactly one thread, and refuses otherwise. And no full garbage
# collection after the first fork: every page the template writes stops
# being shared with the kernels forked before.

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
    """What the first kernel needs: ipykernel, `modules` and what a kernel's
    start imports besides (_EXTRAS), with the inline backend as matplotlib's
    default (as ipykernel makes it in a launched kernel)."""
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    import ipykernel.kernelapp  # noqa: F401
    import ipykernel.ipkernel  # noqa: F401
    import ipykernel.zmqshell  # noqa: F401
    for name in [m if m != "matplotlib" else "matplotlib.pyplot" for m in modules] + _EXTRAS:
        try:
            __import__(name)
        except Exception as e:  # a missing module is not the template's failure
            _fail(f"cannot import {name}: {e!r}")
    if "matplotlib.pyplot" in sys.modules:
        try:
            # The backend a kernel uses, loaded here; pyplot switches to it
            # now (its integration with a shell is made in _prepare, or by
            # each kernel where that failed).
            import matplotlib.pyplot as plt
            import matplotlib_inline.backend_inline  # noqa: F401

            plt.switch_backend(os.environ["MPLBACKEND"])
        except Exception as e:
            _fail(f"cannot load matplotlib's inline backend: {e!r}")


def _load_startup():
    """The server's start-up code (startup.py, which the server puts in our
    folder), compiled once as the module `_mcp_startup`: a kernel forked
    after this runs `_mcp_startup.setup()` as its start-up cell (the fork's
    answer says so), instead of a 300-line cell IPython would tokenize, hash
    and compile again in every kernel."""
    import types

    with open(os.path.join(os.getcwd(), "startup.py")) as f:
        source = f.read()
    module = types.ModuleType("_mcp_startup")
    exec(compile(source, "<mcp-python-interpreter start-up>", "exec"), module.__dict__)
    if not callable(getattr(module, "setup", None)):
        raise RuntimeError("startup.py defines no setup()")
    sys.modules["_mcp_startup"] = module


# The kernel application and its shell, made once in the template (see
# _prepare), or None where that failed: kernels then make their own.
_PREPARED = None


class _Discard:
    """A stand-in for the iopub socket while the template warms up."""

    def send_multipart(self, *args, **kwargs):
        pass


def _prepare(options):
    """Does in the template what every kernel's start would do the same way.

    A forked kernel that runs code the template has not run writes to the
    objects that code touches (reference counts, and the specialising
    interpreter's inline caches), and each write copies a shared page: a
    kernel's own start, run entirely after the fork, copied about 25 MB and
    took about 60 ms of CPU (a single list of every module's file, made by
    ipykernel's kernel object for its debugger, copied 9 MB). So what does
    not depend on the kernel's connection is made here, once: ipykernel's
    application, configured from the options every kernel gets (`options`:
    its command line minus the connection file), and its kernel object with
    the IPython shell (magics, formatters, completer, compiler), wired to
    matplotlib's inline backend (_warm_up runs cells through it later). A
    kernel then only makes what is its own (`_finish_prepared`): its profile
    folder, connection file, session key, sockets, threads. Nothing here
    holds a descriptor a kernel would keep (each kernel closes them all) or
    starts a thread (checked before every fork).
    """
    global _PREPARED
    import ipykernel

    if not ipykernel.__version__.startswith("7."):
        # _finish_prepared follows ipykernel 7's start; other versions (an
        # environment of the user's, --python) start as they always did.
        sys.stderr.write(f"kernel template: ipykernel {ipykernel.__version__}: kernels make their own application\n")
        return
    from IPython.core.application import BaseIPythonApplication
    from ipykernel.kernelapp import IPKernelApp

    try:
        # ipykernel's default ip: the local interfaces, found with psutil
        # (imported for it). Unused with ipc transport, but computed.
        import jupyter_client.localinterfaces as li

        li._load_ips()
    except Exception:
        pass
    app = IPKernelApp.instance()
    # IPKernelApp.initialize begins with this: the command line and config files.
    BaseIPythonApplication.initialize(app, list(options))
    # As IPKernelApp.init_kernel makes it, less what a kernel's own start makes.
    kernel = app.kernel_class.instance(parent=app, log=app.log, profile_dir=app.profile_dir, user_ns=app.user_ns)
    inline = sys.modules.get("matplotlib_inline.backend_inline")
    if inline is not None:
        inline._enable_matplotlib_integration()
    _PREPARED = (app, kernel, list(options))


def _warm_up():
    """Runs one plotting cell and one expression through the prepared shell,
    output discarded, so their code paths are warm in kernels forked later;
    the namespace and the results' caches are put back."""
    from jupyter_client.session import Session

    if _PREPARED is None:
        return
    shell = _PREPARED[1].shell
    user_ns = dict(shell.user_ns)
    hook, pub = shell.displayhook, shell.display_pub
    session = Session(key=b"template warm-up")
    try:
        for o in (hook, pub):
            o.session, o.pub_socket = session, _Discard()
        cells = ["x = 1\nx"]
        if "matplotlib.pyplot" in sys.modules:
            cells.insert(0, "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()")
        for cell in cells:
            result = shell.run_cell(cell, store_history=False)
            if not result.success:
                raise RuntimeError(f"warm-up cell failed: {result.error_in_exec or result.error_before_exec!r}")
    finally:
        if "matplotlib.pyplot" in sys.modules:
            sys.modules["matplotlib.pyplot"].close("all")
        for o in (hook, pub):
            o.session = o.pub_socket = None
        shell.user_ns.clear()
        shell.user_ns.update(user_ns)
        for name in ("_", "__", "___"):
            if hasattr(hook, name):
                setattr(hook, name, "")
        shell.last_execution_result = None


def _immortal_refcount():
    """The reference count that makes an object immortal on this interpreter
    (None's, low 32 bits), or None where objects cannot be made immortal
    this way: before 3.12 (every reference written), a free-threaded build
    (another layout), a big-endian machine, or another implementation."""
    import sysconfig

    if (
        sys.implementation.name != "cpython"
        or sys.version_info < (3, 12)
        or sysconfig.get_config_var("Py_GIL_DISABLED")
        or sys.byteorder != "little"
        or ctypes.sizeof(ctypes.c_void_p) != 8
    ):
        return None
    value = ctypes.c_uint32.from_address(id(None)).value
    # Immortal objects are those whose count, as a signed 32-bit number, is
    # negative: their references are never counted (3.12: PEP 683).
    return value if value & 0x80000000 else None


def _immortalize():
    """Makes every object the template has made immortal, as Python 3.12+
    makes None: its reference count is never written again.

    Why: CPython writes an object's reference count whenever a reference to
    it is taken or dropped, and a kernel forked from the template copies
    every page holding an object it so much as reads through (the plot of
    issue 13's table copied about 9 MB). Once immortal, the template's
    objects are read without writes, and their pages stay shared. The cost:
    they are never freed (the template keeps them all anyway), and about
    2 s of the template's CPU, once, after the warm-up.

    Every object reachable from the collector's lists is visited once (an
    immortal count marks it visited), with code objects' parts by hand (code
    objects are not traversed by the collector; the tuples of their variable
    names are made once, on first request). Returns how many objects
    were made immortal (0 where this interpreter cannot, see
    _immortal_refcount)."""
    import types

    immortal = _immortal_refcount()
    if immortal is None:
        return 0
    count = ctypes.c_uint32
    gc.unfreeze()  # gc.get_objects() leaves out the frozen ones
    todo = gc.get_objects()
    todo.append(sys.modules)
    made = 0
    referents = gc.get_referents
    code_type = types.CodeType
    while todo:
        o = todo.pop()
        slot = count.from_address(id(o))
        if slot.value & 0x80000000:
            continue  # immortal already (visited, or made so by Python)
        slot.value = immortal
        made += 1
        if type(o) is code_type:
            todo.extend(
                (o.co_consts, o.co_names, o.co_varnames, o.co_freevars, o.co_cellvars, o.co_filename,
                 o.co_name, o.co_qualname, o.co_linetable, o.co_exceptiontable)
            )  # fmt: skip (not co_code: a copy made on request)
        else:
            todo.extend(referents(o))
    gc.freeze()
    return made


def _reset_prepared():
    """After a failed _prepare: kernels make their application themselves."""
    global _PREPARED
    _PREPARED = None
    try:
        from ipykernel.ipkernel import IPythonKernel
        from ipykernel.kernelapp import IPKernelApp
        from ipykernel.zmqshell import ZMQInteractiveShell

        for cls in (IPKernelApp, IPythonKernel, ZMQInteractiveShell):
            cls.clear_instance()
    except Exception:
        pass


def _finish_prepared(argv):
    """In a forked kernel: the rest of ipykernel's start (IPKernelApp's
    initialize, as the installed version runs it) on the template's
    application and kernel object. Returns the application, initialized."""
    import contextvars
    import uuid

    from IPython.core.application import BaseIPythonApplication
    from IPython.utils.path import get_home_dir

    app, kernel, options = _PREPARED
    i = argv.index("-f")
    conn, rest = argv[i + 1], argv[:i] + argv[i + 2 :]
    if rest != options:
        raise RuntimeError(f"kernel options {rest} differ from the template's {options}")
    shell = kernel.shell
    cwd = os.getcwd()
    ipython_dir = os.environ.get("IPYTHONDIR", shell.ipython_dir)
    # The shell's folders are this kernel's (the template's are unreachable).
    shell.ipython_dir = ipython_dir
    shell.starting_dir = cwd
    shell.home_dir = get_home_dir()
    dir_hist = getattr(shell.history_manager, "dir_hist", None)
    if dir_hist is not None:
        dir_hist[:] = [cwd]

    configure = BaseIPythonApplication.initialize
    kernel_class = type(kernel)
    make_kernel = kernel_class.__dict__.get("instance")

    def own_config(self, argv=None):
        # The template parsed the options; the connection file and profile
        # folder are this kernel's.
        self.connection_file = conn
        self.ipython_dir = ipython_dir
        self.profile_dir = None
        self.init_profile_dir()

    def adopt(cls, parent=None, user_ns=None, **own):
        # What IPythonKernel.__init__ takes from init_kernel's arguments.
        for name, value in own.items():
            setattr(kernel, name, value)
        kernel.ident = str(uuid.uuid4())
        kernel._stdout, kernel._stderr = sys.stdout, sys.stderr
        kernel._shell_context = contextvars.copy_context()
        debugger = getattr(kernel, "debugger", None)
        if debugger is not None:
            kernel.debugger = kernel.debugger_class(
                kernel.log,
                kernel.debugpy_stream,
                kernel._publish_debug_event,
                kernel.debug_shell_socket,
                kernel.session,
                kernel._kernel_modules,
                kernel.debug_just_my_code,
                kernel.filter_internal_frames,
            )
        shell.profile_dir = kernel.profile_dir
        shell.displayhook.session = kernel.session
        shell.displayhook.pub_socket = kernel.iopub_socket
        shell.displayhook.topic = kernel._topic("execute_result")
        shell.display_pub.session = kernel.session
        shell.display_pub.pub_socket = kernel.iopub_socket
        name = os.environ.get("JPY_SESSION_NAME")
        if name:
            shell.user_ns["__session__"] = name
        return kernel

    def init_code():
        # IPython's init_code, but for its last line: a set of every
        # module's name (for `%reset --aggressive`), which reads every name
        # and so copied about 2.7 MB of shared pages per kernel. The
        # template made that set; a name a kernel imported before its first
        # cell is one `%reset --aggressive` would keep.
        app._run_startup_files()
        app._run_exec_lines()
        app._run_exec_files()
        if app.hide_initial_ns:
            shell.user_ns_hidden.update(shell.user_ns)
        app._run_cmd_line_code()
        app._run_module()
        sys.stdout.flush()
        sys.stderr.flush()
        shell._sys_modules_keys = _MODULE_NAMES

    from IPython.core.shellapp import InteractiveShellApp

    if type(app).init_code is InteractiveShellApp.init_code and _MODULE_NAMES is not None:
        app.init_code = init_code
    BaseIPythonApplication.initialize = own_config
    kernel_class.instance = classmethod(adopt)
    try:
        app.initialize()
    finally:
        app.__dict__.pop("init_code", None)
        BaseIPythonApplication.initialize = configure
        if make_kernel is None:
            del kernel_class.instance
        else:
            kernel_class.instance = make_kernel
    if app.kernel is not kernel or kernel.session is None:
        raise RuntimeError("the template's kernel object was not adopted")
    app._mcp_from_template = True  # what tests/fork.rs looks for
    return app


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
# Where the template's children are born between forks (see _fork).
_OWN_PID_NS = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)


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
    # Folders derived from the environment and memoised in the template
    # (its own, which no kernel may reach) are found again from this one.
    import tempfile

    tempfile.tempdir = None
    mpl = sys.modules.get("matplotlib")
    memo = getattr(mpl, "_logged_cached", None)
    for name, fmt in (("get_configdir", "CONFIGDIR=%s"), ("get_cachedir", "CACHEDIR=%s")):
        found = getattr(getattr(mpl, name, None), "__wrapped__", None)
        if memo is not None and found is not None:
            setattr(mpl, name, memo(fmt)(found))
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

    if _PREPARED is None:
        from ipykernel.kernelapp import IPKernelApp

        app = IPKernelApp.instance()
        app.initialize()
        # matplotlib's inline backend, chosen in the template, is wired to
        # this kernel's shell now, as its import does in a launched kernel.
        inline = sys.modules.get("matplotlib_inline.backend_inline")
        if inline is not None:
            try:
                inline._enable_matplotlib_integration()
            except Exception:
                pass
    else:
        app = _finish_prepared(req["argv"])
    app.start()


def _enter(req, report, spaces):
    """In the forked kernel, already a process of the wrapper's PID
    namespace (see _fork), still root and single-threaded: enters the rest
    of the prepared environment."""
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
    # The mount namespace last: it changes what /proc is.
    for ns, flag in (("net", _CLONE_NEWNET), ("mnt", _CLONE_NEWNS)):
        _check(_libc.setns(spaces[ns], flag), f"setns {flag:#x}")
    # Nothing of the template's survives but stdio and the report pipe.
    os.closerange(3, report)
    os.closerange(report + 1, 65536)


def _run_kernel(req, report, spaces):
    code = 1
    try:
        _enter(req, report, spaces)
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


# Kernels are the template's children (one fork each): a pidfd of each ->
# (its pid, the wrapper's stdin or None). When a kernel ends, the template
# reaps it and writes `exit CODE` on its wrapper's stdin (the server's
# lifeline pipe, which the wrapper reads): the wrapper, the namespace's
# init, then exits with that code, as it would for a child of its own.
# Kernels that failed before they were confined are reaped silently (their
# wrapper is told to launch a kernel instead).
_KERNELS = {}
# The names in sys.modules at the last fork (see init_code in _finish_prepared).
_MODULE_NAMES = None


def _fork(req):
    if _threads() != 1:
        return {"ok": False, "error": f"the template has {_threads()} threads; refusing to fork"}
    # The module names a kernel's %reset --aggressive keeps (see init_code
    # in _finish_prepared), made again only if modules were added.
    global _MODULE_NAMES
    if _MODULE_NAMES is None or len(_MODULE_NAMES) != len(sys.modules):
        _MODULE_NAMES = set(sys.modules)
    # What the template made since its last fork is frozen too: a kernel's
    # collections never scan (so never write) the template's objects.
    gc.freeze()
    wrapper = int(req["wrapper_pid"])
    report_to = os.open(f"/proc/{wrapper}/fd/0", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    spaces = {}
    r = w = -1
    try:
        for ns in ("net", "pid", "mnt"):
            spaces[ns] = os.open(f"/proc/{wrapper}/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
        r, w = os.pipe()
        # Our children are born in the wrapper's PID namespace, until we
        # point this back at our own.
        _check(_libc.setns(spaces["pid"], _CLONE_NEWPID), "setns pid")
        pid = os.fork()
        if pid == 0:
            os.close(r)
            _run_kernel(req, w, spaces)  # never returns
    except BaseException:
        for fd in (r, report_to):
            if fd >= 0:
                os.close(fd)
        raise
    finally:
        # Only the template gets here (the kernel ends in _run_kernel).
        if _libc.setns(_OWN_PID_NS, _CLONE_NEWPID) != 0:
            # Every later kernel would be born in that kernel's namespace.
            _fail("cannot return to the template's own PID namespace; exiting")
            os._exit(4)
        for fd in spaces.values():
            os.close(fd)
        if w >= 0:
            os.close(w)
    watch = os.pidfd_open(pid)
    chunks = []
    while True:
        b = os.read(r, 4096)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    line = b"".join(chunks).decode(errors="replace").strip().splitlines()
    if line and line[0].startswith("ok "):
        _KERNELS[watch] = (pid, report_to)
        # `startup`: the kernel has _mcp_startup (see _load_startup).
        return {"ok": True, "ns_pid": int(line[0][3:]), "startup": "_mcp_startup" in sys.modules}
    os.close(report_to)
    _KERNELS[watch] = (pid, None)
    return {"ok": False, "error": line[0] if line else "the kernel ended before it was confined"}


def _reap(watch, poller):
    """The kernel `watch` is a pidfd of has ended: reaps it and tells its
    wrapper how it ended."""
    pid, report_to = _KERNELS.pop(watch)
    poller.unregister(watch)
    os.close(watch)
    try:
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    except ChildProcessError:
        code = 1
    if report_to is not None:
        try:
            os.write(report_to, f"exit {128 - code if code < 0 else code}\n".encode())
        except OSError:
            pass  # the wrapper is gone already
        os.close(report_to)


def _serve(control, buf, serve, limit=None):
    """Serves the requests on `control` (a descriptor; `buf` what was read
    of it already), reaping kernels as they end, until `limit` requests
    were served (None: until the server closes the pipe). Returns what was
    read beyond them, or None at the pipe's end."""
    import select

    poller = select.poll()
    poller.register(control, select.POLLIN)
    for watch in _KERNELS:
        poller.register(watch, select.POLLIN)
    served = 0
    while limit is None or served < limit:
        if b"\n" in buf:
            raw, buf = buf.split(b"\n", 1)
            serve(raw)
            served += 1
            for watch in _KERNELS:
                poller.register(watch, select.POLLIN)  # new ones (re-registering is harmless)
            continue
        for fd, _ in poller.poll():
            if fd == control:
                chunk = os.read(control, 65536)
                if not chunk:
                    return None
                buf += chunk
            elif fd in _KERNELS:
                _reap(fd, poller)
    return buf


def main():
    # After our name (a marker): ipykernel's options, then the modules.
    options = [a for a in sys.argv[2:] if a.startswith("--")]
    modules = [m for m in sys.argv[2:] if m and not m.startswith("--")]
    # The control pipe gets its own descriptors; whatever an import prints
    # goes to stderr. (Both are closed in every kernel.)
    control = os.dup(0)
    out = os.fdopen(os.dup(1), "wb")
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    gc.disable()
    _preload(modules)
    # Done here rather than in each kernel, the first one included: cheaper
    # once in the template than in a kernel, where every page touched is
    # copied.
    try:
        _load_startup()
    except Exception as e:
        _fail(f"cannot load the start-up code: {e!r}")
    try:
        _prepare(options)
    except Exception as e:
        _reset_prepared()  # kernels then make their application themselves
        _fail(f"cannot prepare ipykernel's objects: {e!r}")
    if _threads() != 1:
        _fail(f"{_threads()} threads after the imports; forking would be unsafe")
        sys.exit(3)
    try:
        os.close(os.pidfd_open(os.getpid()))  # how kernels are watched (Linux 5.3)
    except (AttributeError, OSError) as e:
        _fail(f"cannot watch kernels with a pidfd: {e!r}")
        sys.exit(3)
    out.write(b'{"ready": true}\n')
    out.flush()

    def serve(raw):
        try:
            reply = _fork(json.loads(raw))
        except Exception as e:
            reply = {"ok": False, "error": repr(e)}
        out.write(json.dumps(reply).encode() + b"\n")
        out.flush()

    # No full collection ever runs here: it would write every object of the
    # template, and each page written here after a fork stops being shared
    # with the kernels forked before (it becomes theirs alone).
    #
    # The first request (the server's first kernel, a desktop client's first
    # call) is served before the warm-up; the next ones (the rest of the
    # pool) wait for its end, about 0.15 s, and get a warm shell.
    # (The server sends the requests it queued as soon as it reads `ready`:
    # the first one is given a moment to arrive. Nothing is buffered yet, so
    # select sees what the pipe holds.)
    import select

    buf = b""
    if select.select([control], [], [], 0.05)[0]:
        buf = _serve(control, buf, serve, limit=1)
        if buf is None:
            return
    try:
        _warm_up()
    except Exception as e:
        _fail(f"warm-up failed: {e!r}")
    try:
        import time

        started = time.monotonic()
        made = _immortalize()
        if made:
            sys.stderr.write(f"kernel template: {made} objects made immortal in {time.monotonic() - started:.2f} s\n")
    except Exception as e:
        _fail(f"cannot make the template's objects immortal: {e!r}")
    if _threads() != 1:
        _fail(f"{_threads()} threads after the warm-up; forking would be unsafe")
        sys.exit(3)
    sys.stderr.write("kernel template: warm-up done\n")
    sys.stderr.flush()
    _serve(control, buf, serve)


if __name__ == "__main__":
    main()
