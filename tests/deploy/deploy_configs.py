"""Read the real configuration code of the gateway and the worker, at test time, into one shape both can be checked with.

- gateway/src/config.ts: a zod object (``configSchema = z.object({ NAME: <zod expr>, ... })``) over process.env;
  the env name is the key.
- worker-py/src/llm_worker/config.py: a pydantic model whose field names, upper-cased, are the env names
  (``load_config`` reads ``env.get(name.upper())``).

Nothing is imported or executed: the files are parsed, so the checks need neither Node nor the worker's packages.
Each variable records its default and, where the code says so, its kind (int, bool, one of a set of values), so that the
deployment files can be checked for values the configs would refuse at start-up, not only for unknown names.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[2]
GATEWAY_CONFIG = REPO / "gateway/src/config.ts"
WORKER_CONFIG = REPO / "worker-py/src/llm_worker/config.py"

# Variables our files may set that neither config defines, because a library or runtime reads them instead.
# Keep this short: each entry is a deliberate exception.
EXTRA_ENV = {
    "gateway": {
        "NODE_ENV": "Node/Express production mode",
        "PATH": "the image's search path",
    },
    "worker": {
        "HF_HOME": "huggingface_hub/transformers cache folder",
        "HF_HUB_OFFLINE": "huggingface_hub: never reach the hub (bundled or mounted model)",
        "HF_TOKEN": "huggingface_hub: token for gated models",
        "PYTHONUNBUFFERED": "CPython: unbuffered stdout for container logs",
        "PATH": "the image's search path (the venv first)",
    },
}

_BOOL_WORDS = {"1", "0", "true", "false", "yes", "no", "on", "off", ""}


@dataclass
class Var:
    name: str
    kind: str = "str"  # str | int | bool | choice
    default: Any = None
    choices: tuple[str, ...] = ()
    minimum: Optional[int] = None
    maximum: Optional[int] = None

    def problem_with(self, value: str) -> Optional[str]:
        """Why the config would refuse this value at start-up, or None."""
        v = value.strip()
        if v == "":
            return None  # both configs treat an empty value as unset
        if self.kind == "int":
            if not re.fullmatch(r"-?\d+", v):
                return f"{self.name}={value!r} is not an integer"
            n = int(v)
            if self.minimum is not None and n < self.minimum or self.maximum is not None and n > self.maximum:
                return f"{self.name}={value!r} is outside [{self.minimum}, {self.maximum}]"
        if self.kind == "bool" and v.lower() not in _BOOL_WORDS:
            return f"{self.name}={value!r} is not a boolean word"
        if self.kind == "choice" and v not in self.choices:
            return f"{self.name}={value!r} is not one of {list(self.choices)}"
        return None


@dataclass
class ConfigInfo:
    component: str
    path: Path
    vars: dict[str, Var] = field(default_factory=dict)

    @property
    def names(self) -> set[str]:
        return set(self.vars)

    def allowed(self) -> set[str]:
        return self.names | set(EXTRA_ENV[self.component])

    def effective(self, env: dict[str, str], name: str) -> Any:
        """The value the process would run with: the one set in ``env`` or else the code's default."""
        if env.get(name, "").strip() != "":
            return env[name].strip()
        return self.vars[name].default if name in self.vars else None

    def check_env(self, env: dict[str, str], where: str) -> list[str]:
        problems = []
        for name, value in sorted(env.items()):
            if name not in self.allowed():
                problems.append(f"{where}: sets {name}, which {self.path.relative_to(REPO)} does not define")
            elif name in self.vars and value is not None:
                why = self.vars[name].problem_with(str(value))
                if why:
                    problems.append(f"{where}: {why}")
        return problems


# --- gateway/src/config.ts (zod) -------------------------------------------------------------------------------------

def _ts_strip_comments(src: str) -> str:
    src = re.sub(r"/\*.*?\*/", "", src, flags=re.S)
    return re.sub(r"(?m)^\s*//.*$|(?<=[,;{}()\s])//[^\n'\"]*$", "", src)


