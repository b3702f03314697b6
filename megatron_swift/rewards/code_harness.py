"""Assert-style tests whose verdict the tested code cannot reach: the harness and the solution run in two
boxes, and only plain data crosses between them.

This file runs INSIDE the sandbox boxes (``python -I -S harness.py ROLE ...``, standard library only); the
trainer imports it only to read its source and, in tests, its codec.

* ``serve R W main.py`` (the solution's box): runs the completion's code as ``__main__``, says which
  names it defined, then answers requests on fd R / W: call an object, get an attribute or item, its
  length, its items. Results go back as plain data (None, bool, int, float, str, bytes, complex, and
  lists, tuples, sets, frozensets and dicts of them); anything else stays in the box and is sent as a
  numbered handle.
* ``judge R W`` (the harness's box): reads ``{"nonce", "test"}`` on stdin, runs the test statements with
  the solution's names bound to proxies, and prints ``<nonce> {"passed": ...}`` last. The expected
  values never leave this box. Every value that comes back is rebuilt here from JSON as an exact builtin
  type, so no ``__eq__``, ``__hash__`` or ``__bool__`` of the solution's runs here; a handle cannot be
  compared, hashed or used as a truth value (TypeError: the test fails). Names of builtins and of
  standard-library modules always mean this box's own (a solution's ``abs`` or ``math`` cannot stand in
  for the test's). Lists, dicts, sets and bytearrays passed as arguments are copied back after the call,
  so tests of in-place functions work.

Whatever the solution does (exit, ``os._exit``, excepthooks, printing a marker, a hang, a crash), the
harness prints ``passed: true`` only when the test's statements ran to their end in its own process.
"""
import base64
import builtins
import json
import os
import sys

MAX_MESSAGE = 4 * 1024 * 1024
_TAGS = ("$tuple", "$set", "$frozenset", "$dict", "$bytes", "$bytearray", "$complex", "$ref")


class NotPlainData(TypeError):
    """A value that cannot cross the boundary as plain data."""


# ------------------------------------------------------------------------------------------ the codec

def encode(value, ref=None, depth=0):
    """JSON-ready plain data; objects that are not go through ``ref`` (a handle) or raise NotPlainData.
    Subclasses are sent as their plain base (a namedtuple as a tuple, an IntEnum as an int)."""
    if depth > 100:
        raise NotPlainData("nested too deeply")
    if value is None or type(value) is bool:
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__index__(value)
    if isinstance(value, float):
        return float.__float__(value)
    nested = lambda items: [encode(v, ref, depth + 1) for v in items]  # noqa: E731
    if isinstance(value, complex):
        return {"$complex": [value.real, value.imag]}
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, bytearray):
        return {"$bytearray": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, tuple):
        return {"$tuple": nested(tuple.__iter__(value))}
    if isinstance(value, list):
        return nested(list.__iter__(value))
    if isinstance(value, frozenset):
        return {"$frozenset": nested(frozenset.__iter__(value))}
    if isinstance(value, set):
        return {"$set": nested(set.__iter__(value))}
    if isinstance(value, dict):
        return {"$dict": [[encode(k, ref, depth + 1), encode(v, ref, depth + 1)] for k, v in dict.items(value)]}
    if ref is not None:
        return {"$ref": ref(value)}
    raise NotPlainData(f"a {type(value).__name__} is not plain data")


def decode(data, ref=None, depth=0):
    """The value ``encode`` made, as exact builtin types; handles through ``ref``."""
    if depth > 100:
        raise NotPlainData("nested too deeply")
    kind = type(data)
    if data is None or kind in (bool, int, float, str):
        return data
    if kind is list:
        return [decode(v, ref, depth + 1) for v in data]
    if kind is not dict or len(data) != 1:
        raise NotPlainData(f"malformed value {str(data)[:80]}")
    (tag, body), = data.items()
    items = lambda: [decode(v, ref, depth + 1) for v in body]  # noqa: E731
    if tag == "$tuple":
        return tuple(items())
    if tag == "$set":
        return set(items())
    if tag == "$frozenset":
        return frozenset(items())
    if tag == "$dict":
        return {decode(k, ref, depth + 1): decode(v, ref, depth + 1) for k, v in body}
    if tag == "$bytes":
        return base64.b64decode(body)
    if tag == "$bytearray":
        return bytearray(base64.b64decode(body))
    if tag == "$complex":
        return complex(float(body[0]), float(body[1]))
    if tag == "$ref" and ref is not None and type(body) is int:
        return ref(body)
    raise NotPlainData(f"unknown tag {tag!r}")


