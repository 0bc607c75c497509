"""
nanoGPT-style configuration: a stage script's module globals are its defaults, and

    python train.py configs/hybrid_d20.py --max_iters=100 --block_pattern=TMMM

overrides them, first from config files (plain Python assignments), then from --key=value.
Unlike nanoGPT's exec'd configurator, a typo fails loudly: an unknown key or a value of the wrong
type is a one-line error that names the key (and the file and line when it comes from a file).
"""
import ast
import sys
import traceback


class ConfigError(ValueError):
    pass


def _coerce(key, value, default, where):
    # None defaults take anything; ints widen to floats; otherwise the type must match exactly
    if default is None or value is None or type(value) is type(default):
        return value
    if isinstance(default, float) and type(value) is int:
        return float(value)
    raise ConfigError(f"{where}: {key} must be {type(default).__name__}, got {value!r}")


def _parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word is a string: --block_pattern=TM


def configure(g, argv=None):
    """Apply config files and --key=value overrides to the dict g (a script's globals()).
    Returns the resolved config: every public int/float/bool/str/None global, for logging and checkpoints."""
    argv = sys.argv[1:] if argv is None else argv
    keys = {k for k, v in g.items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, type(None)))
            and not callable(v)}
    for arg in argv:
        if not arg.startswith("--"):
            try:
                src = open(arg).read()
                tree = ast.parse(src, filename=arg)
            except OSError:
                raise ConfigError(f"config file {arg} not found") from None
            except SyntaxError as e:
                raise ConfigError(f"{arg}:{e.lineno}: syntax error: {e.msg}") from None
            except ValueError:  # not UTF-8, or NUL bytes
                raise ConfigError(f"config file {arg} is not Python source text") from None
            scope = {}
            try:
                exec(compile(tree, arg, "exec"), scope)
            except Exception as e:  # a config file is Python: it can raise anything, on any line
                line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__)) if f.filename == arg), "?")
                raise ConfigError(f"{arg}:{line}: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}") from None
            lines = {t.id: node.lineno for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
                     if isinstance(t, ast.Name)}
            for key, value in scope.items():
                if key.startswith("_") or key not in lines:
                    continue  # imports and helpers in a config file are not settings
                where = f"{arg}:{lines[key]}"
                if key not in keys:
                    raise ConfigError(f"{where}: unknown config key '{key}'")
                g[key] = _coerce(key, value, g[key], where)
        else:
            key, eq, text = arg[2:].partition("=")
            if not eq:
                raise ConfigError(f"{arg}: overrides are written --key=value")
            if key not in keys:
                raise ConfigError(f"--{key}: unknown config key '{key}'")
            value = text if isinstance(g[key], str) else _parse_value(text)  # --out_dir=123 stays a str
            g[key] = _coerce(key, value, g[key], f"--{key}")
    return {k: g[k] for k in sorted(keys)}

