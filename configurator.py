"""nanoGPT-style configuration: a script's globals are its defaults, overridden by config files (plain Python
assignments), then by --key=value. An unknown key or a wrongly typed value is a one-line error naming it, and where."""
import ast
import contextlib
import sys
import traceback


class ConfigError(ValueError):
    pass


def _read(path):
    """A config file's settings: [(key, value, "path:line")]; its imports and helpers are not settings."""
    try:
        tree = ast.parse(open(path).read(), filename=path)
    except OSError:
        raise ConfigError(f"config file {path} not found") from None
    except SyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    except ValueError:  # not UTF-8, or NUL bytes
        raise ConfigError(f"config file {path} is not Python source text") from None
    scope = {}
    try:
        exec(compile(tree, path, "exec"), scope)
    except Exception as e:  # a config file is Python: it can raise anything, on any line
        line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__)) if f.filename == path), "?")
        raise ConfigError(f"{path}:{line}: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}") from None
    lines = {t.id: node.lineno for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
             if isinstance(t, ast.Name)}
    return [(k, v, f"{path}:{lines[k]}") for k, v in scope.items() if not k.startswith("_") and k in lines]


def configure(g, argv=None):
    """Applies config files and --key=value overrides to g (a script's globals()); returns every public setting."""
    keys = {k for k, v in g.items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, type(None)))}
    for arg in sys.argv[1:] if argv is None else argv:
        if not arg.startswith("--"):
            settings = _read(arg)
        else:
            key, eq, text = arg[2:].partition("=")
            if not eq:
                raise ConfigError(f"{arg}: overrides are written --key=value")
            settings = [(key, text, f"--{key}")]
        for key, value, where in settings:
            if key not in keys:
                raise ConfigError(f"{where}: unknown config key '{key}'")
            default = g[key]
            if where.startswith("--") and not isinstance(default, str):  # --out_dir=123 stays a str
                with contextlib.suppress(ValueError, SyntaxError):  # a bare word stays a string
                    value = ast.literal_eval(value)
            # None defaults take anything; ints widen to floats; otherwise the type must match exactly
            if isinstance(default, float) and type(value) is int:
                value = float(value)
            elif not (default is None or value is None or type(value) is type(default)):
                raise ConfigError(f"{where}: {key} must be {type(default).__name__}, got {value!r}")
            g[key] = value
    return {k: g[k] for k in sorted(keys)}
