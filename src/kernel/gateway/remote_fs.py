# Installed in every remote kernel as the module `_mcp_fs`: the server reaches
# the session folder on the gateway's side through it, with silent requests
# whose `user_expressions` call one function. Each returns a `_Json` whose
# repr is the JSON answer. Paths are walked folder by folder from the session
# folder with O_NOFOLLOW, so no symlink is ever followed (the local backend's
# rule); a kernel can of course change its own folder as it likes, so this
# protects the server's answers, not the folder.
def __mcp_install_fs(root_rel, max_files):
    import base64
    import json
    import os
    import shutil
    import stat
    import sys
    import types

    mod = types.ModuleType("_mcp_fs")
    os.makedirs(root_rel, mode=0o700, exist_ok=True)
    root = os.path.abspath(root_rel)
    mod.ROOT = root

    class _Json:
        __slots__ = ("text",)

        def __init__(self, value):
            self.text = json.dumps(value, separators=(",", ":"))

        def __repr__(self):
            return self.text

    dir_flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

    def _parent(rel, create):
        # Opens the folder holding `rel`'s last component; returns (fd, name).
        parts = rel.split("/")
        fd = os.open(root, dir_flags)
        try:
            for part in parts[:-1]:
                if create:
                    try:
                        os.mkdir(part, 0o755, dir_fd=fd)
                    except FileExistsError:
                        pass
                nxt = os.open(part, dir_flags, dir_fd=fd)
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        return fd, parts[-1]

    def _err(e):
        return _Json({"error": type(e).__name__, "detail": str(e)})

    def snap():
        # ipykernel flushes the cell's streams after the user expressions
        # (this one runs in every call's request): flush first, so that a
        # file the cell made its sys.stdout has its size of after the call.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        files = []
        truncated = False
        stack = [("", root)]
        try:
            while stack and not truncated:
                prefix, path = stack.pop()
                try:
                    entries = list(os.scandir(path))
                except OSError:
                    continue
                for e in entries:
                    rel = prefix + e.name
                    try:
                        st = e.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if stat.S_ISDIR(st.st_mode):
                        stack.append((rel + "/", e.path))
                    elif stat.S_ISREG(st.st_mode):
                        if len(files) >= max_files:
                            truncated = True
                            break
                        files.append([rel, st.st_size, st.st_mtime_ns])
        except Exception as e:
            return _err(e)
        return _Json({"files": files, "truncated": truncated})

    def read(rel, max_bytes):
        try:
            fd, name = _parent(rel, False)
            try:
                f = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
            finally:
                os.close(fd)
            try:
                st = os.fstat(f)
                if stat.S_ISDIR(st.st_mode):
                    return _Json({"error": "IsADirectoryError", "detail": rel})
                if not stat.S_ISREG(st.st_mode):
                    return _Json({"error": "NotAFile", "detail": rel})
                if st.st_size > max_bytes:
                    return _Json({"error": "TooLarge", "size": st.st_size})
                chunks = []
                left = max_bytes + 1
                while left > 0:
                    b = os.read(f, min(left, 1 << 20))
                    if not b:
                        break
                    chunks.append(b)
                    left -= len(b)
                data = b"".join(chunks)
                if len(data) > max_bytes:
                    return _Json({"error": "TooLarge", "size": len(data)})
            finally:
                os.close(f)
        except Exception as e:
            return _err(e)
        return _Json({"data": base64.b64encode(data).decode("ascii"), "size": len(data)})

    def write(rel, data_b64, mode):
        # mode: "excl" (never over an existing name), "replace" (a temporary
        # file renamed over the name), "append" (create or add to the end).
        try:
            data = base64.b64decode(data_b64)
            fd, name = _parent(rel, True)
            try:
                if mode == "replace":
                    tmp = ".%s.mcp-upload-%s" % (name, os.urandom(6).hex())
                    f = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=fd)
                else:
                    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                    flags |= os.O_EXCL if mode == "excl" else os.O_APPEND
                    f = os.open(name, flags, 0o644, dir_fd=fd)
                try:
                    view = memoryview(data)
                    while view:
                        n = os.write(f, view)
                        view = view[n:]
                    st = os.fstat(f)
                finally:
                    os.close(f)
                if mode == "replace":
                    os.rename(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
            finally:
                os.close(fd)
        except Exception as e:
            return _err(e)
        return _Json({"size": st.st_size, "mtime": st.st_mtime_ns})

    def remove():
        try:
            shutil.rmtree(root)
        except FileNotFoundError:
            pass
        except Exception as e:
            return _err(e)
        return _Json({})

    mod.snap, mod.read, mod.write, mod.remove = snap, read, write, remove
    sys.modules["_mcp_fs"] = mod
    return root