class Channel:
    """Newline-delimited JSON messages over a pair of fds, each at most MAX_MESSAGE bytes."""

    def __init__(self, read_fd, write_fd):
        self.reader = os.fdopen(int(read_fd), "rb")
        self.writer = os.fdopen(int(write_fd), "wb")

    def send(self, message):
        data = json.dumps(message, separators=(",", ":")).encode()
        if len(data) > MAX_MESSAGE:
            data = json.dumps({"error": ["ValueError", "message too large"]}).encode()
        self.writer.write(data + b"\n")
        self.writer.flush()

    def receive(self):
        line = self.reader.readline(MAX_MESSAGE + 1)
        if not line.endswith(b"\n"):
            raise EOFError("the solution's process ended or sent an oversized message")
        return json.loads(line)


# ------------------------------------------------------------------------------ the solution's box

def _export(namespace, objects):
    names = {}
    for name, value in list(namespace.items()):
        if name.startswith("__") or name in _BUILTIN_NAMES:
            continue
        module = getattr(value, "__name__", None) if type(value) is type(sys) else None
        if module is not None:
            names[name] = {"module": module}
        else:
            names[name] = {"value": _small(value, objects)}
    return names


def _small(value, objects):
    """A global as plain data, or as a handle when it is large (a big table stays in the box)."""
    try:
        data = encode(value)
        if len(json.dumps(data)) <= 65536:
            return data
    except (NotPlainData, ValueError, RecursionError):
        pass
    return {"$ref": objects.add(value)}


class _Objects:
    """The solution's objects the harness holds handles to."""

    def __init__(self):
        self.items = []

    def add(self, value):
        self.items.append(value)
        return len(self.items) - 1

    def get(self, index):
        return self.items[index]


def _handle(request, objects):
    op, target = request["op"], objects.get(request["ref"])
    decode_arg = lambda v: decode(v, objects.get)  # noqa: E731
    if op == "call":
        args = [decode_arg(a) for a in request["args"]]
        kwargs = {k: decode_arg(v) for k, v in request["kwargs"].items()}
        result = target(*args, **kwargs)
        mutable = (list, dict, set, bytearray)
        after = [encode(a, objects.add) if isinstance(a, mutable) else None for a in args]
        return {"ok": encode(result, objects.add), "after": after}
    if op == "getattr":
        return {"ok": encode(getattr(target, request["name"]), objects.add)}
    if op == "setattr":
        setattr(target, request["name"], decode_arg(request["value"]))
        return {"ok": None}
    if op == "getitem":
        return {"ok": encode(target[decode_arg(request["key"])], objects.add)}
    if op == "len":
        return {"ok": len(target)}
    if op == "list":
        return {"ok": encode(list(target), objects.add)}
    raise ValueError(f"unknown request {op!r}")


def serve(read_fd, write_fd, path):
    channel = Channel(read_fd, write_fd)
    namespace = {"__name__": "__main__", "__file__": path, "__builtins__": builtins}
    try:
        with open(path, encoding="utf-8") as f:
            exec(compile(f.read(), path, "exec"), namespace)
    except BaseException as e:  # noqa: BLE001 - SystemExit too: the module did not load
        channel.send({"ready": False, "error": _describe(e)})
        return
    objects = _Objects()
    channel.send({"ready": True, "names": _export(namespace, objects)})
    while True:
        try:
            request = channel.receive()
        except (EOFError, ValueError):
            return
        try:
            reply = _handle(request, objects)
        except BaseException as e:  # noqa: BLE001 - the harness decides what an error means
            reply = {"error": [type(e).__name__, str(e)[:500]]}
        channel.send(reply)


# ------------------------------------------------------------------------------ the harness's box

class RemoteError(Exception):
    """An exception raised in the solution's box whose type is not a builtin exception."""


_BUILTIN_NAMES = frozenset(dir(builtins))
_NOT_REMOTE = (StopIteration, StopAsyncIteration, GeneratorExit)


class Remote:
    """A handle to an object in the solution's box: it can be called, indexed, measured and iterated
    through requests, but never compared, hashed or tested for truth here."""

    __slots__ = ("_ref", "_client")

    def __init__(self, ref, client):
        object.__setattr__(self, "_ref", ref)
        object.__setattr__(self, "_client", client)

    def __call__(self, *args, **kwargs):
        return self._client.call(self._ref, args, kwargs)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._client.request({"op": "getattr", "ref": self._ref, "name": name})

    def __setattr__(self, name, value):
        self._client.request({"op": "setattr", "ref": self._ref, "name": name, "value": self._client.encode(value)})

    def __getitem__(self, key):
        return self._client.request({"op": "getitem", "ref": self._ref, "key": self._client.encode(key)})

    def __len__(self):
        n = self._client.request({"op": "len", "ref": self._ref})
        if type(n) is not int:
            raise TypeError("len() of a solution object is not an int")
        return n

    def __iter__(self):
        items = self._client.request({"op": "list", "ref": self._ref})
        if type(items) is not list:
            raise TypeError("a solution object did not iterate into a list")
        return iter(items)

    def _refuse(self, *args):
        raise TypeError("a value from the solution that is not plain data (int, str, list, dict, ...) "
                        "cannot be compared, hashed or tested for truth")

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __bool__ = __hash__ = __contains__ = _refuse

    def __repr__(self):
        return f"<solution object #{self._ref}>"