def _balanced(src: str, start: int, open_ch: str = "{", close_ch: str = "}") -> str:
    depth, i, quote = 0, start, None
    while i < len(src):
        c = src[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "'\"`":
            quote = c
        elif c == open_ch:
            depth += 1
        elif c == close_ch:
            depth -= 1
            if depth == 0:
                return src[start + 1 : i]
        i += 1
    raise ValueError("unbalanced braces")


def _split_top(body: str) -> list[str]:
    parts, depth, cur, quote, i = [], 0, [], None, 0
    while i < len(body):
        c = body[i]
        cur.append(c)
        if quote:
            if c == "\\" and i + 1 < len(body):
                cur.append(body[i + 1])
                i += 1
            elif c == quote:
                quote = None
        elif c in "'\"`":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append("".join(cur[:-1]))
            cur = []
        i += 1
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _ts_literal(text: str) -> Any:
    t = text.strip()
    if re.fullmatch(r"[\d_ *+]+", t):
        return int(eval(t.replace("_", ""), {"__builtins__": {}}))  # digits and * + only
    m = re.fullmatch(r"""(['"`])(.*)\1""", t, flags=re.S)
    if m:
        return m.group(2)
    if t in ("true", "false"):
        return t == "true"
    if t == "[]":
        return ""
    return t


def parse_gateway_config(path: Path = GATEWAY_CONFIG) -> ConfigInfo:
    src = _ts_strip_comments(path.read_text(encoding="utf-8"))
    info = ConfigInfo("gateway", path)
    m = re.search(r"z\s*\.\s*object\s*\(\s*\{", src)
    if not m:
        raise ValueError(f"{path}: no z.object({{...}}) found")
    body = _balanced(src, m.end() - 1)
    # Helpers defined above the object (const int = (...) => z.coerce.number()..., const bool = z.enum([...])).
    helpers = dict(re.findall(r"const\s+(\w+)\s*=\s*([^;]+);", src))
    for entry in _split_top(body):
        km = re.match(r"""['"]?([A-Za-z_][A-Za-z0-9_]*)['"]?\s*:\s*(.*)$""", entry, flags=re.S)
        if not km:
            continue
        name, expr = km.group(1), km.group(2)
        var = Var(name)
        dm = re.search(r"\.default\((.*)\)\s*$", expr, flags=re.S)
        if dm:
            var.default = _ts_literal(dm.group(1))
        head = re.match(r"(\w+)", expr.strip())
        head_src = helpers.get(head.group(1), "") if head else ""
        if re.search(r"\bnumber\(\)", expr + head_src) and re.search(r"\.int\(\)", expr + head_src):
            var.kind = "int"
            im = re.match(r"\s*\w+\(\s*(\d+)\s*(?:,\s*(\d+))?\s*\)", expr)
            if im:
                var.minimum = int(im.group(1))
                var.maximum = int(im.group(2)) if im.group(2) else None
        enum_src = expr if "z.enum" in expr.split(".default")[0] else head_src
        em = re.search(r"z\s*\.\s*enum\s*\(\s*\[([^\]]*)\]", enum_src)
        if em:
            choices = tuple(re.findall(r"""['"]([^'"]*)['"]""", em.group(1)))
            if set(choices) <= _BOOL_WORDS and ".transform" in (head_src or expr):
                var.kind = "bool"
            else:
                var.kind, var.choices = "choice", choices
        info.vars[name] = var
    return info


# --- worker-py/src/llm_worker/config.py (pydantic) -------------------------------------------------------------------

def _py_kind(ann: ast.expr) -> tuple[str, tuple[str, ...]]:
    text = ast.unparse(ann)
    lit = re.search(r"Literal\[(.*)\]", text)
    if lit:
        return "choice", tuple(ast.literal_eval(f"[{lit.group(1)}]"))
    if re.search(r"\bbool\b", text):
        return "bool", ()
    if re.search(r"\bint\b", text):
        return "int", ()
    return "str", ()


def parse_worker_config(path: Path = WORKER_CONFIG) -> ConfigInfo:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    info = ConfigInfo("worker", path)
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        bases = {ast.unparse(b) for b in node.bases}
        if not bases & {"BaseModel", "BaseSettings", "pydantic.BaseModel", "pydantic_settings.BaseSettings"}:
            continue
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            name = stmt.target.id
            if name.startswith("_") or name == "model_config":
                continue
            kind, choices = _py_kind(stmt.annotation)
            var = Var(name.upper(), kind=kind, choices=choices)
            value = stmt.value
            if isinstance(value, ast.Call) and ast.unparse(value.func).endswith("Field"):
                kw = {k.arg: k.value for k in value.keywords}
                for bound, attr in (("ge", "minimum"), ("le", "maximum")):
                    if bound in kw and isinstance(kw[bound], ast.Constant):
                        setattr(var, attr, kw[bound].value)
                value = value.args[0] if value.args else kw.get("default")
            if isinstance(value, ast.Constant):
                var.default = value.value
            info.vars[var.name] = var
    # Any direct os.environ / os.getenv reads count too.
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = ast.unparse(node.func)
            arg = node.args[0].value
            if func in ("os.getenv", "os.environ.get", "environ.get") and isinstance(arg, str):
                info.vars.setdefault(arg, Var(arg))
    return info


def load_configs() -> dict[str, ConfigInfo]:
    missing = [str(p.relative_to(REPO)) for p in (GATEWAY_CONFIG, WORKER_CONFIG) if not p.exists()]
    if missing:
        raise FileNotFoundError(f"configuration code not found: {', '.join(missing)}")
    return {"gateway": parse_gateway_config(), "worker": parse_worker_config()}
