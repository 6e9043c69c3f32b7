"""
The command line shared by coin's entry points (coin.py, data.py, eval.py, coin_mini.py, study.py): --key=value
settings over a dataclass, one line of help per setting taken from the comment beside it, every bad setting reported
at once, user errors as plain lines with exit status 2, and progress that stays quiet in log files.

It imports nothing heavy, so `--help` and a rejected setting answer in well under a second, before torch loads.
"""
import ast
import dataclasses
import difflib
import math
import os
import sys
import time

USER_ERROR_STATUS = 2  # what a shell sees when coin refuses its input (a bug in coin exits 1, with a traceback)


class UserError(ValueError):
    """Bad user input (a setting, a file, a record): the message is one line per problem, each naming the setting or
    the file and the fix. The entry points print it without a traceback and exit with USER_ERROR_STATUS; any other
    exception is a bug in coin and keeps its traceback."""


class MissingFile(UserError, FileNotFoundError):
    """A user error about a file or folder that does not exist."""


def print0(*a, **k):
    """print, on rank 0 only (torchrun sets RANK), flushed."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)


def run(main, argv):
    """Call an entry point's main(argv); a UserError becomes its message on stderr (rank 0 only under torchrun: every
    rank checks the same inputs and would print the same lines) and exit status 2. main's return value is the exit
    status (None: 0)."""
    try:
        status = main(argv)
    except UserError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print("\n".join(f"error: {line}" for line in str(e).splitlines()), file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_STATUS)
    sys.exit(status or 0)


def out_folder_problem(path, setting="--out"):
    """Why `path` cannot be the folder an entry point writes into (it, or a folder above it, is a file), or None."""
    above = os.path.abspath(path)
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if os.path.isdir(above):
        return None
    where = "" if above == os.path.abspath(path) else f"{above}, a folder above it, "
    return f"{setting}={path}: {where}is a file, not a folder: give a folder to write into (made if missing)"


# -----------------------------------------------------------------------------
# Help from the source: each setting's comment, read from the file the dataclass is written in

@dataclasses.dataclass
class SettingDoc:
    name: str
    type: str      # the annotation as written: int, float, str, bool
    default: str   # the default as written
    help: str      # the comment beside it (continued on the following comment lines), joined into one line
    group: str     # the `# --- group` heading above it, if any


def read_setting_docs(path, class_name):
    """[SettingDoc] of the dataclass `class_name` in the Python file `path`, by reading its source (not importing it:
    coin.py answers --help this way before torch loads). A setting's help is its end-of-line comment and the comment
    lines indented under it; a comment block just above a setting without one stands in for it."""
    with open(path) as f:
        source = f.read()
    node = next((n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == class_name), None)
    assert node is not None, f"{path} has no class {class_name}"
    return docs_of_class(node, source)


def read_method_settings(path):
    """{method name: ([SettingDoc] of its Settings, its before_added)} of every class in the Python file `path` (coin's
    methods.py) that sets `name = "..."`, read from the source as read_setting_docs does; a method without settings
    has an empty list."""
    with open(path) as f:
        source = f.read()
    out = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        values = {t.id: n.value for n in node.body if isinstance(n, ast.Assign) for t in n.targets
                  if isinstance(t, ast.Name)}
        if "name" not in values:
            continue
        name = ast.literal_eval(values["name"])
        settings = next((n for n in node.body if isinstance(n, ast.ClassDef) and n.name == "Settings"), None)
        docs = docs_of_class(settings, source) if settings else []
        for d in docs:
            d.group = f"--method={name}"
        out[name] = (docs, ast.literal_eval(values["before_added"]) if "before_added" in values else {})
    return out


def setting_docs(path, class_name, methods_path):
    """[SettingDoc] of a command's whole settings: the dataclass `class_name` in `path`, then each method's own
    (read_method_settings of `methods_path`, a path beside `path`'s file)."""
    methods = read_method_settings(os.path.join(os.path.dirname(os.path.abspath(path)), methods_path))
    return read_setting_docs(path, class_name) + [d for docs, _ in methods.values() for d in docs]


def extend_settings(cls, more):
    """A dataclass named as `cls`, in its module, with its fields then those of each dataclass in `more`: how
    coin.py's Config takes in the methods' own settings. A name defined twice is an error."""
    fields = [(f.name, f.type, dataclasses.field(default=f.default)) for c in [cls, *more]
              for f in dataclasses.fields(c)]
    names = [f[0] for f in fields]
    twice = sorted(n for n in names if names.count(n) > 1)
    assert not twice, f"a setting is defined twice: {twice}"
    extended = dataclasses.make_dataclass(cls.__name__, fields)
    extended.__module__ = cls.__module__
    return extended


def docs_of_class(node, source):
    """[SettingDoc] of the dataclass whose ast.ClassDef is `node` in `source` (read_setting_docs)."""
    lines = source.splitlines()
    docs, group, block = [], "", []
    fields = {n.lineno: n for n in node.body if isinstance(n, ast.AnnAssign)}
    indent = min(n.col_offset for n in fields.values())
    for lineno in range(node.lineno + 1, (node.end_lineno or node.lineno) + 1):
        line = lines[lineno - 1]
        code, _, comment = line.partition("#")  # no '#' in coin's defaults; a default holding one would cut here
        comment = comment.strip()
        if lineno in fields:
            n = fields[lineno]
            docs.append(SettingDoc(n.target.id, source_segment(lines, n.annotation), source_segment(lines, n.value),
                                   comment or " ".join(block), group))
            block = []
        elif comment and not code.strip() and len(code) > indent and docs and not block:
            docs[-1].help += " " + comment  # a continuation, indented under the comment above
        elif comment and not code.strip() and comment.startswith("---"):
            group, block = comment.strip("- "), []
        elif comment and not code.strip():
            block.append(comment)
        else:
            block = []
    return docs


def source_segment(lines, node):
    """ast.get_source_segment from the source's lines (that function splits the whole source again at each call: a
    second a command line, read for every setting)."""
    text = [line.encode() for line in lines[node.lineno - 1:node.end_lineno]]  # ast's columns count UTF-8 bytes
    text[-1] = text[-1][:node.end_col_offset]
    text[0] = text[0][node.col_offset:]
    return b"\n".join(text).decode()


def help_text(docs, usage):
    """`usage`, then one line per setting: --name=default  help (grouped under their headings)."""
    out, group = [usage.rstrip(), "", "Settings (--key=value or --key value; true/false settings also as --key):"], None
    width = max(len(f"--{d.name}={d.default}") for d in docs) + 2
    for d in docs:
        if d.group != group and d.group:
            out.append(f" {d.group}")
        group = d.group
        default = d.default.lower() if d.type == "bool" else d.default
        out.append(f"  {f'--{d.name}={default}':<{width}}{d.help}")
    return "\n".join(out)


def wants_help(argv):
    return any(a in ("-h", "--help") for a in argv)


def exit_with_help(docs, usage):
    """Print `usage` and the help of the settings `docs` ([SettingDoc]), then exit 0."""
    print(help_text(docs, usage))
    sys.exit(0)


# -----------------------------------------------------------------------------
# Parsing: --key=value or --key value into a dataclass; unknown keys and wrong types are errors, all reported at once

def suggest(key, names):
    """Settings a mistyped `key` may have meant: close spellings (difflib), a setting named by the key's initials
    (learning_rate -> lr), settings sharing a word of the key (batch_size -> micro_batch)."""
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    words = [w for w in key.split("_") if w]
    initials = "".join(w[0] for w in words)
    close += [n for n in names if len(words) > 1 and n == initials]
    close += [n for n in names if any(len(w) > 2 and w in n.split("_") for w in words)]
    return list(dict.fromkeys(close))[:4]


def convert(key, typ, text):
    """(value, None) or (None, problem): `text` as a `typ` setting; floats must be finite."""
    if typ is bool:
        if text.lower() in ("1", "true"):
            return True, None
        if text.lower() in ("0", "false"):
            return False, None
        return None, f"--{key}={text}: takes true or false"
    try:
        value = typ(text)
    except ValueError:
        kind = {int: "a whole number", float: "a number"}.get(typ, typ.__name__)
        return None, f"--{key}={text}: takes {kind}"
    if typ is float and not math.isfinite(value):
        return None, f"--{key}={text}: takes a finite number"
    return value, None


def parse(cls, argv, usage, rules=None, docs=None):
    """(settings, the keys the command line gave) from `argv` over the dataclass `cls` (whose defaults give the
    types), each value checked against its rule in `rules` ({setting: Rule}, see check). `--help` prints `usage` and
    every setting's help line (`docs`, default: read from `cls`'s source), then exits. Every problem found, of any
    setting, goes into one UserError."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if wants_help(argv):
        exit_with_help(docs or read_setting_docs(sys.modules[cls.__module__].__file__, cls.__name__), usage)
    values, problems, args = {}, [], list(argv)
    hint = f"`python {os.path.basename(sys.modules[cls.__module__].__file__)} --help` lists the settings"
    while args:
        arg = args.pop(0)
        key, eq, text = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or key not in fields:
            close = suggest(key, list(fields)) if arg.startswith("--") else []
            problems.append(f"unknown setting {arg!r}: " + (f"did you mean {', '.join('--' + c for c in close)}?"
                                                             if close else hint))
            continue
        typ = type(fields[key].default)
        if not eq and args and not args[0].startswith("--") and (
                typ is not bool or args[0].lower() in ("1", "true", "0", "false")):
            eq, text = "=", args.pop(0)  # --key value, as torchrun users type it (--tasks all)
        if typ is bool and not eq:
            values[key] = True
            continue
        if not eq:
            problems.append(f"--{key} needs a value: --{key}=VALUE or --{key} VALUE")
            continue
        value, problem = convert(key, typ, text)
        if problem:
            problems.append(problem)
        else:
            values[key] = value
    settings = cls(**values)
    problems += check(settings, rules) if rules else []
    if problems:
        raise UserError("\n".join(problems))
    return settings, set(values)


# -----------------------------------------------------------------------------
# Validation: a table {setting: rule} beside each settings dataclass; check() reports every broken rule at once

@dataclasses.dataclass(frozen=True)
class Rule:
    test: object   # value -> bool
    says: str      # what the setting must be, as the error message puts it


def at_least(low):
    return Rule(lambda v: v >= low, f"at least {low}")


def between(low, high, low_open=False, high_open=False):
    return Rule(lambda v: (low < v if low_open else low <= v) and (v < high if high_open else v <= high),
                f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")


def one_of(*choices):
    return Rule(lambda v: v in choices, f"one of {', '.join(map(str, choices))}")


POSITIVE = Rule(lambda v: v > 0, "greater than 0")
ANY = Rule(lambda v: True, "")


def check(settings, rules):
    """Problem lines for every setting of the dataclass instance `settings` that breaks its rule in `rules` (a setting
    without a rule takes any value of its type)."""
    problems = []
    for f in dataclasses.fields(settings):
        value, rule = getattr(settings, f.name), rules.get(f.name, ANY)
        if not rule.test(value):
            problems.append(f"--{f.name}={value}: must be {rule.says} (default: {f.default})")
    return problems


# -----------------------------------------------------------------------------
# Progress: tqdm's bar on a terminal; in a log file, a plain line now and then instead of carriage-return redraws

class LogLines:
    """A stand-in for a tqdm bar when stderr is not a terminal: iterates `iterable`, printing `desc: i/total` (with
    the last postfix) every `every` items unless the last line is under `min_seconds` old (a loop of a few seconds
    does not fill the log), after any item that ends `seconds` or more since the last line (a slow loop still shows
    where it is), and at the end; `every=None` prints nothing."""

    def __init__(self, iterable, desc, total, initial, every, min_seconds=1, seconds=60):
        self.iterable, self.desc, self.total, self.done = iterable, desc, total, initial
        self.every, self.min_seconds, self.seconds = every, min_seconds, seconds
        self.postfix, self.last = "", time.time()

    def set_postfix(self, **kw):
        self.postfix = " " + " ".join(f"{k}={v}" for k, v in kw.items())

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.done += 1
            if self.every is None:
                continue
            now = time.time()
            if (self.done == self.total or self.done % self.every == 0 and now - self.last >= self.min_seconds
                    or now - self.last >= self.seconds):
                self.last = now
                print(f"{self.desc}: {self.done}/{self.total}{self.postfix}", file=sys.stderr, flush=True)


def progress(iterable, desc=None, total=None, disable=False, initial=0, lines=10):
    """A progress bar over `iterable`: tqdm on a terminal; else (a log file, LogLines) about `lines` plain lines in
    all, and one at least every minute."""
    total = len(iterable) + initial if total is None else total
    if disable or desc is None:
        return LogLines(iterable, desc, total, initial, every=None)
    if sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(iterable, desc=desc, total=total, initial=initial, leave=False, mininterval=2)
    return LogLines(iterable, desc, total, initial, every=max(1, total // lines))