class Client:
    """The harness's side of the channel."""

    def __init__(self, channel):
        self.channel = channel

    def encode(self, value):
        def ref(obj):
            if type(obj) is Remote:
                return object.__getattribute__(obj, "_ref")
            raise NotPlainData(f"a {type(obj).__name__} cannot be passed to the solution")
        return encode(value, ref)

    def decode(self, data):
        return decode(data, lambda index: Remote(index, self))

    def request(self, message):
        return self.decode(self._exchange(message)["ok"])

    def call(self, ref, args, kwargs):
        reply = self._exchange({"op": "call", "ref": ref, "args": [self.encode(a) for a in args],
                                "kwargs": {str(k): self.encode(v) for k, v in kwargs.items()}})
        for arg, after in zip(args, reply.get("after") or []):
            if after is not None:
                _copy_back(arg, self.decode(after))
        return self.decode(reply["ok"])

    def _exchange(self, message):
        """Send a request, return the reply; an error in the solution is raised here, as the builtin
        exception of that name where there is one (a test may expect ``ValueError``)."""
        self.channel.send(message)
        reply = self.channel.receive()
        if type(reply) is not dict:
            raise RemoteError("malformed reply")
        if "error" in reply:
            name, text = (list(reply["error"]) + ["", ""])[:2]
            error = getattr(builtins, name, None) if type(name) is str else None
            # StopIteration would end the test's own loops (all(), generators) as if they had finished
            if isinstance(error, type) and issubclass(error, Exception) and error not in _NOT_REMOTE:
                raise error(f"in the solution: {str(text)[:300]}")
            raise RemoteError(f"{name}: {str(text)[:300]}")
        return reply


def _copy_back(arg, new):
    """Make the harness's argument equal to what the call left in the solution's copy."""
    kind = type(arg)
    if kind is not type(new):
        return
    if kind in (list, bytearray):
        arg[:] = new
    elif kind in (dict, set):
        arg.clear()
        arg.update(new)


def _namespace(hello, client):
    """The test's globals: the solution's names (proxies or plain values), never shadowing a builtin or
    a standard-library module."""
    stdlib = getattr(sys, "stdlib_module_names", frozenset())
    namespace = {}
    for name, spec in hello.get("names", {}).items():
        # the hello comes from the solution's process (its code can send its own): dunder names such as
        # __builtins__ would hand it every builtin and import of the test
        if type(name) is not str or not name.isidentifier() or name.startswith("__") or name in _BUILTIN_NAMES \
                or name in stdlib or type(spec) is not dict:
            continue
        if "module" in spec:
            module = spec["module"]
            if type(module) is str and module.split(".")[0] in stdlib:
                try:
                    namespace[name] = __import__(module, fromlist=["_"])
                except ImportError:
                    pass
            continue
        namespace[name] = client.decode(spec["value"])
    for module in stdlib:  # a test that leans on the solution's ``import math`` gets the real one
        if module in hello.get("names", {}) and module not in namespace:
            try:
                namespace[module] = __import__(module)
            except ImportError:
                pass
    namespace.update({"__name__": "__test__", "__builtins__": builtins})  # last: nothing overrides them
    return namespace


def judge(read_fd, write_fd):
    job = json.loads(sys.stdin.read())
    nonce = job["nonce"]
    verdict = {"passed": False}
    try:
        client = Client(Channel(read_fd, write_fd))
        hello = client.channel.receive()
        if not hello.get("ready"):
            verdict["error"] = f"the solution did not load: {str(hello.get('error'))[:300]}"
        else:
            exec(compile(job["test"], "<test>", "exec"), _namespace(hello, client))
            verdict = {"passed": True}
    except BaseException as e:  # noqa: BLE001 - any failure of the test is a failed test
        verdict["error"] = _describe(e)
    sys.stdout.write(f"\n{nonce} {json.dumps(verdict)}\n")
    sys.stdout.flush()


def _describe(error):
    return f"{type(error).__name__}: {str(error)[:300]}"


if __name__ == "__main__":
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(0)  # big integers are plain data too
    role = sys.argv[1]
    if role == "serve":
        serve(sys.argv[2], sys.argv[3], sys.argv[4])
    elif role == "judge":
        judge(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"unknown role {role!r}")
